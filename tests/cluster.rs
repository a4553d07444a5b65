//! The whole system end to end: the balancer in front of real nodes sharing
//! a real Redis, driven by ApacheBench.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use spike_tests::ab::ab;
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;
use spike_tests::process::Process;
use spike_tests::redis::{RedisServer, sale_in_redis};
use spike_tests::{wait_until, wait_until_async};

/// Starts one node per entry of `local_stocks`, selling from a sale of
/// `total` tickets, and waits until each has reached Redis.
async fn start_nodes(
    redis: &RedisServer,
    dir: &Path,
    total: u64,
    local_stocks: &[u64],
) -> Vec<Process> {
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "redis_url = \"{}\"\ntotal_stock = {total}\nsync_interval = \"50ms\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let nodes: Vec<Process> = local_stocks
        .iter()
        .enumerate()
        .map(|(i, local)| {
            Process::start(
                "node",
                &[
                    "--config",
                    config.to_str().unwrap(),
                    "--listen",
                    "127.0.0.1:0",
                    "--name",
                    &format!("node-{}", i + 1),
                    "--local-stock",
                    &local.to_string(),
                ],
                1,
            )
        })
        .collect();
    let client = Client::new();
    for node in &nodes {
        let url = node.url("/health");
        wait_until_async("the node to reach Redis", Duration::from_secs(10), || {
            let (client, url) = (client.clone(), url.clone());
            async move { client.get(&url).await.json()["redis"] == "up" }
        })
        .await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_through_the_balancer_sells_exactly_the_stock() {
    const WEIGHTS: [u32; 4] = [1, 2, 3, 4];
    const TOTAL: u64 = 1_000;
    // Each node's share of the total plus a buffer of 50.
    let locals: Vec<u64> = WEIGHTS
        .iter()
        .map(|&w| TOTAL * u64::from(w) / 10 + 50)
        .collect();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(&redis, dir.path(), TOTAL, &locals).await;
    let upstreams: Vec<_> = nodes.iter().map(Process::addr).zip(WEIGHTS).collect();
    let balancer = Balancer::start(&upstreams, "");

    let url = balancer.url("/buy/ticket");
    let report = tokio::task::spawn_blocking(move || {
        ab(&["-q", "-k", "-l", "-n", "5000", "-c", "50"], &url)
    })
    .await
    .unwrap();

    assert_eq!((report.complete, report.failed), (5_000, 0));
    assert_eq!(
        report.non_2xx,
        5_000 - TOTAL,
        "every request but the stock is sold out"
    );
    let truth = sale_in_redis(&mut redis.conn(), "ticket");
    assert_eq!(
        (truth.sold, truth.orders),
        (TOTAL, TOTAL),
        "exactly the stock, never more"
    );

    // Each node saw its weight's share of the requests, and sold at most its
    // local stock.
    let client = Client::new();
    let mut granted = 0;
    for ((node, weight), local) in nodes.iter().zip(WEIGHTS).zip(&locals) {
        let stats = client.get(&node.url("/stats")).await.json();
        assert_eq!(stats["requests"].as_u64().unwrap(), 500 * u64::from(weight));
        let sold = stats["granted"].as_u64().unwrap();
        assert!(sold <= *local);
        granted += sold;
    }
    assert_eq!(granted, TOTAL);
}

/// The seed article's promise: 4 nodes share 10,000 tickets, each holding its
/// share plus a buffer; one dies a third of the way through the sale; the
/// others' buffers sell its share, and the total is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dying_mid_sale_loses_no_ticket_and_oversells_none() {
    const TOTAL: u64 = 10_000;
    // A quarter each, plus a buffer that lets three nodes cover the fourth.
    const LOCAL: u64 = TOTAL / 4 + TOTAL / 12 + 1;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(&redis, dir.path(), TOTAL, &[LOCAL; 4]).await;
    let upstreams: Vec<_> = nodes.iter().map(|node| (node.addr(), 1)).collect();
    let balancer = Balancer::start(
        &upstreams,
        "[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\n",
    );

    let url = balancer.url("/buy/ticket");
    let sale = tokio::task::spawn_blocking(move || {
        ab(&["-q", "-k", "-l", "-n", "30000", "-c", "50"], &url)
    });
    let mut conn = redis.conn();
    wait_until("a third of the sale", Duration::from_secs(60), || {
        sale_in_redis(&mut conn, "ticket").sold >= TOTAL / 3
    });
    nodes[3].signal(Signal::SIGKILL);
    let report = sale.await.unwrap();

    assert_eq!(report.complete, 30_000);
    let truth = sale_in_redis(&mut redis.conn(), "ticket");
    assert_eq!(
        truth.sold, TOTAL,
        "no ticket lost to the dead node, none oversold"
    );
    assert_eq!(truth.orders, TOTAL, "every sold ticket has its order");
    assert_eq!(truth.total, Some(TOTAL));
}
