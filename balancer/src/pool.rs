//! Keep-alive connections to one upstream.
//!
//! Each upstream has its own pool: per worker thread, a stack of idle HTTP/1
//! connections, most recently used on top (warm in every cache). A
//! connection's I/O is driven by a task on the worker that opened it, its
//! home: a request checks out a connection of its own worker's stack first,
//! then one of another worker's (the pool is shared by all threads), and
//! only then opens one; the connection goes back to its home stack when its
//! response has ended. Owning the pool, rather than going through a
//! general-purpose client, gives the proxy what it needs to know:
//!
//! - whether a failure happened before anything was sent (connecting, or a
//!   pooled connection found closed), which is what makes a retry on
//!   another upstream safe;
//! - the upstream a connection belongs to, without hashing a key per
//!   request;
//! - no task per request: a connection returns to its pool from the
//!   response body that ends on it;
//! - which thread drives each connection, so a request uses its own
//!   thread's connections first.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use spike_config::balancer::ProxySettings;

use crate::body::RequestBody;
use crate::upstream::FailoverReason;
use crate::workers;

/// How a pool opens and keeps connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed, not reused.
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl From<&ProxySettings> for PoolSettings {
    fn from(proxy: &ProxySettings) -> Self {
        Self {
            connect_timeout: proxy.connect_timeout,
            idle_timeout: proxy.idle_timeout,
            max_idle: proxy.max_idle_per_upstream,
        }
    }
}

/// Why no connection to the upstream could be had. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnectError {
    /// How a failover caused by this error is counted.
    pub fn failover_reason(&self) -> FailoverReason {
        match self {
            ConnectError::Timeout(_) => FailoverReason::ConnectTimeout,
            ConnectError::Io(_) | ConnectError::Handshake(_) => FailoverReason::Connect,
        }
    }
}

/// The idle connections of one upstream.
#[derive(Debug)]
pub struct ConnectionPool {
    addr: SocketAddr,
    /// From the configuration in force; a reload replaces them.
    settings: ArcSwap<PoolSettings>,
    /// One stack per worker, of the connections that worker drives. Each is
    /// held only to push or pop; never across an `.await`.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// A connection checked out for one request.
#[derive(Debug)]
pub struct Connection {
    pub sender: SendRequest<RequestBody>,
    /// The worker whose runtime drives it, and whose stack it returns to.
    home: usize,
}

impl ConnectionPool {
    pub fn new(addr: SocketAddr, settings: PoolSettings) -> Self {
        Self {
            addr,
            settings: ArcSwap::from_pointee(settings),
            idle: (0..workers::count())
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
        }
    }

    /// Applies the settings of a new configuration.
    pub fn configure(&self, settings: PoolSettings) {
        if **self.settings.load() != settings {
            self.settings.store(Arc::new(settings));
        }
    }

    /// A connection ready to send a request: the most recently used idle
    /// one that is still open, this worker's first, or a new one.
    pub async fn checkout(&self) -> Result<Connection, ConnectError> {
        let settings = self.settings.load_full();
        let me = workers::index() % self.idle.len();
        let homes = (0..self.idle.len()).map(|i| (me + i) % self.idle.len());
        for home in homes {
            while let Some(mut idle) = self.pop(home) {
                if idle.since.elapsed() > settings.idle_timeout || idle.sender.is_closed() {
                    continue;
                }
                // A connection returned as its response ended may still be
                // finishing it; `ready` waits for that, and fails if the
                // upstream closed it meanwhile.
                if idle.sender.ready().await.is_ok() {
                    return Ok(Connection {
                        sender: idle.sender,
                        home,
                    });
                }
            }
        }
        let sender = self.connect(settings.connect_timeout).await?;
        Ok(Connection { sender, home: me })
    }

    /// Returns a connection whose exchange has ended to its home stack.
    pub fn release(&self, connection: Connection) {
        if connection.sender.is_closed() {
            return;
        }
        let max_idle = self.settings.load().max_idle.div_ceil(self.idle.len());
        let mut idle = self.idle[connection.home].lock().expect("pool lock");
        if idle.len() < max_idle {
            idle.push(Idle {
                sender: connection.sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections that have been idle longer than the idle
    /// timeout, or that the upstream closed.
    pub fn evict_expired(&self) {
        let timeout = self.settings.load().idle_timeout;
        for stack in &self.idle {
            let mut idle = stack.lock().expect("pool lock");
            idle.retain(|conn| conn.since.elapsed() <= timeout && !conn.sender.is_closed());
        }
    }

    /// Idle connections, for `/stats`.
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|stack| stack.lock().expect("pool lock").len())
            .sum()
    }

    fn pop(&self, home: usize) -> Option<Idle> {
        self.idle[home].lock().expect("pool lock").pop()
    }

    async fn connect(&self, timeout: Duration) -> Result<SendRequest<RequestBody>, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(upstream = %addr, error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}
