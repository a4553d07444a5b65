//! The sale on Redis with replicas: real `redis-server` masters and
//! replicas, real `redis-sentinel`s and a real Redis Cluster, real nodes,
//! and named buyers buying while a master is SIGKILLed. What the buyers
//! were told is checked against what the last master holds.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use spike_tests::buyers::buy;
use spike_tests::client::Client;
use spike_tests::nodes::{node_config_for, wait_for_redis};
use spike_tests::process::Process;
use spike_tests::redis::{RedisServer, events_in_redis, ledger_in_redis, stock_in_redis};
use spike_tests::replicated::{RedisCluster, Sentinels};

/// How long a buyer keeps asking while the answer is 503.
const PATIENCE: Duration = Duration::from_secs(60);

/// What the buyers of one sale were told.
#[derive(Debug, Default)]
struct Told {
    /// Buyer → (order id, ticket), for every purchase answered 200.
    orders: HashMap<String, (String, u64)>,
    /// Purchases answered 200 while the replicas stalled, before the
    /// master was killed.
    while_stalled: usize,
    /// Purchases answered 200 after the master was killed.
    after_kill: usize,
    /// When the first purchase asked after the kill was answered 200.
    resumed: Option<tokio::time::Instant>,
    /// 503 answers, all told.
    unavailable: usize,
}

/// Where a sale's buyers stand, and how many more purchases may start:
/// the test lets the buyers make an exact number at
/// a time, so that however fast the sale goes, the replicas are cut off
/// and the master killed at the same point of it, with no purchase under
/// way.
#[derive(Debug)]
struct Progress {
    /// Set while the replicas stall.
    stalled: AtomicBool,
    /// Set once the master is killed.
    killed: AtomicBool,
    /// How many more purchases may start; `usize::MAX`: any number.
    allowed: tokio::sync::watch::Sender<usize>,
    /// Purchases under way.
    in_flight: AtomicUsize,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            stalled: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            allowed: tokio::sync::watch::Sender::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }
}

impl Progress {
    /// Waits until a purchase may start, and counts it under way.
    async fn enter(&self) {
        let mut allowed = self.allowed.subscribe();
        loop {
            let mut entered = false;
            // Counted under the lock that `run` reads the count with, so
            // that it never sees a purchase allowed and not yet under way.
            self.allowed.send_if_modified(|left| {
                if *left > 0 {
                    if *left != usize::MAX {
                        *left -= 1;
                    }
                    self.in_flight.fetch_add(1, Ordering::SeqCst);
                    entered = true;
                }
                false
            });
            if entered {
                return;
            }
            let _ = allowed.wait_for(|left| *left > 0).await;
        }
    }

    fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Lets exactly `purchases` more purchases (first asks or asks again)
    /// be made, and waits until they are answered.
    async fn run(&self, purchases: usize) {
        self.allowed.send_replace(purchases);
        spike_tests::wait_until_async("the purchases allowed", PATIENCE, || {
            let done = *self.allowed.borrow() == 0 && self.in_flight.load(Ordering::SeqCst) == 0;
            async move { done }
        })
        .await;
    }

    /// Lets the purchases go on, any number of them.
    fn release(&self) {
        self.allowed.send_replace(usize::MAX);
    }

    /// Marks the master killed now.
    fn kill(&self) -> tokio::time::Instant {
        self.killed.store(true, Ordering::Relaxed);
        tokio::time::Instant::now()
    }
}

/// `count` named buyers `PREFIX-N` buy from `nodes` (each buyer from one,
/// in turn), `concurrency` at a time; each asks again with the same id
/// after a 503, until a 200 or a 409.
async fn buyers(
    nodes: Vec<String>,
    prefix: String,
    count: usize,
    concurrency: usize,
    progress: Arc<Progress>,
) -> Told {
    let told = Arc::new(Mutex::new(Told::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (nodes, told, next, progress) = (
                nodes.clone(),
                Arc::clone(&told),
                Arc::clone(&next),
                Arc::clone(&progress),
            );
            let prefix = prefix.clone();
            tokio::spawn(async move {
                let client = Client::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let buyer = format!("{prefix}-{i}");
                    let url = &nodes[i % nodes.len()];
                    let deadline = tokio::time::Instant::now() + PATIENCE;
                    loop {
                        progress.enter().await;
                        let asked_after_kill = progress.killed.load(Ordering::Relaxed);
                        let answer = buy(&client, url, &buyer).await;
                        progress.leave();
                        match answer {
                            (200, Some(order)) => {
                                let mut told = told.lock();
                                if asked_after_kill {
                                    told.resumed.get_or_insert_with(tokio::time::Instant::now);
                                }
                                if progress.killed.load(Ordering::Relaxed) {
                                    told.after_kill += 1;
                                } else if progress.stalled.load(Ordering::Relaxed) {
                                    told.while_stalled += 1;
                                }
                                told.orders.insert(buyer, order);
                                break;
                            }
                            (409, _) => break,
                            (503, _) => {
                                told.lock().unavailable += 1;
                                assert!(
                                    tokio::time::Instant::now() < deadline,
                                    "{buyer} got 503 for {PATIENCE:?}"
                                );
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            other => panic!("{buyer}: unexpected answer {other:?}"),
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    Arc::into_inner(told).unwrap().into_inner()
}

/// What the store holds of a sale, checked against what its buyers were
/// told.
#[derive(Debug)]
struct Audit {
    /// Orders answered 200 that the store no longer has.
    lost: Vec<String>,
    /// Tickets told to two buyers.
    sold_twice: usize,
    sold: u64,
    total: u64,
}

/// Reads the sale `event` on `conn` and checks that the store agrees with
/// itself: `sold` is the number of live orders, at most the total, no
/// ticket in two live orders, no buyer with two, every live order created
/// in the stream. Returns what it found of the buyers' answers.
fn audit(conn: &mut redis::Connection, event: &str, told: &Told) -> Audit {
    let stock = stock_in_redis(conn, event);
    let (sold, total) = (stock["sold"], stock["total"]);
    let ledger = ledger_in_redis(conn, event);
    let live: Vec<_> = ledger
        .iter()
        .filter(|order| order.status != "expired")
        .collect();
    assert_eq!(sold, live.len() as u64, "sold counts the live orders");
    assert!(sold <= total, "{sold} sold of {total}");
    let tickets: HashSet<u64> = live.iter().map(|order| order.ticket).collect();
    assert_eq!(tickets.len(), live.len(), "a ticket in two live orders");
    let holders: HashSet<&str> = live.iter().map(|order| order.buyer.as_str()).collect();
    assert_eq!(holders.len(), live.len(), "a buyer with two live orders");
    let created: HashSet<String> = events_in_redis(conn, event)
        .into_iter()
        .filter(|e| e.event == "created")
        .map(|e| e.order)
        .collect();
    for order in &live {
        assert!(
            created.contains(&order.id),
            "order {} not in the stream",
            order.id
        );
    }
    let held: HashMap<&str, (&str, u64)> = live
        .iter()
        .map(|order| (order.buyer.as_str(), (order.id.as_str(), order.ticket)))
        .collect();
    let lost = told
        .orders
        .iter()
        .filter(|(buyer, (id, ticket))| {
            held.get(buyer.as_str()) != Some(&(id.as_str(), *ticket)) || !created.contains(id)
        })
        .map(|(buyer, _)| buyer.clone())
        .collect();
    let mut tickets_told = HashSet::new();
    let sold_twice = told
        .orders
        .values()
        .filter(|(_, ticket)| !tickets_told.insert(*ticket))
        .count();
    Audit {
        lost,
        sold_twice,
        sold,
        total,
    }
}

/// Starts a node of `config` selling `event`.
fn start_node(config: &Path, name: &str, event: &str, local_stock: u64) -> Process {
    let local = local_stock.to_string();
    Process::start(
        "node",
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--event",
            event,
            "--local-stock",
            &local,
        ],
        1,
    )
}

/// A sale of `total` tickets on a master with two replicas and three
/// sentinels, two nodes with `replica_acks`, three buyers per ticket; the
/// master SIGKILLed once a third is sold. Returns the audit of the last
/// master and what the buyers were told.
async fn sale_through_a_failover(replica_acks: u32, total: u64, stall: usize) -> (Audit, Told) {
    let mut sentinels = Sentinels::start(2);
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("replica_acks = {replica_acks}\nredis_timeout = \"500ms\"\n");
    let config = node_config_for(dir.path(), &sentinels.node_lines(), total, &extra);
    let nodes: Vec<Process> = (1..=2)
        .map(|i| start_node(&config, &format!("node-{i}"), "ticket", total))
        .collect();
    for node in &nodes {
        wait_for_redis(node, "up").await;
    }
    let urls: Vec<String> = nodes.iter().map(|node| node.url("")).collect();

    let progress = Arc::new(Progress::default());
    let sale = tokio::spawn(buyers(
        urls,
        "buyer".to_owned(),
        3 * total as usize,
        32,
        Arc::clone(&progress),
    ));
    progress.run(total as usize / 3).await;
    let old = sentinels.master_port();
    // The replicas are cut off: stalled (SIGSTOP), and their links closed
    // by the master (so that nothing it writes next reaches them, not even
    // through the kernel's buffers), while the buyers get `stall` more
    // answers; then the master dies and the replicas come back to elect
    // one of them.
    let replicas: Vec<u16> = sentinels
        .servers
        .iter()
        .map(RedisServer::port)
        .filter(|&port| port != old)
        .collect();
    for &port in &replicas {
        sentinels.server(port).pause();
    }
    let _: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query(&mut sentinels.server(old).conn())
        .unwrap();
    progress.stalled.store(true, Ordering::Relaxed);
    progress.run(stall).await;
    sentinels.server(old).kill();
    let killed = progress.kill();
    for &port in &replicas {
        sentinels.server(port).resume();
    }
    progress.release();
    let told = sale.await.unwrap();
    let new = sentinels.wait_for_new_master(old);
    let audit = audit(&mut sentinels.server(new).conn(), "ticket", &told);
    eprintln!(
        "replica_acks = {replica_acks}: {} answered 200 ({} while the replicas stalled, {} after the kill, \
         the first {:?} after it), {} answered 503; \
         the last master holds {} of {}: {} acknowledged orders lost, {} tickets told to two buyers",
        told.orders.len(),
        told.while_stalled,
        told.after_kill,
        told.resumed.map(|at| at - killed),
        told.unavailable,
        audit.sold,
        audit.total,
        audit.lost.len(),
        audit.sold_twice,
    );
    (audit, told)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replica_acks_no_acknowledged_ticket_is_lost_or_sold_twice_on_failover() {
    let (audit, told) = sale_through_a_failover(1, 300, 64).await;
    // While no replica takes the changes, none is acknowledged, but those
    // some replica had taken before the stall (one per buyer at most).
    assert!(
        told.while_stalled <= 32,
        "{} acknowledged",
        told.while_stalled
    );
    assert!(told.after_kill > 0, "the sale went on after the failover");
    assert_eq!(audit.lost, Vec::<String>::new(), "acknowledged orders lost");
    assert_eq!(audit.sold_twice, 0);
    assert_eq!(audit.sold, audit.total, "the sale sold out");
    assert_eq!(told.orders.len() as u64, audit.total);
}

/// Without `replica_acks`, the same failover: the store stays consistent
/// with itself and the sale goes on, but what the master answered while
/// its replicas were cut off is gone, and its tickets are sold again to
/// others: what `replica_acks` prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replica_acks_the_sale_goes_on_and_what_is_lost_is_counted() {
    let (audit, told) = sale_through_a_failover(0, 300, 64).await;
    assert!(told.after_kill > 0, "the sale went on after the failover");
    assert_eq!(audit.sold, audit.total, "the sale sold out");
    // What buyers were told and the store still holds is among its live
    // orders.
    let still_held = told.orders.len() - audit.lost.len();
    assert!(still_held as u64 <= audit.sold);
    assert!(told.while_stalled > 32, "the master sold alone");
    assert!(!audit.lost.is_empty(), "acknowledged orders lost");
    assert!(audit.sold_twice > 0, "tickets told to two buyers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_no_master_answers_sells_once_one_does() {
    let mut sentinels = Sentinels::start(0);
    let port = sentinels.master_port();
    sentinels.server(port).kill();
    let dir = tempfile::tempdir().unwrap();
    let config = node_config_for(dir.path(), &sentinels.node_lines(), 10, "");
    let node = start_node(&config, "early", "ticket", 10);

    let client = Client::new();
    let reply = client.get(&node.url("/buy/ticket?user=ann")).await;
    assert_eq!(reply.status.as_u16(), 503, "{}", reply.text());
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(
        client.get(&node.url("/health")).await.json()["redis"],
        "down"
    );

    sentinels.server(port).restart();
    wait_for_redis(&node, "up").await;
    let (status, order) = buy(&client, &node.url(""), "ann").await;
    assert_eq!(status, 200);
    let mut conn = sentinels.server(port).conn();
    let ledger = ledger_in_redis(&mut conn, "ticket");
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].id, order.unwrap().0);
}

/// Replicas every change waits for are counted: with fewer than
/// `replica_acks` connected, purchases answer 503 and nothing is sold;
/// once they are back, the node sells again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_replicas_and_nothing_is_sold() {
    let master = RedisServer::start();
    let mut replica = RedisServer::replica_of(&master);
    let dir = tempfile::tempdir().unwrap();
    let redis = format!("redis_url = \"{}\"\n", master.url());
    let config = node_config_for(dir.path(), &redis, 10, "replica_acks = 1\n");
    let node = start_node(&config, "safe", "ticket", 10);
    wait_for_redis(&node, "up").await;
    let client = Client::new();
    spike_tests::wait_until_async("the replica to be counted", PATIENCE, || {
        let (client, url) = (client.clone(), node.url(""));
        async move { buy(&client, &url, "ann").await.0 == 200 }
    })
    .await;

    replica.kill();
    // A purchase under way as the replica went may have been made by the
    // master and not confirmed ("outcome unknown"); once the node counts
    // the replicas short, nothing more is even asked of Redis.
    spike_tests::wait_until_async("the node to see the replica gone", PATIENCE, || {
        let (client, url) = (client.clone(), node.url("/buy/ticket?user=bob"));
        async move { client.get(&url).await.json()["error"] == "too_few_replicas" }
    })
    .await;
    let mut conn = master.conn();
    let sold = stock_in_redis(&mut conn, "ticket")["sold"];
    for buyer in ["carol", "dave", "erin"] {
        let reply = client
            .get(&node.url(&format!("/buy/ticket?user={buyer}")))
            .await;
        assert_eq!(reply.status.as_u16(), 503);
        assert_eq!(reply.json()["error"], "too_few_replicas");
    }
    assert_eq!(
        stock_in_redis(&mut conn, "ticket")["sold"],
        sold,
        "nothing sold"
    );

    replica.restart();
    spike_tests::wait_until_async("the node to sell again", PATIENCE, || {
        let (client, url) = (client.clone(), node.url(""));
        async move { buy(&client, &url, "carol").await.0 == 200 }
    })
    .await;
    assert_eq!(stock_in_redis(&mut conn, "ticket")["sold"], sold + 1);
}

/// Three sales at once on a Redis Cluster of three masters with two
/// replicas each, one node per sale with `replica_acks = 1`; the master
/// of the first sale SIGKILLed a third of the way. Every sale ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sales_on_a_cluster_end_exact_through_a_failover() {
    const TOTAL: u64 = 120;
    let mut cluster = RedisCluster::start(2);
    // Three sales whose keys live on three different masters.
    let mut events: Vec<(String, u16)> = Vec::new();
    for i in 0.. {
        let event = format!("sale-{i}");
        let master = cluster.master_of(&format!("spike:{{{event}}}:stock"));
        if events.iter().all(|(_, taken)| *taken != master) {
            events.push((event, master));
        }
        if events.len() == 3 {
            break;
        }
    }
    let masters: HashSet<u16> = events.iter().map(|(_, master)| *master).collect();
    assert_eq!(masters.len(), 3, "the sales spread over the masters");

    let dir = tempfile::tempdir().unwrap();
    let config = node_config_for(
        dir.path(),
        &cluster.node_lines(),
        TOTAL,
        "replica_acks = 1\nredis_timeout = \"500ms\"\n",
    );
    let nodes: Vec<Process> = events
        .iter()
        .map(|(event, _)| start_node(&config, &format!("node-{event}"), event, TOTAL))
        .collect();
    for node in &nodes {
        wait_for_redis(node, "up").await;
    }
    let progress: Vec<Arc<Progress>> = (0..3).map(|_| Arc::default()).collect();
    let sales: Vec<_> = nodes
        .iter()
        .zip(&progress)
        .zip(&events)
        .map(|((node, progress), (event, _))| {
            tokio::spawn(buyers(
                vec![node.url("")],
                event.clone(),
                3 * TOTAL as usize,
                8,
                Arc::clone(progress),
            ))
        })
        .collect();
    // The other two sales go on as they may while the first is stopped a
    // third of the way for its master's death.
    progress[1].release();
    progress[2].release();
    progress[0].run(TOTAL as usize / 3).await;
    let victim = events[0].1;
    cluster.server(victim).kill();
    let killed: Vec<_> = progress.iter().map(|progress| progress.kill()).collect();
    progress[0].release();
    let mut told = Vec::new();
    for sale in sales {
        told.push(sale.await.unwrap());
    }
    assert!(
        told[0].after_kill > 0,
        "the first sale went on after the failover"
    );
    eprintln!(
        "cluster: the first sale resumed {:?} after its master's death",
        told[0].resumed.map(|at| at - killed[0])
    );
    for ((event, _), told) in events.iter().zip(&told) {
        let master = cluster.master_of(&format!("spike:{{{event}}}:stock"));
        assert_ne!(master, victim);
        let audit = audit(&mut cluster.server(master).conn(), event, told);
        assert_eq!(
            audit.lost,
            Vec::<String>::new(),
            "{event}: acknowledged orders lost"
        );
        assert_eq!(audit.sold_twice, 0, "{event}");
        assert_eq!(
            (audit.sold, told.orders.len() as u64),
            (TOTAL, TOTAL),
            "{event}"
        );
    }
}
