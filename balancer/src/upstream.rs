//! Upstreams and what the balancer knows about each: its balancing state,
//! its counters and its metrics.
//!
//! An [`Upstream`] is identified by its address. It is created the first
//! time a configuration names that address and is shared, through an `Arc`,
//! by every routing table that includes it, so its state outlives any one
//! table. When no table and no request refers to it any more, it is dropped,
//! and its pooled connections are closed with it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use crate::metrics::Metrics;
use crate::pool::{ConnectionPool, PoolSettings};

/// One upstream server and the balancer's state about it.
#[derive(Debug)]
pub struct Upstream {
    addr: SocketAddr,
    /// The address as a `Host` header, for requests that come without one
    /// (HTTP/1.0).
    host: HeaderValue,
    /// nginx's `current_weight`: how far this upstream is ahead or behind
    /// its share. Read and written only under the router's pick lock; an
    /// atomic only because upstreams are shared between threads.
    pub(crate) current_weight: AtomicI64,
    /// nginx's `effective_weight`, at most the configured weight; lowered on
    /// failures and raised by one on each pick that counts it. Same locking
    /// as `current_weight`.
    pub(crate) effective_weight: AtomicI64,
    pub stats: UpstreamStats,
    /// Idle keep-alive connections to this upstream.
    pub pool: ConnectionPool,
}

/// Counters of one upstream, shared with the Prometheus registry: each
/// handle here is the very metric `/metrics` shows.
#[derive(Debug)]
pub struct UpstreamStats {
    pub requests: Counter,
    pub failures: Counter,
    pub in_flight: Gauge,
    /// Seconds from routing a request here to the end of its response.
    pub duration: Histogram,
}

impl Upstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Marks a request as routed to this upstream; the returned guard marks
    /// it finished (and records its duration) when dropped.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.stats.requests.inc();
        self.stats.in_flight.inc();
        InFlight {
            upstream: Arc::clone(self),
            started: Instant::now(),
        }
    }
}

/// A request in flight on an upstream.
#[derive(Debug)]
pub struct InFlight {
    upstream: Arc<Upstream>,
    started: Instant,
}

impl InFlight {
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let stats = &self.upstream.stats;
        stats.in_flight.dec();
        stats.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

/// The upstreams alive, by address, so that a new routing table reuses the
/// state of the upstreams it keeps. It holds them weakly: tables and
/// requests keep them alive.
#[derive(Debug)]
pub struct Registry {
    upstreams: Mutex<HashMap<SocketAddr, Weak<Upstream>>>,
    metrics: Arc<Metrics>,
    pool: PoolSettings,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>, pool: PoolSettings) -> Self {
        Self {
            upstreams: Mutex::new(HashMap::new()),
            metrics,
            pool,
        }
    }

    /// The upstream at `addr`, created if none is alive, with `weight` as
    /// its effective weight.
    pub fn get_or_create(&self, addr: SocketAddr, weight: u32) -> Arc<Upstream> {
        // Held only for a map lookup or insert; never across an await.
        let mut upstreams = self.upstreams.lock().expect("upstream registry lock");
        if let Some(upstream) = upstreams.get(&addr).and_then(Weak::upgrade) {
            return upstream;
        }
        let upstream = Arc::new(Upstream {
            addr,
            host: HeaderValue::try_from(addr.to_string())
                .expect("a socket address is a valid header value"),
            current_weight: AtomicI64::new(0),
            effective_weight: AtomicI64::new(i64::from(weight)),
            stats: self.metrics.upstream(addr),
            pool: ConnectionPool::new(addr, self.pool),
        });
        upstreams.retain(|_, upstream| upstream.strong_count() > 0);
        upstreams.insert(addr, Arc::downgrade(&upstream));
        upstream
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
