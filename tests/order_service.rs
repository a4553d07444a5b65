//! The order service end to end: real `redis-server`, real nodes, the real
//! `orders` process, and real SQLite and PostgreSQL databases, read by the
//! test itself and compared with what Redis holds.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use nix::sys::signal::Signal;
use spike_tests::buyers::{buy_all, pay_all};
use spike_tests::client::Client;
use spike_tests::nodes::{node_config, start_nodes};
use spike_tests::order_service::{
    database_rows, execute, start_order_service, stats, wait_for_no_lag,
};
use spike_tests::postgres::PostgresServer;
use spike_tests::process::{Process, run};
use spike_tests::redis::{RedisServer, ledger_in_redis, stock_in_redis};
use spike_tests::wait_until_async;

const STREAM: &str = "spike:{ticket}:orders";

fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}/data/orders.db", dir.display())
}

/// Every entry id of the order stream.
fn stream_ids(conn: &mut redis::Connection) -> Vec<String> {
    let entries: Vec<(String, redis::Value)> = redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

/// Checks that the database holds every order of the ledger, once, in the
/// same final state, and every event of the stream, once.
async fn assert_database_matches_redis(conn: &mut redis::Connection, database: &str) {
    let ledger = ledger_in_redis(conn, "ticket");
    let (orders, events) = database_rows(database).await;
    assert_eq!(orders.len(), ledger.len(), "one row per order");
    for order in &ledger {
        let row = &orders[&order.id];
        assert_eq!(
            (&row.status, row.ticket, &row.buyer, row.pay_by),
            (
                &order.status,
                order.ticket as i64,
                &order.buyer,
                order.pay_by as i64
            ),
            "{}",
            order.id
        );
        let closed = order.closed.map(|at| at as i64);
        match order.status.as_str() {
            "paid" => assert_eq!((row.paid_at, row.expired_at), (closed, None)),
            "expired" => assert_eq!((row.expired_at, row.paid_at), (closed, None)),
            _ => assert_eq!((row.paid_at, row.expired_at), (None, None)),
        }
    }
    let ids = stream_ids(conn);
    assert_eq!(events.len(), ids.len(), "one row per event");
    let events: HashSet<String> = events.into_iter().collect();
    assert_eq!(events, ids.into_iter().collect::<HashSet<_>>());
}

/// A sale with payments, expiries and resales, through two nodes, while the
/// service runs: every order in the database, in its final state.
async fn a_sale_lands_in(database: &str, dir: &std::path::Path) {
    let redis = RedisServer::start();
    let config = node_config(
        dir,
        &redis,
        200,
        "pay_window = \"3s\"\nsweep_interval = \"50ms\"\n",
    );
    let nodes = start_nodes(&config, &[200, 200]).await;
    let service = start_order_service(dir, &redis, database, "", &[]);
    let client = Client::new();
    let urls: Vec<String> = nodes.iter().map(|node| node.url("")).collect();

    // 300 buyers for 200 tickets; two in three of the holders pay.
    let replies = buy_all(&client, &urls[0], (0..300).map(|i| format!("b{i}"))).await;
    let mut paying = Vec::new();
    let mut without = Vec::new();
    for (i, (_, order)) in replies.into_iter().enumerate() {
        match order {
            Some((id, _)) if i % 3 != 0 => paying.push((id, format!("b{i}"))),
            Some(_) => {}
            None => without.push(format!("b{i}")),
        }
    }
    assert_eq!(without.len(), 100);
    for reply in pay_all(&client, &urls[1], &paying).await {
        assert_eq!(reply.status, 200);
    }
    let unpaid = 200 - paying.len() as u64;
    let mut conn = redis.conn();
    wait_until_async(
        "the unpaid orders to expire",
        Duration::from_secs(10),
        || std::future::ready(stock_in_redis(&mut conn, "ticket").get("expired") == Some(&unpaid)),
    )
    .await;
    // Those who had none buy the returned tickets (the nodes learn of them
    // within a sync interval), and pay.
    let mut second: Vec<(String, String)> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while (second.len() as u64) < unpaid {
        assert!(
            std::time::Instant::now() < deadline,
            "the returned tickets were not sold again: {} of {unpaid}",
            second.len()
        );
        let trying: Vec<String> = without
            .iter()
            .filter(|buyer| !second.iter().any(|(_, b)| b == *buyer))
            .cloned()
            .collect();
        let replies = buy_all(&client, &urls[1], trying.iter().cloned()).await;
        for ((_, order), buyer) in replies.into_iter().zip(trying) {
            if let Some((id, _)) = order {
                second.push((id, buyer));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(second.len() as u64, unpaid, "no more than were returned");
    for reply in pay_all(&client, &urls[0], &second).await {
        assert_eq!(reply.status, 200);
    }

    let events = stream_ids(&mut conn).len() as u64;
    assert_eq!(events, 200 + paying.len() as u64 + unpaid + 2 * unpaid);
    wait_for_no_lag(&service, events, Duration::from_secs(20)).await;
    assert_database_matches_redis(&mut conn, database).await;
    let stats = stats(&service).await;
    assert_eq!(stats["orders"]["orders"], 200 + unpaid, "{stats}");
    assert_eq!(stats["orders"]["expired"], unpaid, "{stats}");
    let written = &stats["written"];
    assert_eq!(
        (
            written["created"].as_u64(),
            written["paid"].as_u64(),
            written["expired"].as_u64()
        ),
        (Some(200 + unpaid), Some(200), Some(unpaid)),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_lands_in_sqlite_order_by_order() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    a_sale_lands_in(&url, dir.path()).await;
    assert!(dir.path().join("data/orders.db").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_lands_in_postgres_order_by_order() {
    let postgres = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    a_sale_lands_in(&postgres.url(), dir.path()).await;
}

/// Writes a stream of `orders` orders straight into Redis, as nodes would:
/// each created, and every other one paid. Returns the entries written.
fn fill_stream(conn: &mut redis::Connection, orders: usize) -> u64 {
    let mut written = 0;
    for chunk in (0..orders).collect::<Vec<_>>().chunks(1_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("XADD").arg(STREAM).arg("*").arg(&[
                ("event", "created".to_owned()),
                ("ticket", (i + 1).to_string()),
                ("buyer", format!("u{i}")),
                ("node", "node-1".to_owned()),
                ("status", "pending".to_owned()),
                ("time", "1000".to_owned()),
                ("pay_by", "9000".to_owned()),
            ]);
        }
        let ids: Vec<String> = pipe.query(conn).unwrap();
        let mut pipe = redis::pipe();
        for (&i, id) in chunk.iter().zip(&ids).filter(|(i, _)| *i % 2 == 0) {
            pipe.cmd("XADD").arg(STREAM).arg("*").arg(&[
                ("event", "paid".to_owned()),
                ("order", id.clone()),
                ("ticket", (i + 1).to_string()),
                ("buyer", format!("u{i}")),
                ("node", "node-2".to_owned()),
                ("status", "paid".to_owned()),
                ("time", "2000".to_owned()),
                ("created", "1000".to_owned()),
                ("pay_by", "9000".to_owned()),
            ]);
        }
        let paid: Vec<String> = pipe.query(conn).unwrap();
        written += (ids.len() + paid.len()) as u64;
    }
    written
}

/// Events the group `orders` has not acknowledged or not read yet.
fn behind(conn: &mut redis::Connection) -> u64 {
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query(conn)
        .unwrap();
    let group = groups
        .iter()
        .find(|g| g["name"] == redis::Value::BulkString(b"orders".to_vec()))
        .expect("the group");
    let number = |field: &str| redis::from_redis_value_ref::<u64>(&group[field]).unwrap();
    number("pending") + number("lag")
}

/// The events a service says it wrote for the first time.
fn written(stats: &serde_json::Value) -> u64 {
    ["created", "paid", "expired"]
        .iter()
        .map(|kind| stats["written"][kind].as_u64().unwrap())
        .sum()
}

/// Kills `service` with SIGKILL once it has written `at_least` events.
async fn kill_once_it_wrote(service: &mut Process, at_least: u64) {
    wait_until_async("the service to write", Duration::from_secs(30), || async {
        written(&stats(service).await) >= at_least
    })
    .await;
    service.signal(Signal::SIGKILL);
    service.wait(Duration::from_secs(5));
}

/// The service killed with SIGKILL mid-stream and started again under the
/// same name, twice: it takes back what it had read, and every event is in
/// the database exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twice_mid_stream_every_event_is_written_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let database = sqlite_url(dir.path());
    let mut conn = redis.conn();
    let events = fill_stream(&mut conn, 20_000);
    let settings = "batch = 100\n";
    let args = ["--consumer", "kept"];
    for _ in 0..2 {
        let mut service = start_order_service(dir.path(), &redis, &database, settings, &args);
        kill_once_it_wrote(&mut service, 2_000).await;
        let pending: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg("orders")
            .query(&mut conn)
            .unwrap();
        assert!(pending.0 <= 100, "at most a batch read and not written");
        assert!(behind(&mut conn) > 0, "killed before the end of the stream");
    }
    let service = start_order_service(dir.path(), &redis, &database, settings, &args);
    wait_for_no_lag(&service, events, Duration::from_secs(60)).await;
    let (orders, written_events) = database_rows(&database).await;
    assert_eq!(orders.len(), 20_000);
    assert_eq!(
        orders.values().filter(|o| o.status == "paid").count(),
        10_000
    );
    assert_eq!(written_events.len() as u64, events, "every event once");
    assert_eq!(
        stats(&service).await["claimed"],
        0,
        "its own, read again at once"
    );
}

/// Two services at once share the stream, and take over what dead
/// consumers had read: one that died before they started (a consumer that
/// read a hundred events and never acknowledged them), and one of them,
/// killed mid-way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_share_the_work_and_take_over_a_dead_ones() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let database = sqlite_url(dir.path());
    let mut conn = redis.conn();
    let events = fill_stream(&mut conn, 10_000);
    let () = redis::cmd("XGROUP")
        .arg(&["CREATE", STREAM, "orders", "0"])
        .query(&mut conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP", "orders", "ghost", "COUNT", "100", "STREAMS", STREAM, ">",
        ])
        .query(&mut conn)
        .unwrap();
    let settings = "batch = 100\nclaim_idle = \"1s\"\n";
    let mut first = start_order_service(&one, &redis, &database, settings, &["--consumer", "one"]);
    let second = start_order_service(&two, &redis, &database, settings, &["--consumer", "two"]);
    kill_once_it_wrote(&mut first, 1_000).await;
    let left: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg("orders")
        .arg("-")
        .arg("+")
        .arg(1_000)
        .arg("one")
        .query(&mut conn)
        .unwrap();

    wait_for_no_lag(&second, events, Duration::from_secs(60)).await;
    let stats = stats(&second).await;
    assert!(written(&stats) > 0, "{stats}");
    let ghost: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(&[STREAM, "orders", "-", "+", "10", "ghost"])
        .query(&mut conn)
        .unwrap();
    assert!(ghost.is_empty(), "the ghost's events taken over");
    assert!(
        stats["claimed"].as_u64().unwrap() >= left.len() as u64,
        "the dead one's {} events taken over: {stats}",
        left.len()
    );
    let (orders, written_events) = database_rows(&database).await;
    assert_eq!(orders.len(), 10_000);
    assert_eq!(written_events.len() as u64, events, "every event once");
}

/// PostgreSQL stopped for a few seconds in the middle of a sale: buying
/// and paying go on, the events wait in the stream, and once it is back
/// the lag returns to zero with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_down_for_seconds_loses_nothing() {
    let redis = RedisServer::start();
    let mut postgres = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(dir.path(), &redis, 1_000, "");
    let nodes = start_nodes(&config, &[1_000]).await;
    let database = postgres.url();
    let service = start_order_service(
        dir.path(),
        &redis,
        &database,
        "retry_max = \"500ms\"\ndatabase_timeout = \"2s\"\n",
        &[],
    );
    let client = Client::new();
    let url = nodes[0].url("");
    let sell = |from: usize| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let replies = buy_all(&client, &url, (from..from + 200).map(|i| format!("p{i}"))).await;
            let orders: Vec<(String, String)> = replies
                .into_iter()
                .enumerate()
                .map(|(i, (status, order))| {
                    assert_eq!(status, 200);
                    (order.unwrap().0, format!("p{}", from + i))
                })
                .collect();
            for reply in pay_all(&client, &url, &orders[..100]).await {
                assert_eq!(reply.status, 200);
            }
        }
    };
    sell(0).await;
    let mut conn = redis.conn();
    wait_for_no_lag(&service, 300, Duration::from_secs(20)).await;

    postgres.stop();
    sell(200).await;
    wait_until_async(
        "the service to see the database down",
        Duration::from_secs(10),
        || async {
            let stats = stats(&service).await;
            stats["database_errors"].as_u64() > Some(0) && stats["lag"]["events"].as_u64() > Some(0)
        },
    )
    .await;
    sell(400).await;
    postgres.restart();

    wait_for_no_lag(&service, 900, Duration::from_secs(30)).await;
    assert_database_matches_redis(&mut conn, &database).await;
    let stats = stats(&service).await;
    assert!(stats["retries"].as_u64() > Some(0), "{stats}");
    assert_eq!(stats["orders"]["orders"], 600, "{stats}");
}

/// Redis killed mid-stream and started again (with its append-only file):
/// the service waits, then resumes where its group stood, and every event
/// reaches the database once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_mid_stream_the_service_waits_and_resumes() {
    let mut redis = RedisServer::start_durable();
    let dir = tempfile::tempdir().unwrap();
    let database = sqlite_url(dir.path());
    let events = fill_stream(&mut redis.conn(), 10_000);
    let service = start_order_service(dir.path(), &redis, &database, "batch = 100\n", &[]);
    wait_until_async("the service to write", Duration::from_secs(30), || async {
        written(&stats(&service).await) >= 1_000
    })
    .await;
    assert!(
        behind(&mut redis.conn()) > 0,
        "killed before the end of the stream"
    );
    redis.kill();
    wait_until_async(
        "the service to see Redis down",
        Duration::from_secs(10),
        || async { stats(&service).await["redis_up"] == false },
    )
    .await;
    redis.restart();
    wait_for_no_lag(&service, events, Duration::from_secs(60)).await;
    let (orders, written_events) = database_rows(&database).await;
    assert_eq!(orders.len(), 10_000);
    assert_eq!(written_events.len() as u64, events, "every event once");
    let stats = stats(&service).await;
    assert!(stats["redis_errors"].as_u64() > Some(0), "{stats}");
    assert_eq!(stats["redis_up"], true);
}

/// The database refuses one event for good (here a constraint added to
/// the table refuses one buyer): the batch is split until that event is
/// alone, it is parked with the database's reason, and every other event
/// is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_parked_alone() {
    let redis = RedisServer::start();
    let postgres = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let database = postgres.url();
    let service = start_order_service(dir.path(), &redis, &database, "", &[]);
    wait_until_async("the tables", Duration::from_secs(20), || async {
        stats(&service).await["database_up"] == true
    })
    .await;
    execute(
        &database,
        "ALTER TABLE orders ADD CONSTRAINT no_poison CHECK (buyer <> 'u37')",
    )
    .await;
    let mut conn = redis.conn();
    let events = fill_stream(&mut conn, 100);
    wait_for_no_lag(&service, events, Duration::from_secs(20)).await;
    let (orders, written) = database_rows(&database).await;
    assert_eq!(orders.len(), 99);
    assert!(!orders.values().any(|order| order.buyer == "u37"));
    assert_eq!(
        written.len() as u64,
        events - 1,
        "every other event written"
    );
    let dead: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(format!("{STREAM}:dead"))
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].1["buyer"], "u37");
    assert!(dead[0].1["reason"].contains("no_poison"), "{:?}", dead[0].1);
    assert_eq!(stats(&service).await["dead_letters"], 1);
}

/// An entry that is not an order event is parked in the dead letter
/// stream, with its id and the reason, and the events behind it are
/// written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_is_not_an_event_is_parked_and_blocks_nothing() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let database = sqlite_url(dir.path());
    let mut conn = redis.conn();
    fill_stream(&mut conn, 5);
    let bad: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg(&[("event", "refunded"), ("status", "refunded")])
        .query(&mut conn)
        .unwrap();
    fill_stream(&mut conn, 5);
    // And one that is not even text.
    let binary: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("event")
        .arg(&b"\xffcreated"[..])
        .query(&mut conn)
        .unwrap();
    fill_stream(&mut conn, 5);
    let service = start_order_service(dir.path(), &redis, &database, "", &[]);
    // Five orders and three payments before, between and after them.
    wait_for_no_lag(&service, 26, Duration::from_secs(20)).await;
    let (orders, events) = database_rows(&database).await;
    assert_eq!((orders.len(), events.len()), (15, 24));
    let dead: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(format!("{STREAM}:dead"))
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap();
    let text = |i: usize, field: &str| String::from_utf8_lossy(&dead[i].1[field]).into_owned();
    assert_eq!(dead.len(), 2);
    assert_eq!((text(0, "entry"), text(1, "entry")), (bad, binary));
    assert!(text(0, "reason").contains("refunded"), "{:?}", dead[0].1);
    assert!(text(1, "reason").contains("not text"), "{:?}", dead[1].1);
    assert_eq!(dead[1].1["event"], b"\xffcreated", "parked as it was");
    assert_eq!(stats(&service).await["dead_letters"], 2);
}

/// The stream is trimmed below what every group acknowledged, never
/// further: another group's unacknowledged entries stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_what_any_group_has_not_acknowledged() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let database = sqlite_url(dir.path());
    let mut conn = redis.conn();
    let events = fill_stream(&mut conn, 100);
    // An audit group that has read ten entries and acknowledged none.
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg("audit")
        .arg("0")
        .query(&mut conn)
        .unwrap();
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg(&["GROUP", "audit", "a", "COUNT", "10", "STREAMS", STREAM, ">"])
        .query(&mut conn)
        .unwrap();
    drop(read);
    let ids = stream_ids(&mut conn);
    let service = start_order_service(
        dir.path(),
        &redis,
        &database,
        "trim_interval = \"100ms\"\n",
        &[],
    );
    wait_for_no_lag(&service, events, Duration::from_secs(20)).await;
    // The audit group acknowledges five, then the other five: each time
    // the stream is trimmed up to its first unacknowledged entry, no
    // further (trimming past it would empty the stream).
    for acked in [5, 10] {
        let _: u64 = redis::cmd("XACK")
            .arg(STREAM)
            .arg("audit")
            .arg(&ids[acked - 5..acked])
            .query(&mut conn)
            .unwrap();
        wait_until_async(
            &format!("the stream to start at entry {acked}"),
            Duration::from_secs(5),
            || async {
                stream_ids(&mut redis.conn()).first() == Some(&ids[acked])
                    && stats(&service).await["trimmed"] == acked
            },
        )
        .await;
    }
    assert_eq!(stream_ids(&mut conn).len() as u64, events - 10);
}

#[test]
fn a_bad_setting_is_located_and_stops_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orders.toml");
    std::fs::write(&config, "batch = 10\nclaim_idle = \"soon\"\n").unwrap();
    let (status, _, stderr) = run("orders", &["--config", config.to_str().unwrap()]);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "{}:2:14: `soon` is not a duration",
            config.display()
        )),
        "{stderr}"
    );
}
