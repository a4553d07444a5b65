//! Keep-alive connections to one upstream.
//!
//! Each upstream has its own pool: per worker thread, a stack of idle
//! HTTP/1.1 connections, most recently used on top (warm in every cache). A
//! connection is used only by the worker that opened it: its socket is
//! registered with that worker's runtime, and the request that checks it out
//! drives its I/O in the client connection's own task
//! (`spike_http1::client`), so no other thread is ever woken for it. It goes
//! back to its stack when its response has ended. Owning the pool, rather
//! than going through a general-purpose client, gives the proxy what it
//! needs to know:
//!
//! - whether a failure happened before anything was sent (connecting, or a
//!   pooled connection found closed), which is what makes a retry on
//!   another upstream safe;
//! - the upstream a connection belongs to, without hashing a key per
//!   request;
//! - no task per connection or request: a connection returns to its pool
//!   from the response body that ends on it.
//!
//! How a pool opens and keeps connections ([`PoolSettings`]) is part of the
//! routing table in force, passed in with each call.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use spike_config::balancer::ProxySettings;
use spike_http1::client::{ConnectError, Connection};

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

/// The idle connections of one upstream.
#[derive(Debug)]
pub struct ConnectionPool {
    addr: SocketAddr,
    /// One stack per worker, of the connections that worker opened, each
    /// on cache lines of its own (the workers push and pop at every
    /// request). Each is held only to push or pop; never across an
    /// `.await`.
    idle: Box<[CachePadded<Mutex<Vec<Idle>>>]>,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

impl ConnectionPool {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            idle: (0..workers::count())
                .map(|_| CachePadded::new(Mutex::new(Vec::new())))
                .collect(),
        }
    }

    /// A connection ready to send a request at `now`: the most recently
    /// used idle one of this worker that is still open, or a new one.
    pub async fn checkout(
        &self,
        settings: &PoolSettings,
        now: Instant,
    ) -> Result<Connection, ConnectError> {
        while let Some(mut idle) = self.pop() {
            if now.saturating_duration_since(idle.since) <= settings.idle_timeout
                && idle.connection.is_open()
            {
                return Ok(idle.connection);
            }
        }
        // Boxed: connecting is rare, and its state would otherwise be part
        // of every request's future.
        Box::pin(Connection::connect(self.addr, settings.connect_timeout)).await
    }

    /// Returns a connection whose exchange has ended to this worker's
    /// stack, unless the upstream has `max_idle` idle connections already.
    pub fn release(&self, connection: Connection, max_idle: usize, now: Instant) {
        let max_idle = max_idle.div_ceil(self.idle.len());
        let mut idle = self.idle[self.home()].lock();
        if idle.len() < max_idle {
            idle.push(Idle {
                connection,
                since: now,
            });
        }
    }

    /// Closes the connections that have been idle longer than
    /// `idle_timeout`, or that the upstream closed.
    pub fn evict_expired(&self, idle_timeout: Duration) {
        for stack in &self.idle {
            let mut idle = stack.lock();
            idle.retain_mut(|idle| {
                idle.since.elapsed() <= idle_timeout && idle.connection.is_open()
            });
        }
    }

    /// Idle connections, for `/stats`.
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(|stack| stack.lock().len()).sum()
    }

    /// This worker's stack.
    fn home(&self) -> usize {
        workers::index() % self.idle.len()
    }

    fn pop(&self) -> Option<Idle> {
        self.idle[self.home()].lock().pop()
    }
}
