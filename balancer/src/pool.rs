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
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_utils::CachePadded;
use parking_lot::Mutex;
use spike_config::balancer::ProxySettings;
use spike_http1::client::{ConnectError, Connection, Pipeline};

use crate::workers;

/// How a pool opens and keeps connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed, not reused.
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// The most requests a pipeline carries at once; 1: no pipelines.
    pub pipeline_depth: u32,
}

impl From<&ProxySettings> for PoolSettings {
    fn from(proxy: &ProxySettings) -> Self {
        Self {
            connect_timeout: proxy.connect_timeout,
            idle_timeout: proxy.idle_timeout,
            max_idle: proxy.max_idle_per_upstream,
            pipeline_depth: proxy.pipeline_depth,
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
    /// One list per worker of the pipelines it opened, in the order they
    /// were opened.
    pipelines: Box<[CachePadded<Mutex<Pipelines>>]>,
}

#[derive(Debug, Default)]
struct Pipelines {
    pipelines: Vec<Piped>,
    /// The one that took the last request.
    last: usize,
    /// Pipelines being opened.
    connecting: usize,
    /// Requests waiting for them, to go on them once open.
    waiters: Vec<Waker>,
    /// How many times the waiters were woken, so that one is listed once
    /// each time.
    round: u64,
}

impl Pipelines {
    /// The one that took the last request if it has room, else the first
    /// that has. One that has been idle longer than `idle_timeout` is
    /// dropped, as an idle connection is: its upstream may be closing it.
    fn with_room(&mut self, depth: u64, idle_timeout: Duration, now: Instant) -> Option<Pipeline> {
        let mut at = self.last;
        for _ in 0..=self.pipelines.len() {
            let Some(piped) = self.pipelines.get_mut(at) else {
                at = 0;
                continue;
            };
            let stale = now.saturating_duration_since(piped.since) > idle_timeout;
            match piped.pipeline.room(depth) {
                Some(true) if stale && piped.pipeline.in_flight() == 0 => {
                    self.pipelines.remove(at);
                }
                Some(true) => {
                    piped.since = now;
                    self.last = at;
                    return Some(piped.pipeline.clone());
                }
                Some(false) => at += 1,
                None => {
                    self.pipelines.remove(at);
                }
            }
        }
        None
    }
}

/// A pipeline being opened: once it is (or failed, or was given up),
/// the requests waiting for it look again.
struct Opening<'a> {
    list: &'a Mutex<Pipelines>,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut list = self.list.lock();
        list.connecting -= 1;
        list.round += 1;
        list.waiters.drain(..).for_each(Waker::wake);
    }
}

#[derive(Debug)]
struct Piped {
    pipeline: Pipeline,
    /// When it last took a request.
    since: Instant,
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
            pipelines: (0..workers::count())
                .map(|_| CachePadded::new(Mutex::new(Pipelines::default())))
                .collect(),
        }
    }

    /// A pipeline of this worker with room for a request at `now`: the one
    /// that took the last request if it has room, else the first that
    /// has (so that the requests of one round of the worker go out
    /// together, on as few connections as can carry them); else one being
    /// opened, once it is, while it has room to spare; else a new one.
    /// Pipelines broken or closed are dropped on the way.
    pub async fn pipeline(
        &self,
        settings: &PoolSettings,
        now: Instant,
    ) -> Result<Pipeline, ConnectError> {
        let depth = u64::from(settings.pipeline_depth);
        let list = &self.pipelines[self.home()];
        let mut waiting = None;
        let found = std::future::poll_fn(|cx| {
            let mut list = list.lock();
            if let Some(pipeline) = list.with_room(depth, settings.idle_timeout, now) {
                return Poll::Ready(Some(pipeline));
            }
            let spare = list.connecting * (depth as usize - 1);
            if waiting == Some(list.round) {
                return Poll::Pending;
            }
            if list.waiters.len() < spare {
                list.waiters.push(cx.waker().clone());
                waiting = Some(list.round);
                return Poll::Pending;
            }
            list.connecting += 1;
            Poll::Ready(None)
        })
        .await;
        if let Some(pipeline) = found {
            return Ok(pipeline);
        }
        // Those waiting for it look again once it is open, or failed.
        let opening = Opening { list };
        let pipeline = Box::pin(Pipeline::connect(self.addr, settings.connect_timeout)).await?;
        let mut pipelines = opening.list.lock();
        pipelines.last = pipelines.pipelines.len();
        pipelines.pipelines.push(Piped {
            pipeline: pipeline.clone(),
            since: now,
        });
        drop(pipelines);
        drop(opening);
        Ok(pipeline)
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
        for list in &self.pipelines {
            list.lock().pipelines.retain(|piped| {
                piped.pipeline.room(1).is_some()
                    && (piped.pipeline.in_flight() > 0 || piped.since.elapsed() <= idle_timeout)
            });
        }
    }

    /// Idle connections (pipelines carrying nothing included), for
    /// `/stats`.
    pub fn idle_count(&self) -> usize {
        let idle: usize = self.idle.iter().map(|stack| stack.lock().len()).sum();
        let piped = self.pipelines.iter().map(|list| {
            let list = list.lock();
            list.pipelines
                .iter()
                .filter(|piped| piped.pipeline.in_flight() == 0)
                .count()
        });
        idle + piped.sum::<usize>()
    }

    /// This worker's stack.
    fn home(&self) -> usize {
        workers::index() % self.idle.len()
    }

    fn pop(&self) -> Option<Idle> {
        self.idle[self.home()].lock().pop()
    }
}
