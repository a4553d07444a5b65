//! A real `redis-server`, owned by one test.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

/// A `redis-server` child process on an ephemeral loopback port, with its
/// own working directory. Killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// Arguments after the port, directory and persistence settings.
    args: Vec<String>,
    durable: bool,
}

impl RedisServer {
    /// A server that keeps nothing on disk (`--save "" --appendonly no`).
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A server that logs every write to its append-only file before
    /// answering (`appendfsync always`), so that [`RedisServer::restart`]
    /// after [`RedisServer::kill`] comes back with every acknowledged write.
    pub fn start_durable() -> Self {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Self {
        Self::start_args(durable, |_| Vec::new())
    }

    /// A server that keeps nothing on disk, a replica of `master`.
    pub fn replica_of(master: &RedisServer) -> Self {
        let port = master.port.to_string();
        Self::start_args(false, |_| {
            vec!["--replicaof".into(), "127.0.0.1".into(), port.clone()]
        })
    }

    /// A server started with the arguments `args` makes for its port.
    pub fn start_args(durable: bool, args: impl Fn(u16) -> Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        // Another process may take the port between our probe and Redis's
        // bind; try a few.
        for _ in 0..5 {
            let port = free_port();
            let args = args(port);
            if let Some(child) = spawn(port, dir.path(), durable, &args) {
                return Self {
                    child: Some(child),
                    port,
                    dir,
                    args,
                    durable,
                };
            }
        }
        panic!("redis-server did not start on any of 5 ephemeral ports");
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh synchronous connection, for a test's own checks.
    pub fn conn(&self) -> redis::Connection {
        connect(&self.url(), Duration::from_secs(5)).expect("connect to the test's redis-server")
    }

    /// A connection, if the server answers within half a second (it may
    /// have been killed).
    pub fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        connect(&self.url(), Duration::from_millis(500))
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered.
    pub fn pause(&self) {
        self.signal(Signal::SIGSTOP);
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal(Signal::SIGCONT);
    }

    fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("redis-server is running");
        signal::kill(Pid::from_raw(child.id() as i32), signal).expect("signal redis-server");
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(self.port, self.dir.path(), self.durable, &self.args);
        assert!(
            self.child.is_some(),
            "redis-server could not start again on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `redis-server` and waits until it answers PING; `None` if it
/// exited first (its port was taken).
fn spawn(port: u16, dir: &Path, durable: bool, args: &[String]) -> Option<Child> {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", ""])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if durable {
        command.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        command.args(["--appendonly", "no"]);
    }
    command.args(args);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed: the tests need a real one \
             (Debian: `apt-get install -y redis-server`)"
        ),
        Err(err) => panic!("cannot start redis-server: {err}"),
    };
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if child.try_wait().ok().flatten().is_some() {
            return None;
        }
        if ping(&url) {
            return Some(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("redis-server on port {port} did not answer PING within 10s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether a Redis (or a sentinel) answers PING at `url`.
pub fn ping(url: &str) -> bool {
    connect(url, Duration::from_millis(200))
        .and_then(|mut conn| redis::cmd("PING").query::<String>(&mut conn))
        .is_ok()
}

/// A synchronous connection to `url`, given up after `timeout`.
pub fn connect(url: &str, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(url)?.get_connection_with_timeout(timeout)
}

/// A loopback port that was free a moment ago, and that no other call in
/// this test process has returned (tests run in parallel: two of them must
/// not plan on the same port).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("bind an ephemeral port")
            .port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The sale's fields and collection sizes, read straight from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleInRedis {
    pub total: Option<u64>,
    pub sold: u64,
    pub orders: u64,
    pub buyers: u64,
}

/// Reads a sale's truth from Redis, bypassing the node.
pub fn sale_in_redis(conn: &mut redis::Connection, event: &str) -> SaleInRedis {
    let (total, sold): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
        .arg(format!("spike:{{{event}}}:stock"))
        .arg("total")
        .arg("sold")
        .query(conn)
        .expect("HMGET stock");
    let orders: u64 = redis::cmd("XLEN")
        .arg(format!("spike:{{{event}}}:orders"))
        .query(conn)
        .expect("XLEN orders");
    let buyers: u64 = redis::cmd("HLEN")
        .arg(format!("spike:{{{event}}}:buyers"))
        .query(conn)
        .expect("HLEN buyers");
    SaleInRedis {
        total,
        sold: sold.unwrap_or(0),
        orders,
        buyers,
    }
}

/// An order as the sale's ledger holds it, read and parsed by the test
/// itself: `status|ticket|buyer|node|created|pay_by|closed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerOrder {
    pub id: String,
    pub status: String,
    pub ticket: u64,
    pub buyer: String,
    pub pay_by: u64,
    /// When it was paid or expired; `None` while pending.
    pub closed: Option<u64>,
}

/// Every order of a sale's ledger.
pub fn ledger_in_redis(conn: &mut redis::Connection, event: &str) -> Vec<LedgerOrder> {
    let records: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("spike:{{{event}}}:ledger"))
        .query(conn)
        .expect("HGETALL ledger");
    records
        .into_iter()
        .map(|(id, record)| {
            let fields: Vec<&str> = record.split('|').collect();
            assert_eq!(fields.len(), 7, "a ledger record of 7 fields: {record:?}");
            LedgerOrder {
                id,
                status: fields[0].to_owned(),
                ticket: fields[1].parse().expect("a ticket number"),
                buyer: fields[2].to_owned(),
                pay_by: fields[5].parse().expect("a deadline"),
                closed: (!fields[6].is_empty())
                    .then(|| fields[6].parse().expect("a time of closing")),
            }
        })
        .collect()
}

/// One entry of a sale's order stream: a change of one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderEvent {
    /// `created`, `paid` or `expired`.
    pub event: String,
    /// The order: the entry's own id for `created`.
    pub order: String,
    pub ticket: u64,
    pub buyer: String,
}

/// Every entry of a sale's order stream, in order.
pub fn events_in_redis(conn: &mut redis::Connection, event: &str) -> Vec<OrderEvent> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("spike:{{{event}}}:orders"))
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE orders");
    entries
        .into_iter()
        .map(|(id, fields)| {
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.clone())
            };
            let kind = field("event").expect("an event field");
            OrderEvent {
                order: if kind == "created" {
                    id
                } else {
                    field("order").expect("an order field")
                },
                event: kind,
                ticket: field("ticket")
                    .and_then(|t| t.parse().ok())
                    .expect("a ticket"),
                buyer: field("buyer").unwrap_or_default(),
            }
        })
        .collect()
}

/// The counters of a sale's stock hash (`total`, `sold`, `paid`,
/// `expired`, `resold`...), each 0 until set.
pub fn stock_in_redis(
    conn: &mut redis::Connection,
    event: &str,
) -> std::collections::HashMap<String, u64> {
    redis::cmd("HGETALL")
        .arg(format!("spike:{{{event}}}:stock"))
        .query(conn)
        .expect("HGETALL stock")
}

/// How often Redis ran a script (`EVAL` and `EVALSHA`) since it started.
pub fn script_calls(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(conn)
        .expect("INFO commandstats");
    info.lines()
        .filter(|line| line.starts_with("cmdstat_eval:") || line.starts_with("cmdstat_evalsha:"))
        .filter_map(|line| {
            line.split_once("calls=")?
                .1
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}
