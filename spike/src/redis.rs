//! A Redis for the sale: the one at the configured URL, or, if none answers
//! there, a `redis-server` that `spike` starts itself; or a local Sentinel
//! setup that `spike` starts and stops ([`SentinelPlan`]).

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use spike_config::redis::RedisTarget;

use crate::children::{Launch, Running};

/// How long a new `redis-server` may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a Redis has to answer PING.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a Redis answers PING at `url` (something else listening there,
/// say an HTTP server, does not).
pub fn answers(url: &str) -> bool {
    query::<String>(url, &redis::cmd("PING")).is_some()
}

/// Makes sure a Redis answers at `url`: `None` if one already does, else a
/// `redis-server` started on its port (kept in memory only, logging to
/// `log_dir`, its folder under `data_dir`). Fails if the URL is not on this
/// machine or `redis-server` is not installed.
pub async fn ensure(url: &str, log_dir: &Path, data_dir: &Path) -> anyhow::Result<Option<Running>> {
    if answers(url) {
        return Ok(None);
    }
    let info = redis::Client::open(url)
        .with_context(|| format!("invalid Redis URL {url}"))?
        .get_connection_info()
        .clone();
    let port = match &info.addr() {
        redis::ConnectionAddr::Tcp(host, port) if is_local(host) => *port,
        _ => bail!(
            "no Redis answers at {url}, which is not on this machine: start it, or point redis_url in node.toml at one"
        ),
    };
    if which("redis-server").is_none() {
        bail!(
            "no Redis answers at {url} and redis-server is not installed (Debian: apt-get install -y redis-server)"
        );
    }
    let launch = Launch::program("redis", "redis-server", in_memory(port, data_dir)?, log_dir)?;
    let mut running = launch.start().await?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !answers(url) {
        if let Some(status) = running.exited() {
            bail!(
                "redis-server exited ({status}): {}",
                crate::children::last_line(launch.log())
            );
        }
        if tokio::time::Instant::now() > deadline {
            running.terminate();
            running.wait(Duration::from_secs(1)).await;
            bail!("redis-server did not answer at {url} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(running))
}

/// The arguments of a `redis-server` on loopback port `port` that starts
/// empty and keeps nothing: it saves nothing, and its folder
/// (`data_dir/redis-PORT`, where a replica's full sync writes the master's
/// copy, which a server loads when it starts) is emptied first.
fn in_memory(port: u16, data_dir: &Path) -> anyhow::Result<Vec<OsString>> {
    let dir = std::path::absolute(data_dir.join(format!("redis-{port}")))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let port = port.to_string();
    let mut args: Vec<OsString> = [
        "--port",
        &port,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    args.push(dir.into_os_string());
    Ok(args)
}

fn is_local(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// The name the sentinels of `spike up --sentinel` know the master by.
pub const MASTER_NAME: &str = "spike";

/// A local Redis Sentinel setup, as `spike up --sentinel` runs the sale on
/// it: a master, two replicas (so that after one failover the new master
/// still has one for `replica_acks = 1`), and three sentinels (quorum 2),
/// on loopback ports free when it was planned.
#[derive(Debug, Clone)]
pub struct SentinelPlan {
    /// The master's port, then the replicas'.
    pub servers: [u16; 3],
    pub sentinels: [u16; 3],
}

impl SentinelPlan {
    /// Six loopback ports, free now.
    pub fn new() -> anyhow::Result<Self> {
        let listeners = (0..6)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot find free ports for the Sentinel setup")?;
        let mut ports = listeners
            .iter()
            .map(|listener| listener.local_addr().map(|addr| addr.port()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || ports.next().expect("six ports");
        Ok(Self {
            servers: [next(), next(), next()],
            sentinels: [next(), next(), next()],
        })
    }

    /// How the nodes and the order service find the master.
    pub fn target(&self) -> RedisTarget {
        RedisTarget::Sentinel {
            sentinels: self
                .sentinels
                .iter()
                .map(|port| format!("127.0.0.1:{port}"))
                .collect(),
            master: MASTER_NAME.to_owned(),
        }
    }

    /// Starts the servers (in memory only), waits until both replicas are
    /// in sync, then starts the sentinels (their files in `data_dir`, which
    /// they rewrite) and waits until each knows the whole setup, so that a
    /// master killed at once is failed over. The children, master first.
    pub async fn start(&self, log_dir: &Path, data_dir: &Path) -> anyhow::Result<Vec<Running>> {
        if which("redis-server").is_none() {
            bail!("--sentinel needs redis-server (Debian: apt-get install -y redis-server)");
        }
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let mut children = Vec::new();
        let master = self.servers[0].to_string();
        for (i, port) in self.servers.iter().enumerate() {
            let mut args = in_memory(*port, data_dir)?;
            if i > 0 {
                args.extend(["--replicaof", "127.0.0.1", &master].map(OsString::from));
            }
            let name = if i == 0 {
                "redis-master".to_owned()
            } else {
                format!("redis-replica-{i}")
            };
            let launch = Launch::program(&name, "redis-server", args, log_dir)?;
            children.push(launch.start().await?);
        }
        let master_url = format!("redis://127.0.0.1:{master}");
        until("the replicas to be in sync", || {
            info_field(&master_url, "replication", "connected_slaves").as_deref() == Some("2")
        })
        .await?;
        for (i, port) in self.sentinels.iter().enumerate() {
            let conf = std::path::absolute(data_dir.join(format!("sentinel-{}.conf", i + 1)))?;
            let text = format!(
                "port {port}\nbind 127.0.0.1\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 2000\n\
                 sentinel failover-timeout {MASTER_NAME} 10000\n"
            );
            std::fs::write(&conf, text)
                .with_context(|| format!("cannot write {}", conf.display()))?;
            let args = vec![conf.into_os_string(), OsString::from("--sentinel")];
            let launch = Launch::program(
                &format!("sentinel-{}", i + 1),
                "redis-server",
                args,
                log_dir,
            )?;
            children.push(launch.start().await?);
        }
        for port in self.sentinels {
            let url = format!("redis://127.0.0.1:{port}");
            until("the sentinels to know the setup", || {
                let count = |what: &str| {
                    query::<Vec<redis::Value>>(
                        &url,
                        redis::cmd("SENTINEL").arg(what).arg(MASTER_NAME),
                    )
                    .map_or(0, |list| list.len())
                };
                count("REPLICAS") == 2 && count("SENTINELS") == 2
            })
            .await?;
        }
        Ok(children)
    }
}

/// Polls `condition` until it holds, for up to [`START_TIMEOUT`].
async fn until(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !condition() {
        if tokio::time::Instant::now() > deadline {
            bail!("timed out after {START_TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One command to the Redis at `url`, bounded by [`PING_TIMEOUT`].
fn query<T: redis::FromRedisValue>(url: &str, cmd: &redis::Cmd) -> Option<T> {
    let mut conn = redis::Client::open(url)
        .and_then(|client| client.get_connection_with_timeout(PING_TIMEOUT))
        .ok()?;
    conn.set_read_timeout(Some(PING_TIMEOUT)).ok()?;
    conn.set_write_timeout(Some(PING_TIMEOUT)).ok()?;
    cmd.query(&mut conn).ok()
}

/// One field of a section of `INFO`.
fn info_field(url: &str, section: &str, field: &str) -> Option<String> {
    let text: String = query(url, redis::cmd("INFO").arg(section))?;
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| *key == field)
        .map(|(_, value)| value.trim().to_owned())
}
