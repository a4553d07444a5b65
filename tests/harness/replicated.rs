//! Redis with replicas, as a test's sale runs on it: a master with
//! replicas watched by real `redis-sentinel` processes ([`Sentinels`]), or
//! a real Redis Cluster made by `redis-cli --cluster create`
//! ([`RedisCluster`]). Every server is on an ephemeral loopback port and
//! stopped on drop.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::redis::{RedisServer, connect, free_port, ping};
use crate::wait_until;

/// The name the sentinels know the master by.
pub const MASTER_NAME: &str = "sale";
/// How long a server or a setup may take to be ready.
const READY: Duration = Duration::from_secs(30);

/// A master, its replicas and three sentinels that watch them, quick to
/// fail over: a master that does not answer for 1 s is down.
#[derive(Debug)]
pub struct Sentinels {
    /// Every data server, the first started as the master.
    pub servers: Vec<RedisServer>,
    pub sentinels: Vec<Sentinel>,
}

impl Sentinels {
    /// A master with `replicas` replicas, every replica in sync, and three
    /// sentinels that each know the master, its replicas and one another.
    pub fn start(replicas: usize) -> Self {
        let master = RedisServer::start();
        let mut servers = vec![master];
        for _ in 0..replicas {
            servers.push(RedisServer::replica_of(&servers[0]));
        }
        wait_until("the replicas to be in sync", READY, || {
            let info = info(&servers[0], "replication");
            info.get("connected_slaves").map(String::as_str) == Some(&replicas.to_string())
                && servers[1..].iter().all(|replica| {
                    info_field(replica, "replication", "master_link_status").as_deref()
                        == Some("up")
                })
        });
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(&servers[0])).collect();
        for sentinel in &sentinels {
            wait_until("a sentinel to know the whole setup", READY, || {
                let mut conn = sentinel.conn();
                let known_replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(MASTER_NAME)
                    .query(&mut conn)
                    .unwrap_or_default();
                let known_sentinels: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg(MASTER_NAME)
                    .query(&mut conn)
                    .unwrap_or_default();
                known_replicas.len() == replicas && known_sentinels.len() == 2
            });
        }
        Self { servers, sentinels }
    }

    /// The sentinels' addresses, as `redis_sentinels` takes them.
    pub fn addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|sentinel| format!("127.0.0.1:{}", sentinel.port))
            .collect()
    }

    /// The lines of `node.toml` that point a node at this setup.
    pub fn node_lines(&self) -> String {
        let list: Vec<String> = self
            .addresses()
            .iter()
            .map(|address| format!("\"{address}\""))
            .collect();
        format!(
            "redis_sentinels = [{}]\nredis_master = \"{MASTER_NAME}\"\n",
            list.join(", ")
        )
    }

    /// The port of the master the first sentinel that answers names.
    pub fn master_port(&self) -> u16 {
        for sentinel in &self.sentinels {
            let Ok(mut conn) = sentinel.try_conn() else {
                continue;
            };
            let named: redis::RedisResult<(String, String)> = redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME)
                .query(&mut conn);
            if let Ok((_, port)) = named {
                return port.parse().expect("a port");
            }
        }
        panic!("no sentinel names a master");
    }

    /// The data server on `port`.
    pub fn server(&mut self, port: u16) -> &mut RedisServer {
        self.servers
            .iter_mut()
            .find(|server| server.port() == port)
            .expect("a server of the setup")
    }

    /// Waits until the sentinels name a master other than the one on
    /// `old`, and it says it is one; returns its port.
    pub fn wait_for_new_master(&self, old: u16) -> u16 {
        let mut port = old;
        wait_until("the sentinels to promote a replica", READY, || {
            port = self.master_port();
            port != old
                && self
                    .servers
                    .iter()
                    .find(|server| server.port() == port)
                    .and_then(|server| info_field(server, "replication", "role"))
                    .as_deref()
                    == Some("master")
        });
        port
    }
}

/// One `redis-sentinel` (`redis-server --sentinel`), with its own
/// configuration file, which it rewrites as it learns.
#[derive(Debug)]
pub struct Sentinel {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Sentinel {
    /// A sentinel watching `master`: quorum 2, down after 1 s.
    fn start(master: &RedisServer) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        for _ in 0..5 {
            let port = free_port();
            let path = dir.path().join("sentinel.conf");
            let text = format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n",
                dir = dir.path().display(),
                master = master.port(),
            );
            std::fs::write(&path, text).expect("write sentinel.conf");
            let mut child = Command::new("redis-server")
                .arg(&path)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start redis-server --sentinel");
            let mut sentinel = None;
            wait_until("a sentinel to answer", READY, || {
                if child.try_wait().ok().flatten().is_some() {
                    return true;
                }
                let answers = ping(&format!("redis://127.0.0.1:{port}"));
                if answers {
                    sentinel = Some(port);
                }
                answers
            });
            if sentinel.is_some() {
                return Self {
                    child,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("redis-server --sentinel did not start on any of 5 ephemeral ports");
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        connect(
            &format!("redis://127.0.0.1:{}", self.port),
            Duration::from_secs(2),
        )
    }

    fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connect to a sentinel")
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Redis Cluster of three masters, each with `replicas` replicas, made
/// with `redis-cli --cluster create`; a node that stops answering for 1 s
/// is failed over.
#[derive(Debug)]
pub struct RedisCluster {
    pub servers: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(replicas: usize) -> Self {
        let servers: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| {
                RedisServer::start_args(false, |_| {
                    [
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        // The bus port is port + 10000 unless set, which
                        // may not exist for an ephemeral port.
                        "--cluster-port",
                        &free_port().to_string(),
                    ]
                    .map(String::from)
                    .to_vec()
                })
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for server in &servers {
            create.arg(server.address());
        }
        let output = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        let cluster = Self { servers };
        wait_until("the cluster to be ok everywhere", READY, || {
            cluster.servers.iter().all(|server| {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut server.conn())
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
            }) && cluster.masters().len() == 3
        });
        cluster
    }

    /// The lines of `node.toml` that point a node at this cluster.
    pub fn node_lines(&self) -> String {
        let list: Vec<String> = self
            .servers
            .iter()
            .map(|server| format!("\"{}\"", server.address()))
            .collect();
        format!("redis_cluster = [{}]\n", list.join(", "))
    }

    /// The port of the master of every slot, as the first server that
    /// answers sees it.
    fn slot_owners(&self) -> Vec<(u16, u16, u16)> {
        for server in &self.servers {
            let Ok(mut conn) = server.try_conn() else {
                continue;
            };
            let Ok(ranges) = redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query::<Vec<Vec<redis::Value>>>(&mut conn)
            else {
                continue;
            };
            // Each range: first slot, last slot, [master host, port, ...], replicas...
            return ranges
                .into_iter()
                .filter_map(|range| {
                    let mut range = range.into_iter();
                    let from = redis::from_redis_value(range.next()?).ok()?;
                    let to = redis::from_redis_value(range.next()?).ok()?;
                    let master: Vec<redis::Value> = redis::from_redis_value(range.next()?).ok()?;
                    let port = redis::from_redis_value(master.into_iter().nth(1)?).ok()?;
                    Some((from, to, port))
                })
                .collect();
        }
        panic!("no server of the cluster answers CLUSTER SLOTS");
    }

    /// The masters' ports.
    pub fn masters(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.slot_owners().iter().map(|&(_, _, p)| p).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// The port of the master that holds `key`.
    pub fn master_of(&self, key: &str) -> u16 {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.any_conn())
            .expect("CLUSTER KEYSLOT");
        self.slot_owners()
            .into_iter()
            .find(|&(from, to, _)| (from..=to).contains(&slot))
            .map(|(_, _, port)| port)
            .expect("every slot has a master")
    }

    /// A connection to any server that answers.
    pub fn any_conn(&self) -> redis::Connection {
        self.servers
            .iter()
            .find_map(|server| server.try_conn().ok())
            .expect("a server of the cluster answers")
    }

    /// The data server on `port`.
    pub fn server(&mut self, port: u16) -> &mut RedisServer {
        self.servers
            .iter_mut()
            .find(|server| server.port() == port)
            .expect("a server of the cluster")
    }
}

/// A section of `INFO`, as fields.
pub fn info(server: &RedisServer, section: &str) -> HashMap<String, String> {
    let Ok(mut conn) = server.try_conn() else {
        return HashMap::new();
    };
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query(&mut conn)
        .unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(key, value)| (key.to_owned(), value.trim().to_owned()))
        .collect()
}

fn info_field(server: &RedisServer, section: &str, field: &str) -> Option<String> {
    info(server, section).remove(field)
}
