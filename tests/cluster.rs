//! The whole system end to end: the balancer in front of real nodes sharing
//! a real Redis, driven by ApacheBench.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use spike_tests::ab::ab;
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;
use spike_tests::nodes;
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
    let config = nodes::node_config(dir, redis, total, "");
    nodes::start_nodes(&config, local_stocks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_through_the_balancer_sells_exactly_the_stock() {
    sells_exactly_the_stock("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_through_the_balancer_pipelining_to_the_nodes_sells_exactly_the_stock() {
    sells_exactly_the_stock("[proxy]\npipeline_depth = 8\n").await;
}

/// 5,000 purchases by ab, through a balancer configured with `extra`, in
/// front of four nodes weighted 1 to 4 selling 1,000 tickets.
async fn sells_exactly_the_stock(extra: &str) {
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
    let balancer = Balancer::start(&upstreams, extra);

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
/// others' buffers sell its share, and the total is exact. The balancer
/// pipelines to the nodes, as `spike up`'s does: the dead node's
/// connections each carried several purchases.
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
        "[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\n\
         [proxy]\npipeline_depth = 8\n",
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

/// What the clients of a sale saw, reply by reply.
#[derive(Debug, Default)]
struct Seen {
    /// Tickets bought (200).
    sold: u64,
    /// 503s from a node (Redis down), and when the last one came.
    node_unavailable: u64,
    /// 503s from the balancer itself: no upstream would take the request.
    no_upstream: u64,
    /// When each 200 came.
    sold_at: Vec<std::time::Instant>,
    other: Vec<String>,
}

/// Redis, the only truth of the sale, dies mid-sale and is back two
/// seconds later. Every node answers 503 meanwhile, with `Retry-After`: an
/// answer from a live node, which the balancer does not hold against it.
/// So the nodes are never rested, purchases succeed again as soon as Redis
/// answers, and the sale ends with exactly its stock sold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_stops_the_sale_only_while_it_lasts() {
    const TOTAL: u64 = 2_000;
    let mut redis = RedisServer::start_durable();
    let dir = tempfile::tempdir().unwrap();
    let nodes = start_nodes(&redis, dir.path(), TOTAL, &[TOTAL / 2; 4]).await;
    let upstreams: Vec<_> = nodes.iter().map(|node| (node.addr(), 1)).collect();
    let balancer = Balancer::start(&upstreams, "");

    let seen = std::sync::Arc::new(std::sync::Mutex::new(Seen::default()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = balancer.url("/buy/ticket");
    let buyers: Vec<_> = (0..8)
        .map(|_| {
            let (seen, stop, url) = (seen.clone(), stop.clone(), url.clone());
            tokio::spawn(async move {
                let client = Client::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let reply = client.get(&url).await;
                    let mut seen = seen.lock().unwrap();
                    match (reply.status.as_u16(), reply.json()["error"].as_str()) {
                        (200, _) => {
                            seen.sold += 1;
                            seen.sold_at.push(std::time::Instant::now());
                        }
                        (409, Some("sold_out")) => {}
                        (503, Some("no_upstream")) => seen.no_upstream += 1,
                        (503, Some("store_unavailable" | "no_sale")) => {
                            seen.node_unavailable += 1;
                        }
                        (status, _) => seen.other.push(format!("{status} {}", reply.text())),
                    }
                }
            })
        })
        .collect();
    let sold = || seen.lock().unwrap().sold;
    wait_until_async(
        "a first part of the sale",
        Duration::from_secs(30),
        || async { sold() >= TOTAL / 5 },
    )
    .await;

    redis.kill();
    wait_until_async(
        "the nodes to answer 503",
        Duration::from_secs(10),
        || async { seen.lock().unwrap().node_unavailable >= 50 },
    )
    .await;
    let outage_began = std::time::Instant::now();
    // Two seconds of outage, as the clients see it.
    while outage_began.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();
    let back = std::time::Instant::now();
    wait_until_async(
        "a purchase after the outage",
        Duration::from_secs(10),
        || async {
            seen.lock()
                .unwrap()
                .sold_at
                .last()
                .is_some_and(|at| *at > back)
        },
    )
    .await;
    let resumed_after = back.elapsed();
    wait_until_async("the sale to sell out", Duration::from_secs(60), || async {
        sale_in_redis(&mut redis.conn(), "ticket").sold >= TOTAL
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for buyer in buyers {
        buyer.await.unwrap();
    }

    let seen = std::sync::Arc::into_inner(seen)
        .unwrap()
        .into_inner()
        .unwrap();
    assert!(
        seen.other.is_empty(),
        "{:?}",
        &seen.other[..seen.other.len().min(5)]
    );
    assert_eq!(
        seen.no_upstream, 0,
        "a node answering 503 is a live node: the balancer never ran out of upstreams"
    );
    assert!(
        resumed_after < Duration::from_secs(2),
        "purchases resumed {resumed_after:?} after Redis answered"
    );
    let truth = sale_in_redis(&mut redis.conn(), "ticket");
    assert_eq!(
        (truth.sold, truth.orders),
        (TOTAL, TOTAL),
        "exactly the stock, never more"
    );
    assert!(seen.sold <= TOTAL, "{} tickets handed out", seen.sold);
    let stats = balancer.stats().await;
    for upstream in stats["upstreams"].as_array().unwrap() {
        assert_eq!(upstream["passive_fails"], 0, "{upstream}");
    }
}
