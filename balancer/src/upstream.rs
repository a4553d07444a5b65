//! An upstream and what the balancer keeps about it from one routing table
//! to the next: its balancing state, its health, its counters and its
//! connections.
//!
//! An [`Upstream`] is identified by its address. It is created the first
//! time a configuration names that address ([`crate::registry`]) and is
//! shared, through an `Arc`, by every routing table that includes it, so its
//! state outlives any one table. Its settings are not part of it: they are
//! the table's ([`crate::table::Peer`]), so that one new table makes all of
//! a change current at once. When no table and no request refers to it any
//! more, it is dropped, its pooled connections are closed and its checker
//! stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use http::HeaderValue;
use spike_config::health::HealthSettings;

use crate::error::{FailoverReason, UpstreamFailure};
use crate::health::{Health, State, now_ms};
use crate::metrics::{HealthGauges, Metrics, UpstreamCounters};
use crate::pool::ConnectionPool;
use crate::table::{Peer, Table};

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
    pub counters: UpstreamCounters,
    /// Idle keep-alive connections to this upstream.
    pub pool: ConnectionPool,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// A new upstream at `addr` of configured `weight`, in state `initial`,
    /// counted in `metrics`.
    pub fn new(addr: SocketAddr, weight: u32, initial: State, metrics: Arc<Metrics>) -> Self {
        Self {
            addr,
            // A socket address is always a valid header value.
            host: HeaderValue::try_from(addr.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            current_weight: AtomicI64::new(0),
            effective_weight: AtomicI64::new(i64::from(weight)),
            health: Health::new(initial, now_ms()),
            counters: metrics.upstream(addr),
            pool: ConnectionPool::new(addr),
            metrics,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// Counts a failure of live traffic at this upstream, of configured
    /// `weight`, checked by `settings`: every exchange that broke is
    /// counted, and what `fail_on` names is a passive check's failure too,
    /// with nginx's effective-weight decay.
    pub fn failed(&self, failure: UpstreamFailure, weight: u32, settings: &HealthSettings) {
        let counts = failure.counts(&settings.fail_on);
        if counts || !matches!(failure, UpstreamFailure::Status(_)) {
            self.counters.failures.inc();
        }
        if !counts || settings.max_fails == 0 {
            return;
        }
        let decay = i64::from(weight / settings.max_fails);
        let _ = self
            .effective_weight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some((w - decay).max(0))
            });
        if self.health.passive_failure(settings, now_ms()) {
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
        self.counters.failovers[reason as usize].inc();
        tracing::warn!(upstream = %self.addr, reason = reason.as_str(), %error, "failover: the request was not sent; trying another upstream");
    }

    /// Brings the health gauges of `/metrics` up to date, as `settings`
    /// read the upstream's health.
    pub fn refresh_metrics(&self, settings: &HealthSettings) {
        let now = now_ms();
        let checks = self.health.checks();
        self.metrics.set_health(
            self.addr,
            HealthGauges {
                state: self.health.state_name(settings, now),
                check_successes: checks.successes,
                check_failures: checks.failures,
                since_change_ms: now.saturating_sub(checks.changed_at),
            },
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // Gone from every table and done with its last request.
        self.metrics.forget(self.addr, &self.counters);
    }
}

/// A request in flight on an upstream: the peer that the round-robin
/// picked, held by the routing table it was picked from (one reference
/// count to take per request, not one per handle the peer holds).
#[derive(Debug)]
pub struct InFlight {
    table: Arc<Table>,
    index: usize,
    /// When it was picked.
    started: Instant,
    /// Whether its duration has been recorded.
    ended: bool,
}

impl InFlight {
    /// Marks a request as routed, `started` then, to the peer at `index`
    /// of `table`; it is marked finished (and its duration recorded, if
    /// [`end`](Self::end) did not) when this is dropped.
    pub fn start(table: Arc<Table>, index: usize, started: Instant) -> Self {
        let counters = &table.peers[index].upstream.counters;
        counters.requests.inc();
        counters.in_flight.inc();
        Self {
            table,
            index,
            started,
            ended: false,
        }
    }

    pub fn peer(&self) -> &Peer {
        &self.table.peers[self.index]
    }

    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.peer().upstream
    }

    /// When the request was picked.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether the request's duration has been recorded.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Records the request's duration, as ended `now`; it stays counted
    /// in flight until this is dropped.
    pub fn end(&mut self, now: Instant) {
        if !self.ended {
            self.ended = true;
            let duration = now.saturating_duration_since(self.started);
            self.upstream()
                .counters
                .duration
                .observe(duration.as_secs_f64());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.ended {
            self.end(Instant::now());
        }
        self.upstream().counters.in_flight.dec();
    }
}
