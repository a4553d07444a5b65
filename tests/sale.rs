//! The sale end to end: real `node` processes sharing a real `redis-server`.
//! Every count is checked where the truth is, in Redis, as well as in the
//! nodes' answers.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use spike_tests::ab::ab;
use spike_tests::client::{Client, Reply};
use spike_tests::nodes::{self, wait_for_redis};
use spike_tests::process::Process;
use spike_tests::raw::RawConnection;
use spike_tests::redis::{RedisServer, sale_in_redis};
use spike_tests::wait_until_async;
use tempfile::TempDir;

const EVENT: &str = "ticket";
const READY: Duration = Duration::from_secs(10);

/// A node config for a test sale, in `dir`.
fn node_config(dir: &TempDir, redis: &RedisServer, total: u64, local: u64) -> PathBuf {
    let extra = format!(
        "local_stock = {local}\nstat_log = \"{}\"\nredis_timeout = \"200ms\"\n",
        dir.path().join("stat.log").display(),
    );
    nodes::node_config(dir.path(), redis, total, &extra)
}

fn start_node(config: &Path, name: &str) -> Process {
    nodes::start_node(config, name, None)
}

/// A test sale: nodes sharing one Redis, each ready to sell.
struct Cluster {
    redis: RedisServer,
    dir: TempDir,
    nodes: Vec<Process>,
}

impl Cluster {
    /// Starts `count` nodes selling `total` tickets, `local` at most each,
    /// and waits until each has reached Redis.
    async fn start(redis: RedisServer, total: u64, local: u64, count: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = node_config(&dir, &redis, total, local);
        let nodes: Vec<_> = (1..=count)
            .map(|i| start_node(&config, &format!("node-{i}")))
            .collect();
        for node in &nodes {
            wait_for_redis(node, "up").await;
        }
        Self { redis, dir, nodes }
    }
}

async fn stats(node: &Process) -> serde_json::Value {
    Client::new().get(&node.url("/stats")).await.json()
}

/// Sends `count` purchases from `concurrency` clients, spread over `nodes`
/// in turn; buyer `i` is `buyer(i)`. Returns (node index, reply) pairs.
async fn buy_many(
    nodes: &[Process],
    count: usize,
    concurrency: usize,
    buyer: impl Fn(usize) -> Option<String>,
) -> Vec<(usize, Reply)> {
    let client = Client::new();
    let urls: Vec<_> = (0..count)
        .map(|i| {
            let node = i % nodes.len();
            let url = match buyer(i) {
                Some(id) => nodes[node].url(&format!("/buy/ticket?user={id}")),
                None => nodes[node].url("/buy/ticket"),
            };
            (node, url)
        })
        .collect();
    let queue = std::sync::Arc::new(std::sync::Mutex::new(urls.into_iter()));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, queue) = (client.clone(), queue.clone());
        workers.spawn(async move {
            let mut replies = Vec::new();
            loop {
                let next = queue.lock().unwrap().next();
                let Some((node, url)) = next else { break };
                replies.push((node, client.get(&url).await));
            }
            replies
        });
    }
    workers.join_all().await.into_iter().flatten().collect()
}

/// One purchase by `buyer` at `node`: the status, the order id and whether
/// the buyer held it already.
async fn buy(node: &Process, buyer: &str) -> (u16, Option<String>, serde_json::Value) {
    let reply = Client::new()
        .get(&node.url(&format!("/buy/ticket?user={buyer}")))
        .await;
    let body = reply.json();
    (
        reply.status.as_u16(),
        body["order_id"].as_str().map(str::to_owned),
        body["existing"].clone(),
    )
}

/// How often `node` has loaded the buyers of a sold-out sale.
fn buyer_loads(node: &Process) -> usize {
    node.log().matches("answered from memory").count()
}

/// The distinct order ids of 200 replies.
fn order_ids<'a>(replies: impl IntoIterator<Item = &'a (usize, Reply)>) -> HashSet<String> {
    replies
        .into_iter()
        .filter(|(_, r)| r.status == StatusCode::OK)
        .map(|(_, r)| r.json()["order_id"].as_str().unwrap().to_owned())
        .collect()
}

fn count_status(replies: &[(usize, Reply)], status: StatusCode) -> usize {
    replies.iter().filter(|(_, r)| r.status == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_sell_exactly_the_total() {
    let Cluster {
        redis,
        dir: _dir,
        nodes,
    } = Cluster::start(RedisServer::start(), 1_000, 300, 4).await;

    let replies = buy_many(&nodes, 2_000, 64, |i| Some(format!("buyer-{i}"))).await;

    let sold: Vec<_> = replies
        .iter()
        .filter(|(_, r)| r.status == StatusCode::OK)
        .collect();
    assert_eq!(sold.len(), 1_000, "purchases answered 200");
    assert_eq!(
        count_status(&replies, StatusCode::CONFLICT),
        1_000,
        "the rest are sold out"
    );
    assert_eq!(
        order_ids(sold.iter().copied()).len(),
        1_000,
        "every order id is distinct"
    );

    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!(truth.total, Some(1_000));
    assert_eq!(
        (truth.sold, truth.orders, truth.buyers),
        (1_000, 1_000, 1_000)
    );

    let mut granted_total = 0;
    for (i, node) in nodes.iter().enumerate() {
        let answered_200 = sold.iter().filter(|(n, _)| *n == i).count() as u64;
        let granted = stats(node).await["granted"].as_u64().unwrap();
        assert_eq!(
            granted, answered_200,
            "node {i}'s count agrees with its replies"
        );
        assert!(
            granted <= 300,
            "node {i} sold {granted}, more than its local stock"
        );
        granted_total += granted;
    }
    assert_eq!(granted_total, 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_gets_one_ticket_however_often_and_wherever_they_ask() {
    let Cluster {
        redis,
        dir: _dir,
        nodes,
    } = Cluster::start(RedisServer::start(), 100, 30, 4).await;

    let replies = buy_many(&nodes, 200, 40, |_| Some("alice".to_owned())).await;

    assert_eq!(
        count_status(&replies, StatusCode::OK),
        200,
        "every ask answers with the order"
    );
    let orders = order_ids(&replies);
    assert_eq!(orders.len(), 1, "one order id for all: {orders:?}");
    let new_sales = replies
        .iter()
        .filter(|(_, r)| r.json()["existing"] == false)
        .count();
    assert_eq!(new_sales, 1);

    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!((truth.sold, truth.orders, truth.buyers), (1, 1, 1));
    // Repeated asks give their local unit back: the nodes together hold all
    // their stock but the one ticket sold.
    let mut remaining = 0;
    for node in &nodes {
        remaining += stats(node).await["local_remaining"].as_u64().unwrap();
    }
    assert_eq!(remaining, 4 * 30 - 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_crash_oversells_nothing_and_strands_no_stock() {
    let Cluster {
        mut redis,
        dir: _dir,
        nodes,
    } = Cluster::start(RedisServer::start_durable(), 200, 150, 2).await;

    let before = buy_many(&nodes, 50, 8, |i| Some(format!("early-{i}"))).await;
    assert_eq!(count_status(&before, StatusCode::OK), 50);

    redis.kill();
    let during = buy_many(&nodes, 40, 8, |i| Some(format!("during-{i}"))).await;
    assert_eq!(count_status(&during, StatusCode::SERVICE_UNAVAILABLE), 40);
    for (_, reply) in &during {
        assert_eq!(reply.headers["retry-after"], "1");
        assert_eq!(reply.json()["error"], "store_unavailable");
    }
    for node in &nodes {
        let stats = stats(node).await;
        let sold = stats["granted"].as_u64().unwrap();
        assert_eq!(
            stats["local_remaining"].as_u64().unwrap(),
            150 - sold,
            "failed purchases gave their local stock back"
        );
    }

    redis.restart();
    for node in &nodes {
        wait_for_redis(node, "up").await;
    }
    let after = buy_many(&nodes, 400, 16, |i| Some(format!("late-{i}"))).await;
    assert_eq!(
        count_status(&after, StatusCode::OK),
        150,
        "the rest of the sale, no more"
    );

    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!((truth.sold, truth.orders, truth.buyers), (200, 200, 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchases_whose_outcome_is_unknown_never_oversell() {
    let Cluster {
        redis,
        dir: _dir,
        nodes,
    } = Cluster::start(RedisServer::start(), 100, 120, 1).await;
    // One sale first, so the script is loaded before Redis freezes.
    assert_eq!(
        count_status(&buy_many(&nodes, 1, 1, |_| None).await, StatusCode::OK),
        1
    );

    // A frozen Redis receives the scripts but answers none within the
    // node's timeout; once thawed it runs them all. The node answered 503
    // and gave the units back, yet those tickets are sold.
    redis.pause();
    let frozen = buy_many(&nodes, 30, 30, |i| Some(format!("frozen-{i}"))).await;
    redis.resume();
    assert_eq!(count_status(&frozen, StatusCode::SERVICE_UNAVAILABLE), 30);
    for (_, reply) in &frozen {
        let detail = reply.json()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(detail.contains("may have been made"), "{detail}");
    }

    wait_for_redis(&nodes[0], "up").await;
    let after = buy_many(&nodes, 300, 16, |i| Some(format!("after-{i}"))).await;

    let mut conn = redis.conn();
    let truth = sale_in_redis(&mut conn, EVENT);
    assert_eq!((truth.sold, truth.orders), (100, 100), "exactly the total");
    let buyers: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("spike:{{{EVENT}}}:buyers"))
        .query(&mut conn)
        .unwrap();
    let frozen_sold = buyers.iter().filter(|b| b.starts_with("frozen-")).count();
    assert!(
        frozen_sold > 0,
        "Redis ran purchases the node had given up on"
    );
    let answered = count_status(&after, StatusCode::OK);
    assert_eq!(1 + frozen_sold + answered, 100, "every ticket sold once");

    // The sale is over; once the node has loaded its buyers, a frozen buyer
    // asking again learns the outcome: their order if Redis made one, else
    // sold out.
    spike_tests::wait_until("the node loads the buyers", READY, || {
        buyer_loads(&nodes[0]) == 1
    });
    let orders: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("spike:{{{EVENT}}}:buyers"))
        .query(&mut conn)
        .unwrap();
    let again = buy_many(&nodes, 30, 8, |i| Some(format!("frozen-{i}"))).await;
    for (_, reply) in &again {
        let body = reply.json();
        let buyer = body["buyer"].as_str().map(str::to_owned);
        match buyer.as_ref().and_then(|buyer| orders.get(buyer)) {
            Some(order_id) => {
                assert_eq!(reply.status, StatusCode::OK, "{body}");
                assert_eq!(
                    (&body["order_id"], &body["existing"]),
                    (&serde_json::json!(order_id), &serde_json::json!(true))
                );
            }
            None => assert_eq!(reply.status, StatusCode::CONFLICT, "{body}"),
        }
    }
    assert_eq!(count_status(&again, StatusCode::OK), frozen_sold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_sold_out_a_buyer_holding_a_ticket_gets_it_from_any_node() {
    let Cluster {
        redis,
        dir: _dir,
        nodes,
    } = Cluster::start(RedisServer::start(), 3, 2, 2).await;
    let (status, alice, _) = buy(&nodes[0], "alice").await;
    assert_eq!(status, 200);
    assert_eq!(buy(&nodes[0], "bob").await.0, 200);
    // The first node's share is gone, the sale is not: it answers from
    // memory, without asking Redis.
    assert_eq!(buy(&nodes[0], "carol").await.0, 409);

    // Sold out; once the second node, which never sold to alice, has
    // loaded the buyers, it answers them from memory, with Redis frozen.
    assert_eq!(buy(&nodes[1], "dave").await.0, 200);
    spike_tests::wait_until("the node loads the buyers", READY, || {
        buyer_loads(&nodes[1]) == 1
    });
    redis.pause();
    assert_eq!(buy(&nodes[1], "alice").await, (200, alice, true.into()));
    assert_eq!(buy(&nodes[1], "erin").await.0, 409);
    redis.resume();
    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!((truth.sold, truth.buyers), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_answers_503_then_recovers() {
    let mut redis = RedisServer::start();
    redis.kill();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(&dir, &redis, 10, 10);
    let node = start_node(&config, "early");

    let client = Client::new();
    let reply = client.get(&node.url("/buy/ticket")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.headers["retry-after"], "1");
    let health = client.get(&node.url("/health")).await;
    assert_eq!(
        health.status,
        StatusCode::OK,
        "the node serves without Redis"
    );
    assert_eq!(health.json()["redis"], "down");

    redis.restart();
    wait_for_redis(&node, "up").await;
    let reply = client.get(&node.url("/buy/ticket")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(sale_in_redis(&mut redis.conn(), EVENT).sold, 1);
    assert!(
        node.log().contains("redis is unreachable"),
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_sells_exactly_the_stock() {
    let Cluster {
        redis,
        dir: _dir,
        nodes,
    } = Cluster::start(RedisServer::start(), 500, 600, 1).await;

    let report = tokio::task::spawn_blocking({
        let url = nodes[0].url("/buy/ticket");
        move || ab(&["-q", "-k", "-l", "-n", "2000", "-c", "20"], &url)
    })
    .await
    .unwrap();

    assert_eq!(report.complete, 2_000);
    assert_eq!(report.failed, 0);
    assert_eq!(report.non_2xx, 1_500, "all but the stock are sold out");
    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!((truth.sold, truth.orders), (500, 500));
    assert_eq!(stats(&nodes[0]).await["granted"], 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_purchase_writes_a_stat_line() {
    let Cluster {
        redis: _redis,
        dir,
        mut nodes,
    } = Cluster::start(RedisServer::start(), 3, 5, 1).await;

    let replies = buy_many(&nodes, 8, 2, |_| None).await;
    assert_eq!(count_status(&replies, StatusCode::OK), 3);

    // SIGTERM: the node drains and flushes its stat log before exiting.
    let status = nodes[0].terminate(Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    let log = std::fs::read_to_string(dir.path().join("stat.log")).unwrap();
    let mut results: HashMap<String, usize> = HashMap::new();
    for line in log.lines() {
        assert!(line.contains("node=node-1"), "{line}");
        let result = line
            .split("result=")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap();
        *results
            .entry(result.trim_matches('"').to_owned())
            .or_default() += 1;
    }
    assert_eq!(results.get("sold"), Some(&3), "{log}");
    assert_eq!(results.get("sold_out"), Some(&5), "{log}");
    assert!(
        log.lines().last().unwrap().contains("local_sales=3"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_purchases_in_flight_finish_then_exits_0() {
    let Cluster {
        redis,
        dir: _dir,
        mut nodes,
    } = Cluster::start(RedisServer::start(), 10, 10, 1).await;
    // Purchases that wait on a frozen Redis for up to its timeout.
    redis.pause();
    let client = Client::new();
    let purchases: Vec<_> = (0..5)
        .map(|i| {
            let (client, url) = (
                client.clone(),
                nodes[0].url(&format!("/buy/ticket?user=late-{i}")),
            );
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    wait_until_async("the purchases to be in flight", READY, || async {
        stats(&nodes[0]).await["requests"] == 5
    })
    .await;

    nodes[0].signal(nix::sys::signal::Signal::SIGTERM);
    for purchase in purchases {
        let reply = purchase.await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert_eq!(reply.json()["error"], "store_unavailable");
    }
    let status = nodes[0].wait(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    redis.resume();
}

/// Malformed and hostile requests buy nothing, and a stream of mangled
/// purchases sells exactly the tickets it was answered with: nothing a
/// client sends can make the node sell a ticket it does not report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_or_mangled_requests_never_sell_unreported_tickets() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(&dir, &redis, 100, 100);
    let mut text = std::fs::read_to_string(&config).unwrap();
    // Short timeouts, so that every exchange ends with the node closing.
    text.push_str(
        "[server]\nheader_timeout = \"1s\"\nidle_timeout = \"1s\"\nbody_timeout = \"500ms\"\n\
         max_body_bytes = 64\nmax_header_bytes = 1024\n",
    );
    std::fs::write(&config, text).unwrap();
    let node = start_node(&config, "node-1");
    wait_for_redis(&node, "up").await;

    let oversized_body = format!(
        "POST /buy/ticket?user=big HTTP/1.1\r\nHost: n\r\nContent-Length: 65\r\n\r\n{}",
        "a".repeat(65)
    );
    let oversized_head = format!(
        "GET /buy/ticket?user=head HTTP/1.1\r\nHost: n\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(2048)
    );
    let hostile: Vec<(&[u8], u16)> = vec![
        (b"POST /buy/ticket?user=a HTTP/1.1\r\nHost: n\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
        (b"POST /buy/ticket?user=b HTTP/1.1\r\nHost: n\r\nContent-Length: 1, 2\r\n\r\nab", 400),
        (b"POST /buy/ticket?user=c HTTP/1.0\r\nHost: n\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 400),
        (b"POST /buy/ticket?user=d HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\na\r\n0\r\n\r\n", 400),
        (b"POST /buy/ticket?user=e HTTP/1.1\r\nHost: n\r\nContent-Length: 10\r\n\r\nshort", 408),
        (b"POST /buy/ticket?user=f HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel", 408),
        (b"GET /buy/ticket?user=g HTTP/1.1\r\nHost: n\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET /buy/ticket?user=%00 HTTP/1.1\r\nHost: n\r\n\r\n", 400),
        (b"GET /buy/ticket?user=h\r\n\r\n", 400),
        (b"BUY /buy/ticket?user=i HTTP/1.1\r\nHost: n\r\n\r\n", 405),
        (b"GET /buy/ticket?user=j HTTP/1.1\r\nHost: n\r\nX-User-Id: k\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        (oversized_body.as_bytes(), 413),
        (oversized_head.as_bytes(), 431),
    ];
    for (request, status) in &hostile {
        let statuses = exchange_all(node.addr(), request).await;
        let shown = String::from_utf8_lossy(request);
        assert_eq!(statuses, [*status], "for {shown:?}");
    }
    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!((truth.sold, truth.orders), (0, 0));
    let counts = stats(&node).await;
    assert_eq!(counts["granted"], 0);
    assert_eq!(counts["local_remaining"], 100);

    // Mangled purchases: each a valid one with a few bytes changed, cut or
    // repeated, all at once. Whatever the node makes of them, every ticket
    // it sells is one it answered 200 for.
    let mut random = XorShift(0x5eed_1234_abcd_ef01);
    let exchanges: Vec<_> = (0..300)
        .map(|i| {
            let mut request = format!(
                "POST /buy/ticket?user=m{i} HTTP/1.1\r\nHost: n\r\nContent-Length: 5\r\n\r\nhello"
            )
            .into_bytes();
            for _ in 0..1 + random.below(3) {
                mangle(&mut request, &mut random);
            }
            let node = node.addr();
            tokio::spawn(async move { exchange_bodies(node, &request).await })
        })
        .collect();
    let mut answered = HashSet::new();
    for exchange in exchanges {
        for (status, body) in exchange.await.unwrap() {
            if status == 200 {
                let order: serde_json::Value = serde_json::from_slice(&body).unwrap();
                answered.insert(order["order_id"].as_str().unwrap().to_owned());
            }
        }
    }
    let truth = sale_in_redis(&mut redis.conn(), EVENT);
    assert_eq!(
        truth.sold,
        answered.len() as u64,
        "sold in Redis, answered 200"
    );
    assert!(truth.sold > 0, "some mangled requests are still purchases");
    let counts = stats(&node).await;
    assert_eq!(counts["granted"].as_u64(), Some(truth.sold));
    assert_eq!(counts["local_remaining"].as_u64(), Some(100 - truth.sold));

    // And the node still sells.
    let reply = Client::new().get(&node.url("/buy/ticket?user=after")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// The statuses of every response to `bytes`, until the node closes the
/// connection.
async fn exchange_all(node: std::net::SocketAddr, bytes: &[u8]) -> Vec<u16> {
    let replies = exchange_bodies(node, bytes).await;
    replies.into_iter().map(|(status, _)| status).collect()
}

/// Every response to `bytes`, status and body, until the node closes the
/// connection.
async fn exchange_bodies(node: std::net::SocketAddr, bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut conn = RawConnection::connect(node).await;
    let mut replies = Vec::new();
    if conn.try_send(bytes).await.is_err() {
        return replies;
    }
    while let Some(response) = conn.response(false).await {
        replies.push((response.status, response.body));
    }
    replies
}
/// Changes `request` in one way: a byte replaced, removed or repeated, a
/// run of bytes duplicated, or the end cut off.
fn mangle(request: &mut Vec<u8>, random: &mut XorShift) {
    if request.is_empty() {
        return;
    }
    let at = random.below(request.len());
    match random.below(5) {
        0 => request[at] = random.below(256) as u8,
        1 => {
            request.remove(at);
        }
        2 => request.insert(at, request[at]),
        3 => {
            let end = (at + 1 + random.below(16)).min(request.len());
            let run = request[at..end].to_vec();
            request.splice(at..at, run);
        }
        _ => request.truncate(at),
    }
}

/// A small deterministic generator, so a failure replays exactly.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_started_over_is_never_answered_from_the_last_one_s_buyers() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, sync: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "redis_url = \"{}\"\nevent = \"{EVENT}\"\ntotal_stock = 2\nlocal_stock = 2\n\
             stat_log = \"\"\nredis_timeout = \"200ms\"\nsync_interval = \"{sync}\"\n",
            redis.url(),
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let fast_config = config("fast.toml", "50ms");
    let fast = start_node(&fast_config, "fast");
    let slow = start_node(&config("slow.toml", "2s"), "slow");
    wait_for_redis(&fast, "up").await;
    wait_for_redis(&slow, "up").await;

    assert_eq!(buy(&fast, "alice").await.0, 200);
    assert_eq!(buy(&fast, "bob").await.0, 200);
    spike_tests::wait_until("the slow node loads the buyers", READY, || {
        buyer_loads(&slow) == 1
    });

    // Started over, and sold out again, between two syncs of the slow node.
    let (status, _, stderr) = spike_tests::process::run(
        "node",
        &[
            "reset",
            "--config",
            fast_config.to_str().unwrap(),
            "--total",
            "2",
        ],
    );
    assert!(status.success(), "{stderr}");
    spike_tests::wait_until("the fast node sees the new sale", READY, || {
        fast.log().contains("started over")
    });
    let (status, carol, _) = buy(&fast, "carol").await;
    assert_eq!(status, 200);
    assert_eq!(buy(&fast, "dave").await.0, 200);

    spike_tests::wait_until("the slow node loads the new buyers", READY, || {
        buyer_loads(&slow) == 2
    });
    assert_eq!(buy(&slow, "carol").await, (200, carol, true.into()));
    assert_eq!(buy(&slow, "alice").await.0, 409);
}
