//! The way to the sale's Redis, however it is set up: one server, the
//! master a set of sentinels names, or a Redis Cluster
//! ([`RedisTarget`]). [`Redis`] knows where Redis is; each [`Link`] made
//! from it is one connection that follows the master by itself, and runs
//! any command or pipeline (it is a [`ConnectionLike`]).
//!
//! - One server: the connection reconnects in the background.
//! - Sentinel: the master's address is asked of the sentinels (the first
//!   that answers, the master it names checked with `ROLE`), again at
//!   least every [`RECHECK`] and at once after a command fails in a way
//!   that says the master may have moved (the connection lost, refused or
//!   timed out, `READONLY`, `MASTERDOWN`); every link then moves to the
//!   new master.
//! - Cluster: the crate's cluster client, which refreshes the slots'
//!   owners when a node answers `MOVED` or `READONLY`; a link makes a new
//!   one when a command's connection fails (a master died). It is told
//!   never to send a command again by itself: a script sent again after
//!   its connection broke could run twice. What may be sent again safely
//!   is decided by the caller ([`never_ran`]).
//!
//! Nothing connects when a link is made: a program can start while no
//! Redis answers, and its first commands fail until one does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::Sentinel;
use redis::{Client, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture, Value};
use spike_config::redis::RedisTarget;

/// How long a master named by the sentinels is used before they are
/// asked again, with no error to say it moved: a master demoted while its
/// connections stayed up is left within about this long.
pub const RECHECK: Duration = Duration::from_secs(1);
/// The shortest time between two lookups the errors of commands ask for,
/// so that an outage does not turn every failed command into one.
const LOOKUP_SPACING: Duration = Duration::from_millis(100);

/// Where the sale's Redis is; makes [`Link`]s. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    kind: Kind,
    config: ConnectionManagerConfig,
}

#[derive(Clone)]
enum Kind {
    Single(Client),
    Sentinel(Arc<Follower>),
    Cluster(Box<ClusterClient>),
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::Single(_) => "single",
            Kind::Sentinel(_) => "sentinel",
            Kind::Cluster(_) => "cluster",
        };
        f.debug_struct("Redis").field("kind", &kind).finish()
    }
}

impl Redis {
    /// The Redis `target` names. Every command fails after `timeout`, or
    /// `timeout + wait` for a command that may wait that long in Redis (a
    /// blocking read, `WAIT`); connecting fails after `timeout`.
    pub fn new(
        target: &RedisTarget,
        timeout: Duration,
        wait: Duration,
    ) -> Result<Self, RedisError> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout + wait))
            // One attempt per command: a purchase must fail fast when
            // Redis is down, and the next command tries to connect again.
            .set_number_of_retries(0);
        let kind = match target {
            RedisTarget::Single(url) => Kind::Single(Client::open(url.as_str())?),
            RedisTarget::Sentinel { sentinels, master } => {
                let urls: Vec<String> = sentinels.iter().map(|s| format!("redis://{s}")).collect();
                Kind::Sentinel(Arc::new(Follower {
                    sentinel: tokio::sync::Mutex::new(Sentinel::build(urls)?),
                    name: master.clone(),
                    timeout,
                    master: ArcSwapOption::empty(),
                    looked: Mutex::new(None),
                    looking: AtomicBool::new(false),
                }))
            }
            RedisTarget::Cluster(nodes) => Kind::Cluster(Box::new(
                ClusterClient::builder(nodes.iter().map(|node| format!("redis://{node}")))
                    .connection_timeout(timeout)
                    .response_timeout(timeout + wait)
                    .retries(0)
                    .build()?,
            )),
        };
        Ok(Self { kind, config })
    }

    /// A new connection, made on its first command.
    pub fn link(&self) -> Result<Link, RedisError> {
        let inner = match &self.kind {
            Kind::Single(client) => Inner::Single(ConnectionManager::new_lazy_with_config(
                client.clone(),
                self.config.clone(),
            )?),
            Kind::Sentinel(follower) => Inner::Sentinel(Arc::new(Followed {
                follower: Arc::clone(follower),
                current: ArcSwapOption::empty(),
                config: self.config.clone(),
            })),
            Kind::Cluster(client) => Inner::Cluster(Arc::new(ClusterLink {
                client: ClusterClient::clone(client),
                conn: tokio::sync::Mutex::new(None),
            })),
        };
        Ok(Link { inner })
    }

    /// Whether this is a Redis Cluster, whose keyless commands go to any
    /// of its nodes.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }
}

/// One connection to the sale's Redis. Clones share it.
#[derive(Clone)]
pub struct Link {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Sentinel(Arc<Followed>),
    Cluster(Arc<ClusterLink>),
}

/// A link's connection to a cluster, made on its first command. The
/// cluster client reconnects to a node whose connection dropped, but asks
/// the cluster who owns the slots again only when a node says so
/// (`MOVED`, `READONLY`): a master that died takes its connection with it,
/// and the link makes a new one (which reads the slots anew) once a
/// command fails that way, at most once per [`LOOKUP_SPACING`].
struct ClusterLink {
    client: ClusterClient,
    conn: tokio::sync::Mutex<Option<(Instant, ClusterConnection)>>,
}

impl ClusterLink {
    async fn connection(&self) -> Result<ClusterConnection, RedisError> {
        let mut conn = self.conn.lock().await;
        if let Some((_, conn)) = &*conn {
            return Ok(conn.clone());
        }
        let made = self.client.get_async_connection().await?;
        *conn = Some((Instant::now(), made.clone()));
        Ok(made)
    }

    /// After a command: forgets the connection if its error says the
    /// master may have moved.
    fn observe(&self, err: Option<&RedisError>) {
        if err.is_some_and(master_may_have_moved) {
            self.forget();
        }
    }

    /// Lets the next command make a new connection, unless this one is
    /// younger than [`LOOKUP_SPACING`] (or being made).
    fn forget(&self) {
        if let Ok(mut conn) = self.conn.try_lock()
            && conn
                .as_ref()
                .is_some_and(|(made, _)| made.elapsed() >= LOOKUP_SPACING)
        {
            *conn = None;
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").finish_non_exhaustive()
    }
}

impl Link {
    /// Says that a command got no answer in time: the master may have
    /// moved.
    pub fn suspect(&self) {
        match &self.inner {
            Inner::Single(_) => {}
            Inner::Sentinel(followed) => followed.follower.look_soon(),
            Inner::Cluster(link) => link.forget(),
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_command(cmd),
            Inner::Sentinel(followed) => Box::pin(async move {
                let mut conn = followed.connection().await?;
                let result = conn.req_packed_command(cmd).await;
                followed.follower.observe(result.as_ref().err());
                result
            }),
            Inner::Cluster(link) => Box::pin(async move {
                let result = link.connection().await?.req_packed_command(cmd).await;
                link.observe(result.as_ref().err());
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.inner {
            Inner::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(followed) => Box::pin(async move {
                let mut conn = followed.connection().await?;
                let result = conn.req_packed_commands(pipeline, offset, count).await;
                followed.follower.observe(result.as_ref().err());
                result
            }),
            Inner::Cluster(link) => Box::pin(async move {
                let result = link
                    .connection()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                link.observe(result.as_ref().err());
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Whether a command that failed with `err` certainly did not run, so
/// that sending it again cannot run it twice: Redis refused it before
/// running it (the slot moved, the cluster or the master is down, this
/// server is a replica now, too few replicas for `min-replicas-to-write`,
/// loading its data), or the connection was refused.
pub fn never_ran(err: &RedisError) -> bool {
    err.is_connection_refusal()
        || matches!(
            err.code(),
            Some(
                "MOVED"
                    | "ASK"
                    | "TRYAGAIN"
                    | "CLUSTERDOWN"
                    | "MASTERDOWN"
                    | "READONLY"
                    | "NOREPLICAS"
                    | "LOADING"
            )
        )
}

/// Whether `err` says that the master may be elsewhere now.
fn master_may_have_moved(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "NOREPLICAS"))
}

/// The master the sentinels name, shared by every link of a [`Redis`].
struct Follower {
    sentinel: tokio::sync::Mutex<Sentinel>,
    name: String,
    timeout: Duration,
    master: ArcSwapOption<Master>,
    /// When the sentinels were last asked, and whether they answered.
    looked: Mutex<Option<(Instant, bool)>>,
    looking: AtomicBool,
}

/// A master's address, numbered each time it changes.
struct Master {
    generation: u64,
    addr: ConnectionAddr,
    client: Client,
}

impl Follower {
    /// The master: the one known, checked again in the background once it
    /// was last checked [`RECHECK`] ago; asked of the sentinels first if
    /// none is known yet.
    async fn master(self: &Arc<Self>) -> Result<Arc<Master>, RedisError> {
        if let Some(master) = self.master.load_full() {
            let looked = *self.looked.lock();
            let due = looked.is_none_or(|(at, _)| at.elapsed() >= RECHECK);
            if due {
                self.look_soon();
            }
            return Ok(master);
        }
        self.look().await?;
        self.master.load_full().ok_or_else(|| {
            RedisError::from((
                ErrorKind::MasterNameNotFoundBySentinel,
                "no sentinel names a master",
            ))
        })
    }

    /// Looks in the background, unless a look is under way or one was
    /// made less than [`LOOKUP_SPACING`] ago.
    fn look_soon(self: &Arc<Self>) {
        let looked = *self.looked.lock();
        let recent = looked.is_some_and(|(at, _)| at.elapsed() < LOOKUP_SPACING);
        if recent || self.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        let follower = Arc::clone(self);
        tokio::spawn(async move {
            let _ = follower.look().await;
            follower.looking.store(false, Ordering::Release);
        });
    }

    /// After a command: looks soon if its error says the master may have
    /// moved.
    fn observe(self: &Arc<Self>, err: Option<&RedisError>) {
        if err.is_some_and(master_may_have_moved) {
            self.look_soon();
        }
    }

    /// Asks the sentinels which server is the master now.
    async fn look(&self) -> Result<(), RedisError> {
        let mut sentinel = self.sentinel.lock().await;
        // Another caller may have just looked while this one waited.
        let looked = *self.looked.lock();
        if self.master.load().is_some()
            && looked.is_some_and(|(at, ok)| ok && at.elapsed() < LOOKUP_SPACING)
        {
            return Ok(());
        }
        let found = tokio::time::timeout(
            self.timeout * 2,
            sentinel.async_master_for(&self.name, None),
        )
        .await
        .unwrap_or_else(|_| {
            Err(RedisError::from((
                ErrorKind::Io,
                "the sentinels did not answer in time",
            )))
        });
        *self.looked.lock() = Some((Instant::now(), found.is_ok()));
        let client = match found {
            Ok(client) => client,
            Err(err) => {
                tracing::warn!(master = %self.name, "no master from the sentinels: {err}");
                return Err(err);
            }
        };
        let addr = client.get_connection_info().addr().clone();
        let known = self.master.load();
        if known.as_ref().is_none_or(|master| master.addr != addr) {
            // Only a lookup, under the sentinels' lock, names a master.
            let generation = known.as_ref().map_or(1, |master| master.generation + 1);
            tracing::warn!(master = %self.name, %addr, "the sentinels name a new master");
            self.master.store(Some(Arc::new(Master {
                generation,
                addr,
                client,
            })));
        }
        Ok(())
    }
}

/// One link's connection to the master the sentinels name, made again
/// when they name another.
struct Followed {
    follower: Arc<Follower>,
    current: ArcSwapOption<(u64, ConnectionManager)>,
    config: ConnectionManagerConfig,
}

impl Followed {
    async fn connection(&self) -> Result<ConnectionManager, RedisError> {
        let master = self.follower.master().await?;
        if let Some(current) = self.current.load_full()
            && current.0 == master.generation
        {
            return Ok(current.1.clone());
        }
        let conn =
            ConnectionManager::new_lazy_with_config(master.client.clone(), self.config.clone())?;
        self.current
            .store(Some(Arc::new((master.generation, conn.clone()))));
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_before_running_may_be_sent_again() {
        let server = |code: &str| {
            let reply = format!("-{code} detail\r\n");
            match redis::parse_redis_value(reply.as_bytes()) {
                Ok(Value::ServerError(err)) => RedisError::from(err),
                other => panic!("{other:?}"),
            }
        };
        for code in ["MOVED", "READONLY", "CLUSTERDOWN", "NOREPLICAS", "LOADING"] {
            assert!(never_ran(&server(code)), "{code}");
        }
        for code in ["ERR", "BUSY", "NOSCRIPT"] {
            assert!(!never_ran(&server(code)), "{code}");
        }
        let dropped = RedisError::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!never_ran(&dropped));
        assert!(master_may_have_moved(&dropped));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(never_ran(&refused));
    }
}
