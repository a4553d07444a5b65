//! Keep-alive connections to one upstream.
//!
//! Each upstream has its own pool: per worker thread, a stack of idle
//! HTTP/1 connections, most recently used on top (warm in every cache). A
//! connection is used only by the worker that opened it: its socket is
//! registered with that worker's runtime, and the request that checks it out
//! drives its I/O in the client connection's own task ([`crate::h1`]), so
//! no other thread is ever woken for it. It goes back to its stack when its
//! response has ended. Owning the pool, rather than going through a
//! general-purpose client, gives the proxy what it needs to know:
//!
//! - whether a failure happened before anything was sent (connecting, or a
//!   pooled connection found closed), which is what makes a retry on
//!   another upstream safe;
//! - the upstream a connection belongs to, without hashing a key per
//!   request;
//! - no task per connection or request: a connection returns to its pool
//!   from the response body that ends on it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use spike_config::balancer::ProxySettings;

use crate::h1::Upstream;
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
}

impl ConnectError {
    /// How a failover caused by this error is counted.
    pub fn failover_reason(&self) -> FailoverReason {
        match self {
            ConnectError::Timeout(_) => FailoverReason::ConnectTimeout,
            ConnectError::Io(_) => FailoverReason::Connect,
        }
    }
}

/// The idle connections of one upstream.
#[derive(Debug)]
pub struct ConnectionPool {
    addr: SocketAddr,
    /// From the configuration in force; a reload replaces them.
    settings: ArcSwap<PoolSettings>,
    /// One stack per worker, of the connections that worker opened. Each is
    /// held only to push or pop; never across an `.await`.
    idle: Box<[Mutex<Vec<Idle>>]>,
}

#[derive(Debug)]
struct Idle {
    upstream: Upstream,
    since: Instant,
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
    /// one of this worker that is still open, or a new one.
    pub async fn checkout(&self) -> Result<Upstream, ConnectError> {
        let settings = self.settings.load_full();
        while let Some(mut idle) = self.pop() {
            if idle.since.elapsed() <= settings.idle_timeout && idle.upstream.is_open() {
                return Ok(idle.upstream);
            }
        }
        // Boxed: connecting is rare, and its state would otherwise be part
        // of every request's future.
        Box::pin(self.connect(settings.connect_timeout)).await
    }

    /// Returns a connection whose exchange has ended to this worker's stack.
    pub fn release(&self, upstream: Upstream) {
        let max_idle = self.settings.load().max_idle.div_ceil(self.idle.len());
        let mut idle = self.idle[self.home()].lock().expect("pool lock");
        if idle.len() < max_idle {
            idle.push(Idle {
                upstream,
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
            idle.retain_mut(|conn| conn.since.elapsed() <= timeout && conn.upstream.is_open());
        }
    }

    /// Idle connections, for `/stats`.
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|stack| stack.lock().expect("pool lock").len())
            .sum()
    }

    /// This worker's stack.
    fn home(&self) -> usize {
        workers::index() % self.idle.len()
    }

    fn pop(&self) -> Option<Idle> {
        self.idle[self.home()].lock().expect("pool lock").pop()
    }

    async fn connect(&self, timeout: Duration) -> Result<Upstream, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        Ok(Upstream::new(stream))
    }
}
