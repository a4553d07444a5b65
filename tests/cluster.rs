//! The whole system end to end: the balancer in front of real nodes sharing
//! a real Redis, driven by ApacheBench.

use spike_tests::ab::ab;
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;
use spike_tests::process::Process;
use spike_tests::redis::{RedisServer, sale_in_redis};
use spike_tests::wait_until_async;

const WEIGHTS: [u32; 4] = [1, 2, 3, 4];
const TOTAL: u64 = 1_000;
/// Each node's share of the total plus a buffer of 50.
const BUFFER: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_through_the_balancer_sells_exactly_the_stock() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "redis_url = \"{}\"\ntotal_stock = {TOTAL}\nsync_interval = \"50ms\"\n",
            redis.url()
        ),
    )
    .unwrap();
    let weight_sum: u64 = WEIGHTS.iter().map(|&w| u64::from(w)).sum();
    let nodes: Vec<Process> = WEIGHTS
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            let local = TOTAL * u64::from(weight) / weight_sum + BUFFER;
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
        wait_until_async(
            "the node to reach Redis",
            std::time::Duration::from_secs(10),
            || {
                let (client, url) = (client.clone(), url.clone());
                async move { client.get(&url).await.json()["redis"] == "up" }
            },
        )
        .await;
    }
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
    let mut granted = 0;
    for (node, weight) in nodes.iter().zip(WEIGHTS) {
        let stats = client.get(&node.url("/stats")).await.json();
        assert_eq!(stats["requests"].as_u64().unwrap(), 500 * u64::from(weight));
        let sold = stats["granted"].as_u64().unwrap();
        assert!(sold <= TOTAL * u64::from(weight) / weight_sum + BUFFER);
        granted += sold;
    }
    assert_eq!(granted, TOTAL);
}
