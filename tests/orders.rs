//! The life of an order, end to end: real `node` processes and a real
//! `redis-server`, through the real balancer where it matters. Every
//! check reads the truth in Redis (the ledger, the stock counters, the
//! order stream) as well as the answers the clients got.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use spike_tests::balancer::Balancer;
use spike_tests::buyers::{buy, buy_all, pay, pay_all};
use spike_tests::client::Client;
use spike_tests::nodes::{node_config, start_node, start_nodes, wait_for_redis};
use spike_tests::process::Process;
use spike_tests::redis::{
    LedgerOrder, RedisServer, events_in_redis, ledger_in_redis, script_calls, stock_in_redis,
};
use spike_tests::wait_until_async;

const EVENT: &str = "ticket";

/// The order stream replayed: each order's status as its events leave it,
/// with its ticket and buyer. Panics on an event out of place: a change of
/// an order never created, a second change of a closed one.
fn replay(events: &[spike_tests::redis::OrderEvent]) -> HashMap<String, (String, u64, String)> {
    let mut orders: HashMap<String, (String, u64, String)> = HashMap::new();
    for event in events {
        match event.event.as_str() {
            "created" => {
                let created = ("pending".to_owned(), event.ticket, event.buyer.clone());
                assert!(orders.insert(event.order.clone(), created).is_none());
            }
            closed @ ("paid" | "expired") => {
                let order = orders
                    .get_mut(&event.order)
                    .unwrap_or_else(|| panic!("{closed} before created: {event:?}"));
                assert_eq!(
                    order.0, "pending",
                    "a closed order changed again: {event:?}"
                );
                assert_eq!((order.1, &order.2), (event.ticket, &event.buyer));
                order.0 = closed.to_owned();
            }
            other => panic!("an unknown event {other}"),
        }
    }
    orders
}

/// Checks what must hold at every moment, in one consistent read of Redis:
/// no more tickets held than the sale has, the stock's counts agree with
/// the ledger, and no ticket number belongs to two live orders.
fn check_invariants(conn: &mut redis::Connection) -> Result<(), String> {
    let ((stock, records),): ((HashMap<String, u64>, HashMap<String, String>),) = redis::pipe()
        .atomic()
        .hgetall(format!("spike:{{{EVENT}}}:stock"))
        .hgetall(format!("spike:{{{EVENT}}}:ledger"))
        .query(conn)
        .map(|both| (both,))
        .map_err(|err| err.to_string())?;
    let live: Vec<(&str, u64)> = records
        .values()
        .filter_map(|record| {
            let fields: Vec<&str> = record.split('|').collect();
            (fields[0] != "expired").then(|| (fields[0], fields[1].parse().unwrap()))
        })
        .collect();
    let paid = live.iter().filter(|(status, _)| *status == "paid").count() as u64;
    let sold = stock.get("sold").copied().unwrap_or(0);
    let total = stock["total"];
    let tickets: HashSet<u64> = live.iter().map(|&(_, ticket)| ticket).collect();
    if sold > total || live.len() as u64 != sold || paid != stock.get("paid").copied().unwrap_or(0)
    {
        return Err(format!(
            "stock {stock:?} against {} live orders, {paid} paid",
            live.len()
        ));
    }
    if tickets.len() != live.len() || tickets.iter().any(|&t| t == 0 || t > total) {
        return Err(format!("a ticket number in two live orders: {live:?}"));
    }
    Ok(())
}

/// Reads Redis in a loop until stopped, checking the invariants each time;
/// returns how many looks it took, or the first violation.
fn watch_invariants(
    redis: &RedisServer,
) -> (
    Arc<AtomicBool>,
    std::thread::JoinHandle<Result<u64, String>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut conn = redis.conn();
    let watching = std::thread::spawn({
        let stop = Arc::clone(&stop);
        move || {
            let mut looks = 0;
            while !stop.load(Ordering::Relaxed) {
                check_invariants(&mut conn)?;
                looks += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(looks)
        }
    });
    (stop, watching)
}

/// 1,000 tickets, 1,500 named buyers, a pay window of 4 s, 60% of the
/// holders pay: every unpaid ticket expires after the window and is sold
/// again to a buyer who had none, under its own number; nothing is ever
/// held twice, and the order stream replays to the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_tickets_expire_and_are_sold_again_to_others() {
    const TOTAL: u64 = 1_000;
    const BUYERS: usize = 1_500;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(
        dir.path(),
        &redis,
        TOTAL,
        "pay_window = \"4s\"\nsweep_interval = \"50ms\"\n",
    );
    let nodes = start_nodes(&config, &[300; 4]).await;
    let upstreams: Vec<_> = nodes.iter().map(|node| (node.addr(), 1)).collect();
    let balancer = Balancer::start(&upstreams, "");
    let url = balancer.url("");
    let (stop, watching) = watch_invariants(&redis);

    // Everyone tries once.
    let client = Client::new();
    let mut holders: Vec<(usize, String, u64)> = Vec::new();
    let mut without = Vec::new();
    let replies = buy_all(&client, &url, (0..BUYERS).map(|i| format!("b{i}"))).await;
    for (i, (status, order)) in replies.into_iter().enumerate() {
        match (status, order) {
            (200, Some((id, ticket))) => holders.push((i, id, ticket)),
            (409, None) => without.push(i),
            other => panic!("buyer {i}: {other:?}"),
        }
    }
    assert_eq!((holders.len(), without.len()), (1_000, 500));
    let first_tickets: HashSet<u64> = holders.iter().map(|(_, _, t)| *t).collect();
    assert_eq!(first_tickets, (1..=TOTAL).collect(), "numbers 1 to 1,000");

    // 60% of the holders pay at once; the others walk away.
    let paying: Vec<(String, String)> = holders
        .iter()
        .enumerate()
        .filter(|(k, _)| k % 5 < 3)
        .map(|(_, (i, id, _))| (id.clone(), format!("b{i}")))
        .collect();
    for reply in pay_all(&client, &url, &paying).await {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["status"], "paid");
    }
    let expected_paid: HashSet<String> = paying.into_iter().map(|(id, _)| id).collect();
    let mut conn = redis.conn();
    wait_until_async(
        "the unpaid orders to expire",
        Duration::from_secs(15),
        || std::future::ready(stock_in_redis(&mut conn, EVENT).get("expired") == Some(&400)),
    )
    .await;

    // Those who had none buy the returned tickets, through any node, and
    // pay for them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut second: HashMap<usize, (String, u64)> = HashMap::new();
    while stock_in_redis(&mut conn, EVENT)["sold"] < TOTAL {
        assert!(
            Instant::now() < deadline,
            "the returned tickets were not sold again"
        );
        let trying: Vec<_> = without
            .iter()
            .filter(|i| !second.contains_key(i))
            .copied()
            .collect();
        let replies = buy_all(&client, &url, trying.iter().map(|i| format!("b{i}"))).await;
        let mut bought = Vec::new();
        for (i, (status, order)) in trying.into_iter().zip(replies) {
            if let (200, Some((id, ticket))) = (status, order) {
                bought.push((id.clone(), format!("b{i}")));
                second.insert(i, (id, ticket));
            }
        }
        for reply in pay_all(&client, &url, &bought).await {
            assert_eq!(reply.status, 200, "{}", reply.text());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let looks = watching.join().unwrap().unwrap();
    assert!(looks > 10, "the invariants were checked {looks} times");

    // 400 returned tickets, sold again to 400 of those who had none, under
    // the numbers of the expired orders.
    assert_eq!(second.len(), 400);
    let ledger = ledger_in_redis(&mut conn, EVENT);
    let expired_tickets: HashSet<u64> = ledger
        .iter()
        .filter(|o| o.status == "expired")
        .map(|o| o.ticket)
        .collect();
    let resold: HashSet<u64> = second.values().map(|(_, t)| *t).collect();
    assert_eq!(resold, expired_tickets);
    let stock = stock_in_redis(&mut conn, EVENT);
    for (counter, value) in [
        ("sold", 1_000),
        ("paid", 1_000),
        ("expired", 400),
        ("resold", 400),
    ] {
        assert_eq!(stock[counter], value, "{counter}: {stock:?}");
    }
    let paid_first: HashSet<String> = ledger
        .iter()
        .filter(|o| o.status == "paid" && !o.buyer.is_empty() && first_tickets.contains(&o.ticket))
        .filter(|o| !second.values().any(|(id, _)| *id == o.id))
        .map(|o| o.id.clone())
        .collect();
    assert_eq!(
        paid_first, expected_paid,
        "exactly the orders paid stayed paid"
    );

    // The stream replays to exactly the ledger.
    let replayed = replay(&events_in_redis(&mut conn, EVENT));
    assert_eq!(replayed.len(), ledger.len());
    for order in &ledger {
        let (status, ticket, buyer) = &replayed[&order.id];
        assert_eq!(
            (status, *ticket, buyer),
            (&order.status, order.ticket, &order.buyer)
        );
    }
}

/// Hundreds of payments sent around their deadline, with the sweeps
/// running and other buyers waiting for returned tickets: each order ends
/// paid or expired, never both, as its payer was told; and no paid order's
/// ticket belongs to anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_racing_the_deadline_wins_or_loses_whole() {
    const ORDERS: usize = 300;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(
        dir.path(),
        &redis,
        ORDERS as u64,
        "pay_window = \"1s\"\nsweep_interval = \"10ms\"\n",
    );
    let nodes = start_nodes(&config, &[ORDERS as u64; 2]).await;
    let urls: Vec<String> = nodes.iter().map(|node| node.url("")).collect();
    let client = Client::new();
    let mut orders = Vec::new();
    for i in 0..ORDERS {
        let (status, order) = buy(&client, &urls[i % 2], &format!("r{i}")).await;
        assert_eq!(status, 200);
        orders.push(order.unwrap().0);
    }
    let mut conn = redis.conn();
    let deadlines: HashMap<String, u64> = ledger_in_redis(&mut conn, EVENT)
        .into_iter()
        .map(|order| (order.id, order.pay_by))
        .collect();

    // Others keep trying to buy what comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let competitors = tokio::spawn({
        let (client, url, stop) = (client.clone(), urls[1].clone(), Arc::clone(&stop));
        async move {
            let mut j = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = buy(&client, &url, &format!("c{j}")).await;
                j += 1;
            }
        }
    });
    // Each payment at its deadline, give or take up to 20 ms.
    let payments = orders.iter().enumerate().map(|(i, id)| {
        let offset = (i % 9) as i64 * 5 - 20;
        let at_ms = deadlines[id] as i64 + offset;
        let (client, url, id) = (client.clone(), urls[i % 2].clone(), id.clone());
        tokio::spawn(async move {
            let now_ms = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            if at_ms > now_ms {
                tokio::time::sleep(Duration::from_millis((at_ms - now_ms) as u64)).await;
            }
            let reply = pay(&client, &url, &id, &format!("r{i}")).await;
            (id, reply.status.as_u16())
        })
    });
    let mut told = HashMap::new();
    for payment in payments.collect::<Vec<_>>() {
        let (id, status) = payment.await.unwrap();
        told.insert(id, status);
    }
    stop.store(true, Ordering::Relaxed);
    competitors.await.unwrap();

    let ledger: HashMap<String, LedgerOrder> = ledger_in_redis(&mut conn, EVENT)
        .into_iter()
        .map(|order| (order.id.clone(), order))
        .collect();
    let (mut paid, mut expired) = (0, 0);
    for id in &orders {
        let order = &ledger[id];
        let closed = order.closed.expect("every order closed");
        match told[id] {
            200 => {
                assert_eq!(order.status, "paid", "{id} was told paid");
                assert!(closed <= order.pay_by, "{id} paid after its deadline");
                paid += 1;
            }
            409 => {
                assert_eq!(order.status, "expired", "{id} was told expired");
                assert!(closed > order.pay_by, "{id} expired before its deadline");
                expired += 1;
            }
            other => panic!("{id}: {other}"),
        }
    }
    assert!(
        paid > 0 && expired > 0,
        "both sides of the race: {paid} paid, {expired} expired"
    );
    // A paid order's ticket is nobody else's.
    for id in orders.iter().filter(|id| told[*id] == 200) {
        let ticket = ledger[id].ticket;
        let holders: Vec<_> = ledger
            .values()
            .filter(|o| o.ticket == ticket && o.status != "expired")
            .map(|o| o.id.as_str())
            .collect();
        assert_eq!(holders, [id.as_str()], "ticket {ticket}");
    }
    // One close per order in the stream, never two.
    let replayed = replay(&events_in_redis(&mut conn, EVENT));
    for id in &orders {
        assert_eq!(replayed[id].0, ledger[id].status);
    }
    check_invariants(&mut conn).unwrap();
}

/// All nodes but one killed while orders wait for payment: the one left
/// expires them on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_goes_on_while_any_node_runs() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(
        dir.path(),
        &redis,
        100,
        "pay_window = \"1s\"\nsweep_interval = \"50ms\"\n",
    );
    let mut nodes = start_nodes(&config, &[100; 3]).await;
    let client = Client::new();
    for i in 0..60 {
        let (status, _) = buy(&client, &nodes[i % 3].url(""), &format!("k{i}")).await;
        assert_eq!(status, 200);
    }
    for node in &mut nodes[..2] {
        node.signal(Signal::SIGKILL);
        node.wait(Duration::from_secs(5));
    }
    let mut conn = redis.conn();
    wait_until_async("every order to expire", Duration::from_secs(5), || {
        std::future::ready(stock_in_redis(&mut conn, EVENT).get("expired") == Some(&60))
    })
    .await;
    let ledger = redis::cmd("HGETALL")
        .arg(format!("spike:{{{EVENT}}}:ledger"))
        .query::<HashMap<String, String>>(&mut conn)
        .unwrap();
    for record in ledger.values() {
        let fields: Vec<&str> = record.split('|').collect();
        assert_eq!(fields[0], "expired", "{record}");
        let late = fields[6].parse::<u64>().unwrap() - fields[5].parse::<u64>().unwrap();
        assert!(late < 1_000, "expired {late} ms after its deadline");
    }
    assert_eq!(
        stats_of(&nodes[2]).await["expired"],
        60,
        "the last node did it"
    );
}

/// Waits until `order`'s deadline has passed by Redis's clock.
async fn wait_past_deadline(conn: &mut redis::Connection, order: &str) {
    let pay_by = ledger_in_redis(conn, EVENT)
        .into_iter()
        .find(|o| o.id == order)
        .expect("the order in the ledger")
        .pay_by;
    wait_until_async("the deadline to pass", Duration::from_secs(10), || {
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn).unwrap();
        std::future::ready(secs * 1000 + micros / 1000 > pay_by)
    })
    .await;
}

/// A buyer whose order is past its deadline and not swept yet buys again:
/// the old order expires there and then, and a new one is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_order_expires_when_its_buyer_comes_back() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // No sweep within the test: only the purchase can expire the order.
    let config = node_config(
        dir.path(),
        &redis,
        5,
        "pay_window = \"300ms\"\nsweep_interval = \"1h\"\n",
    );
    let nodes = start_nodes(&config, &[5]).await;
    let client = Client::new();
    let url = nodes[0].url("");
    let (_, first) = buy(&client, &url, "x").await;
    let (first, ticket) = first.expect("bought");
    let mut conn = redis.conn();
    wait_past_deadline(&mut conn, &first).await;

    let reply = client.get(&format!("{url}/buy/ticket?user=x")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let again = reply.json();
    assert_eq!(again["existing"], false, "{again}");
    assert_ne!(again["order_id"], first.as_str());
    assert_eq!(again["ticket"], ticket, "its own ticket, back on sale");
    let ledger: HashMap<String, LedgerOrder> = ledger_in_redis(&mut conn, EVENT)
        .into_iter()
        .map(|order| (order.id.clone(), order))
        .collect();
    assert_eq!(ledger[&first].status, "expired");
    let stock = stock_in_redis(&mut conn, EVENT);
    assert_eq!(
        (stock["sold"], stock["expired"], stock["resold"]),
        (1, 1, 1)
    );
    let replayed = replay(&events_in_redis(&mut conn, EVENT));
    assert_eq!(replayed[&first].0, "expired");
    check_invariants(&mut conn).unwrap();
}

/// A node answering a sold-out sale's buyers from memory reads them again
/// once an order has expired and its ticket was sold to another: the
/// first buyer holds nothing any more, the second holds the ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sold_out_node_learns_of_an_expiry_and_a_resale() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let terms = "pay_window = \"500ms\"\nsweep_interval = \"1h\"\n";
    let config = node_config(dir.path(), &redis, 2, terms);
    // Node A looks at the sale every 2 s, node B every 50 ms: the expiry
    // and the resale happen between two of A's looks.
    let slow = tempfile::tempdir().unwrap();
    let slow_config = slow.path().join("node.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("sync_interval = \"50ms\"", "sync_interval = \"2s\"");
    std::fs::write(&slow_config, text).unwrap();
    let a = start_node(&slow_config, "node-a", Some(1));
    let b = start_node(&config, "node-b", Some(1));
    wait_for_redis(&a, "up").await;
    wait_for_redis(&b, "up").await;
    let client = Client::new();
    let (a_url, b_url) = (a.url(""), b.url(""));

    let (_, x) = buy(&client, &a_url, "x").await;
    let (x, ticket) = x.expect("x bought");
    let (_, z) = buy(&client, &b_url, "z").await;
    let (z, _) = z.expect("z bought");
    assert_eq!(pay(&client, &b_url, &z, "z").await.status, 200);
    // A, sold out, answers x from memory once it has read the buyers.
    wait_until_async(
        "node A to know x's order",
        Duration::from_secs(10),
        || async {
            buy(&client, &a_url, "x")
                .await
                .1
                .is_some_and(|(id, _)| id == x)
        },
    )
    .await;

    let mut conn = redis.conn();
    wait_past_deadline(&mut conn, &x).await;
    assert_eq!(pay(&client, &b_url, &x, "x").await.status, 409);
    wait_until_async("y to buy x's ticket", Duration::from_secs(5), || async {
        buy(&client, &b_url, "y").await.0 == 200
    })
    .await;
    let y = ledger_in_redis(&mut conn, EVENT)
        .into_iter()
        .find(|o| o.buyer == "y")
        .expect("y's order");
    assert_eq!(y.ticket, ticket);

    wait_until_async(
        "node A to read the buyers again",
        Duration::from_secs(10),
        || async {
            let x_told = buy(&client, &a_url, "x").await.0;
            let y_told = buy(&client, &a_url, "y").await.1;
            x_told == 409 && y_told.is_some_and(|(id, _)| id == y.id)
        },
    )
    .await;
}

async fn stats_of(node: &Process) -> serde_json::Value {
    Client::new().get(&node.url("/stats")).await.json()
}

/// Before the sale opens, purchases are turned away from memory: Redis
/// runs no script. Once it opens (brought forward in Redis), they sell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_it_opens_a_sale_asks_nothing_of_redis() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let opens_at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600);
    let config = node_config(
        dir.path(),
        &redis,
        10,
        &format!("opens_at = \"{opens_at}\"\n"),
    );
    let nodes = start_nodes(&config, &[10]).await;
    // The script that created the sale is the node's last until it opens.
    let mut conn = redis.conn();
    let before = script_calls(&mut conn);
    let client = Client::new();
    for i in 0..200 {
        let reply = client
            .get(&nodes[0].url(&format!("/buy/ticket?user=early{i}")))
            .await;
        assert_eq!(reply.status, 403, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["error"], "not_open");
        let announced: jiff::Timestamp = body["opens_at"].as_str().unwrap().parse().unwrap();
        assert_eq!(announced.as_millisecond(), opens_at.as_millisecond());
        let wait: u64 = reply.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((3000..=3600).contains(&wait), "Retry-After: {wait}");
    }
    assert_eq!(
        script_calls(&mut conn),
        before,
        "no script before the opening"
    );
    assert_eq!(stats_of(&nodes[0]).await["not_open"], 200);

    // The opening brought forward to now, in Redis: the node reads it.
    let now = jiff::Timestamp::now().as_millisecond();
    let () = redis::cmd("HSET")
        .arg(format!("spike:{{{EVENT}}}:stock"))
        .arg("opens_at")
        .arg(now)
        .query(&mut conn)
        .unwrap();

    wait_until_async("the sale to open", Duration::from_secs(10), || async {
        client
            .get(&nodes[0].url("/buy/ticket?user=late"))
            .await
            .status
            == 200
    })
    .await;
    assert!(script_calls(&mut conn) > before);
    assert_eq!(stock_in_redis(&mut conn, EVENT)["sold"], 1);
    assert_eq!(stats_of(&nodes[0]).await["purchase_scripts"], 1);
}

/// What a payment and a look-up answer, bad input included, and with
/// Redis frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payments_and_look_ups_answer_each_case() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config(dir.path(), &redis, 10, "redis_timeout = \"300ms\"\n");
    let nodes = start_nodes(&config, &[10]).await;
    let balancer = Balancer::start(&[(nodes[0].addr(), 1)], "");
    let url = balancer.url("");
    let client = Client::new();

    let (status, order) = buy(&client, &url, "alice").await;
    assert_eq!(status, 200);
    let (id, ticket) = order.unwrap();
    let pending = client.get(&format!("{url}/orders/{id}")).await.json();
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["ticket"], ticket);
    assert_eq!(pending["buyer"], "alice");
    assert_eq!(pending["node"], "node-1");
    assert!(pending.get("paid_at").is_none());
    let created: jiff::Timestamp = pending["created"].as_str().unwrap().parse().unwrap();
    let pay_by: jiff::Timestamp = pending["pay_by"].as_str().unwrap().parse().unwrap();
    assert_eq!((pay_by - created).as_secs(), 15 * 60, "the default window");

    // Another buyer, or none: 403, nothing changed.
    assert_eq!(pay(&client, &url, &id, "bob").await.status, 403);
    let no_payer = client.post(&format!("{url}/orders/{id}/pay")).await;
    assert_eq!(no_payer.status, 403);
    // The buyer: paid, and paying again changes nothing.
    let paid = pay(&client, &url, &id, "alice").await;
    assert_eq!(paid.status, 200);
    let paid = paid.json();
    assert_eq!(paid["status"], "paid");
    assert!(paid["paid_at"].is_string());
    assert_eq!(pay(&client, &url, &id, "alice").await.json(), paid);
    assert_eq!(client.get(&format!("{url}/orders/{id}")).await.json(), paid);

    // Unknown and malformed ids, a wrong method.
    assert_eq!(pay(&client, &url, "1-0", "alice").await.status, 404);
    assert_eq!(client.get(&format!("{url}/orders/1-0")).await.status, 404);
    for bad in ["abc", "1-2-3", "-1", "1-"] {
        assert_eq!(pay(&client, &url, bad, "alice").await.status, 400, "{bad}");
        assert_eq!(
            client.get(&format!("{url}/orders/{bad}")).await.status,
            400,
            "{bad}"
        );
    }
    assert_eq!(
        client.get(&format!("{url}/orders/{id}/pay")).await.status,
        405
    );

    // An anonymous order is paid by its id alone.
    let anonymous = client.get(&format!("{url}/buy/ticket")).await.json();
    let anonymous = anonymous["order_id"].as_str().unwrap();
    let reply = client.post(&format!("{url}/orders/{anonymous}/pay")).await;
    assert_eq!(reply.status, 200);
    assert!(reply.json()["buyer"].is_null());

    let mut conn = redis.conn();
    let stock = stock_in_redis(&mut conn, EVENT);
    assert_eq!((stock["sold"], stock["paid"]), (2, 2));
    let events = events_in_redis(&mut conn, EVENT);
    assert_eq!(events.len(), 4, "two orders created, two paid: {events:?}");

    // Redis frozen: 503 and Retry-After; the payment's outcome is unknown.
    let (_, order) = buy(&client, &url, "carol").await;
    let (carol, _) = order.unwrap();
    redis.pause();
    let reply = pay(&client, &url, &carol, "carol").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "1");
    assert!(
        reply.json()["detail"]
            .as_str()
            .unwrap()
            .contains("may have been made")
    );
    let reply = client.get(&format!("{url}/orders/{carol}")).await;
    assert_eq!(reply.status, 503);
    redis.resume();
    // Redis ran the payment when it thawed, or never: either way whole,
    // its event and its count with it.
    let status = client.get(&format!("{url}/orders/{carol}")).await.json()["status"].clone();
    assert!(status == "paid" || status == "pending", "{status}");
    check_invariants(&mut conn).unwrap();
    let paid_events = events_in_redis(&mut conn, EVENT)
        .iter()
        .filter(|event| event.event == "paid")
        .count();
    assert_eq!(paid_events, if status == "paid" { 3 } else { 2 });
}
