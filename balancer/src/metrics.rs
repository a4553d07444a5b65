//! The Prometheus registry behind the admin listener's `/metrics`.
//!
//! Per-upstream metrics are families labelled by `upstream` (its address).
//! Each upstream holds handles to its own series ([`UpstreamCounters`]),
//! so the request path updates them without looking anything up; those
//! that every request updates are sharded by worker ([`crate::shards`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::registry::Registry;

use spike_http1::server::{ConnectionCounts, Rejection};

use crate::error::FailoverReason;
use crate::shards::{ShardedCounter, ShardedGauge, ShardedHistogram};

/// The label set of per-upstream series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// An upstream and one value of a per-upstream enumeration (a state, a
/// failover reason).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamKindLabel {
    pub upstream: String,
    pub kind: &'static str,
}

/// The states an upstream's `upstream_state` series enumerate.
pub const STATES: [&str; 5] = ["up", "ramping", "resting", "down", "unknown"];

/// The counters of one upstream, shared with the Prometheus registry: each
/// handle here is the very series `/metrics` shows.
#[derive(Debug)]
pub struct UpstreamCounters {
    pub requests: ShardedCounter,
    /// Failures of live traffic: connection errors, timeouts, broken
    /// exchanges, and the statuses `fail_on` names.
    pub failures: Counter,
    pub in_flight: ShardedGauge,
    /// Seconds from routing a request here to the end of its response.
    pub duration: ShardedHistogram,
    /// Requests that could not be sent here and went to another upstream,
    /// by [`FailoverReason`].
    pub failovers: [Counter; 3],
    /// Which upstream of this address these series belong to: one removed
    /// and named again is a new upstream, and the old one, dropped later,
    /// must not take the new one's series with it.
    owner: u64,
}

impl UpstreamCounters {
    pub fn failovers_total(&self) -> u64 {
        self.failovers.iter().map(Counter::get).sum()
    }
}

/// What `/metrics` shows of an upstream's health.
#[derive(Debug, Clone, Copy)]
pub struct HealthGauges<'a> {
    /// One of [`STATES`].
    pub state: &'a str,
    pub check_successes: u32,
    pub check_failures: u32,
    pub since_change_ms: u64,
}

/// Every metric the balancer exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The owner of each address's series now ([`UpstreamCounters`]);
    /// locked while series are made or removed, so that those of an
    /// address are only ever removed by their owner.
    owners: Mutex<(HashMap<SocketAddr, u64>, u64)>,
    requests: Family<UpstreamLabel, ShardedCounter>,
    failures: Family<UpstreamLabel, Counter>,
    in_flight: Family<UpstreamLabel, ShardedGauge>,
    duration: Family<UpstreamLabel, ShardedHistogram, fn() -> ShardedHistogram>,
    weight: Family<UpstreamLabel, Gauge>,
    healthy: Family<UpstreamLabel, Gauge>,
    state: Family<UpstreamKindLabel, Gauge>,
    check_successes: Family<UpstreamLabel, Gauge>,
    check_failures: Family<UpstreamLabel, Gauge>,
    since_change: Family<UpstreamLabel, Gauge>,
    failovers: Family<UpstreamKindLabel, Counter>,
    /// Attempts on another upstream after a request could not be sent.
    pub retries: Counter,
    /// Picks among resting upstreams, made because no other could take the
    /// request.
    pub picks_despite_rest: Counter,
    rejections: Family<ReasonLabel, Counter>,
    client_connections: Gauge,
    parked_connections: Gauge,
}

/// The label set of refusals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Request durations from 100 µs to about 13 s.
fn duration_histogram() -> ShardedHistogram {
    ShardedHistogram::new(exponential_buckets(0.0001, 2.0, 18))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spike_balancer");
        let requests = Family::default();
        let failures = Family::default();
        let in_flight = Family::default();
        let duration = Family::new_with_constructor(duration_histogram as fn() -> ShardedHistogram);
        let weight = Family::default();
        let healthy = Family::default();
        let state = Family::default();
        let check_successes = Family::default();
        let check_failures = Family::default();
        let since_change = Family::default();
        let failovers = Family::default();
        let retries = Counter::default();
        let picks_despite_rest = Counter::default();
        let rejections: Family<ReasonLabel, Counter> = Family::default();
        // Every reason is exported from the start, at 0.
        for reason in Rejection::ALL {
            let _ = rejections.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            });
        }
        registry.register(
            "upstream_requests",
            "Requests routed to an upstream",
            requests.clone(),
        );
        registry.register(
            "upstream_failures",
            "Requests to an upstream that failed: refused, timed out or broken",
            failures.clone(),
        );
        registry.register(
            "upstream_in_flight",
            "Requests routed to an upstream whose response has not ended",
            in_flight.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time from routing a request to an upstream to the end of its response",
            duration.clone(),
        );
        registry.register(
            "upstream_weight",
            "An upstream's configured weight (0: drained)",
            weight.clone(),
        );
        registry.register(
            "upstream_healthy",
            "1 if an upstream's active checks say it is up, else 0",
            healthy.clone(),
        );
        registry.register(
            "upstream_state",
            "1 for an upstream's current state (kind: up, ramping, resting, down, unknown), 0 for the others",
            state.clone(),
        );
        registry.register(
            "upstream_check_successes",
            "Consecutive successful active checks of an upstream",
            check_successes.clone(),
        );
        registry.register(
            "upstream_check_failures",
            "Consecutive failed active checks of an upstream",
            check_failures.clone(),
        );
        registry.register(
            "upstream_seconds_since_state_change",
            "Seconds since an upstream's state last changed",
            since_change.clone(),
        );
        registry.register(
            "upstream_failovers",
            "Requests that could not be sent to an upstream and went to another, by reason (kind)",
            failovers.clone(),
        );
        registry.register(
            "retries",
            "Attempts on another upstream after a request could not be sent",
            retries.clone(),
        );
        registry.register(
            "picks_despite_rest",
            "Requests sent to a resting upstream because no upstream was available",
            picks_despite_rest.clone(),
        );
        registry.register(
            "rejections",
            "Client requests and connections refused, by reason",
            rejections.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open on the proxy listener",
            client_connections.clone(),
        );
        let parked_connections = Gauge::default();
        registry.register(
            "client_connections_parked",
            "Idle client connections parked: only their socket held until the next request",
            parked_connections.clone(),
        );
        Self {
            registry,
            owners: Mutex::default(),
            requests,
            failures,
            in_flight,
            duration,
            weight,
            healthy,
            state,
            check_successes,
            check_failures,
            since_change,
            failovers,
            retries,
            picks_despite_rest,
            rejections,
            client_connections,
            parked_connections,
        }
    }

    /// Sets the client connection gauges, before an export.
    pub fn set_client_connections(&self, connections: &ConnectionCounts) {
        self.client_connections.set(connections.open() as i64);
        self.parked_connections.set(connections.parked() as i64);
    }

    /// Counts a refusal.
    pub fn rejected(&self, reason: Rejection) {
        self.rejections
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The series of a new upstream at `addr`, created on first use.
    pub fn upstream(&self, addr: SocketAddr) -> UpstreamCounters {
        let label = label(addr);
        let mut owners = self.owners.lock();
        let (owner_of, last) = &mut *owners;
        *last += 1;
        owner_of.insert(addr, *last);
        UpstreamCounters {
            owner: *last,
            requests: self.requests.get_or_create_owned(&label),
            failures: self.failures.get_or_create_owned(&label),
            in_flight: self.in_flight.get_or_create_owned(&label),
            duration: self.duration.get_or_create_owned(&label),
            failovers: FailoverReason::ALL.map(|reason| {
                self.failovers.get_or_create_owned(&UpstreamKindLabel {
                    upstream: label.upstream.clone(),
                    kind: reason.as_str(),
                })
            }),
        }
    }

    /// Removes every series of the upstream at `addr` whose `counters`
    /// they are, if they are still its own.
    pub fn forget(&self, addr: SocketAddr, counters: &UpstreamCounters) {
        let mut owners = self.owners.lock();
        if owners.0.get(&addr) != Some(&counters.owner) {
            return;
        }
        owners.0.remove(&addr);
        let label = label(addr);
        self.requests.remove(&label);
        self.failures.remove(&label);
        self.in_flight.remove(&label);
        self.duration.remove(&label);
        self.weight.remove(&label);
        self.healthy.remove(&label);
        self.check_successes.remove(&label);
        self.check_failures.remove(&label);
        self.since_change.remove(&label);
        let kinds = |kinds: &[&'static str]| {
            kinds
                .iter()
                .map(|&kind| UpstreamKindLabel {
                    upstream: label.upstream.clone(),
                    kind,
                })
                .collect::<Vec<_>>()
        };
        for series in kinds(&STATES) {
            self.state.remove(&series);
        }
        for series in kinds(&FailoverReason::ALL.map(FailoverReason::as_str)) {
            self.failovers.remove(&series);
        }
    }

    /// Records an upstream's configured weight.
    pub fn set_weight(&self, addr: SocketAddr, weight: u32) {
        self.weight
            .get_or_create(&label(addr))
            .set(i64::from(weight));
    }

    /// Records an upstream's health.
    pub fn set_health(&self, addr: SocketAddr, health: HealthGauges<'_>) {
        let label = label(addr);
        let state = health.state;
        let up = matches!(state, "up" | "ramping" | "resting");
        self.healthy.get_or_create(&label).set(i64::from(up));
        for kind in STATES {
            let series = UpstreamKindLabel {
                upstream: label.upstream.clone(),
                kind,
            };
            self.state
                .get_or_create(&series)
                .set(i64::from(kind == state));
        }
        self.check_successes
            .get_or_create(&label)
            .set(i64::from(health.check_successes));
        self.check_failures
            .get_or_create(&label)
            .set(i64::from(health.check_failures));
        self.since_change
            .get_or_create(&label)
            .set((health.since_change_ms / 1000) as i64);
    }

    /// The exposition, in the OpenMetrics text format that Prometheus reads.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

fn label(addr: SocketAddr) -> UpstreamLabel {
    UpstreamLabel {
        upstream: addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_dropped_after_its_successor_came_leaves_its_series_alone() {
        let metrics = Metrics::new();
        let addr: SocketAddr = "127.0.0.1:3001".parse().unwrap();
        let old = metrics.upstream(addr);
        // Removed from the table, named again before the old one is gone.
        let new = metrics.upstream(addr);
        new.requests.inc();
        metrics.forget(addr, &old);
        let text = metrics.encode();
        assert!(
            text.contains("spike_balancer_upstream_requests_total{upstream=\"127.0.0.1:3001\"} 1"),
            "{text}"
        );
        metrics.forget(addr, &new);
        assert!(!metrics.encode().contains("upstream_requests_total{"));
    }
}
