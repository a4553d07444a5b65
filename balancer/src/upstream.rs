//! Upstreams and what the balancer knows about each: its balancing state,
//! its health, its counters and its connections.
//!
//! An [`Upstream`] is identified by its address. It is created the first
//! time a configuration names that address and is shared, through an `Arc`,
//! by every routing table that includes it, so its state outlives any one
//! table. When no table and no request refers to it any more, it is dropped,
//! its pooled connections are closed and its checker stops.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::HeaderValue;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use spike_config::balancer::UpstreamConfig;
use spike_config::health::HealthSettings;

use crate::health::{Checker, Health, State, now_ms};
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
    /// failures of live traffic and raised by one on each pick that counts
    /// it.
    pub(crate) effective_weight: AtomicI64,
    pub health: Health,
    /// The checks of this upstream, from the configuration in force.
    health_settings: ArcSwap<HealthSettings>,
    pub stats: UpstreamStats,
    /// Idle keep-alive connections to this upstream.
    pub pool: ConnectionPool,
    metrics: Arc<Metrics>,
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
    /// Requests that could not be sent here and went to another upstream,
    /// by [`FailoverReason`].
    pub failovers: [Counter; 3],
}

impl UpstreamStats {
    pub fn failovers_total(&self) -> u64 {
        self.failovers.iter().map(Counter::get).sum()
    }
}

/// Why a request could not be sent to an upstream: each is a failover to
/// another, since nothing reached this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverReason {
    /// Connecting failed (refused, reset, unreachable).
    Connect,
    /// Connecting took longer than the connect timeout.
    ConnectTimeout,
    /// The connection was found closed before the request was written.
    Closed,
}

impl FailoverReason {
    pub const ALL: [FailoverReason; 3] = [
        FailoverReason::Connect,
        FailoverReason::ConnectTimeout,
        FailoverReason::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailoverReason::Connect => "connect_failed",
            FailoverReason::ConnectTimeout => "connect_timeout",
            FailoverReason::Closed => "closed_before_send",
        }
    }
}

impl Upstream {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    pub fn health_settings(&self) -> Arc<HealthSettings> {
        self.health_settings.load_full()
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

    /// Counts a failure of live traffic at this upstream (of configured
    /// `weight`): a passive check, with nginx's effective-weight decay.
    pub fn failed(&self, weight: u32) {
        self.stats.failures.inc();
        let settings = self.health_settings();
        if settings.max_fails == 0 {
            return;
        }
        let decay = i64::from(weight / settings.max_fails);
        let _ = self
            .effective_weight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some((w - decay).max(0))
            });
        if self.health.passive_failure(&settings, now_ms()) {
            tracing::warn!(
                upstream = %self.addr,
                max_fails = settings.max_fails,
                rest = ?settings.fail_timeout,
                "upstream failed max_fails times; resting it"
            );
        }
    }

    /// Counts a request that went well (forgives passive failures).
    pub fn succeeded(&self) {
        self.health.passive_success();
    }

    /// Counts a request that could not be sent here and goes elsewhere.
    pub fn failed_over(&self, reason: FailoverReason, error: &dyn std::fmt::Display) {
        self.stats.failovers[reason as usize].inc();
        tracing::warn!(upstream = %self.addr, reason = reason.as_str(), %error, "failover: the request was not sent; trying another upstream");
    }

    /// Brings the state gauges of `/metrics` up to date.
    pub fn refresh_metrics(&self) {
        let settings = self.health_settings();
        let now = now_ms();
        let checks = self.health.checks();
        let state = self.state_name(&settings, now);
        self.metrics.set_health(
            self.addr,
            state,
            &checks,
            now.saturating_sub(checks.changed_at),
        );
    }

    /// `up`, `down`, `unknown`, or `ramping` while slow start is under way.
    pub fn state_name(&self, settings: &HealthSettings, now: u64) -> &'static str {
        match self.health.state() {
            State::Up if self.health.ramping(settings, now) => "ramping",
            State::Up => "up",
            State::Down => "down",
            State::Unknown => "unknown",
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Gone from every table and done with its last request.
        self.metrics.forget(self.addr);
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
    /// Starts the active checks of each new upstream; none in unit tests.
    checker: Option<Checker>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>, checker: Option<Checker>) -> Self {
        Self {
            upstreams: Mutex::new(HashMap::new()),
            metrics,
            checker,
        }
    }

    /// The upstream of `config` with these pool settings: the one alive at
    /// its address, given the new settings, or a new one in state
    /// `initial`.
    pub fn get_or_create(
        &self,
        config: &UpstreamConfig,
        pool: PoolSettings,
        initial: State,
    ) -> Arc<Upstream> {
        let (addr, weight, health) = (config.addr, config.weight, &config.health);
        let upstream = {
            // Held only for a map lookup or insert; never across an await.
            let mut upstreams = self.upstreams.lock().expect("upstream registry lock");
            if let Some(upstream) = upstreams.get(&addr).and_then(Weak::upgrade) {
                if *upstream.health_settings.load_full() != *health {
                    upstream.health_settings.store(Arc::new(health.clone()));
                }
                upstream.pool.configure(pool);
                return upstream;
            }
            let upstream = Arc::new(Upstream {
                addr,
                host: HeaderValue::try_from(addr.to_string())
                    .expect("a socket address is a valid header value"),
                current_weight: AtomicI64::new(0),
                effective_weight: AtomicI64::new(i64::from(weight)),
                health: Health::new(initial, now_ms()),
                health_settings: ArcSwap::from_pointee(health.clone()),
                stats: self.metrics.upstream(addr),
                pool: ConnectionPool::new(addr, pool),
                metrics: Arc::clone(&self.metrics),
            });
            upstreams.retain(|_, upstream| upstream.strong_count() > 0);
            upstreams.insert(addr, Arc::downgrade(&upstream));
            upstream
        };
        if let Some(checker) = &self.checker {
            checker.watch(&upstream);
        }
        upstream
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
