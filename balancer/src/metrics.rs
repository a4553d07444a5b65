//! The Prometheus registry behind the admin listener's `/metrics`.
//!
//! Per-upstream metrics are families labelled by `upstream` (its address).
//! Each [`crate::upstream::Upstream`] holds handles to its own series, so the
//! request path updates them without looking anything up.

use std::net::SocketAddr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::upstream::UpstreamStats;

/// The label set of per-upstream series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// Every metric the balancer exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<UpstreamLabel, Counter>,
    failures: Family<UpstreamLabel, Counter>,
    in_flight: Family<UpstreamLabel, Gauge>,
    duration: Family<UpstreamLabel, Histogram, fn() -> Histogram>,
    weight: Family<UpstreamLabel, Gauge>,
    healthy: Family<UpstreamLabel, Gauge>,
}

/// Request durations from 100 µs to about 13 s.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
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
        let duration = Family::new_with_constructor(duration_histogram as fn() -> Histogram);
        let weight = Family::default();
        let healthy = Family::default();
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
            "1 if an upstream may take requests, else 0",
            healthy.clone(),
        );
        Self {
            registry,
            requests,
            failures,
            in_flight,
            duration,
            weight,
            healthy,
        }
    }

    /// The series of the upstream at `addr`, created on first use.
    pub fn upstream(&self, addr: SocketAddr) -> UpstreamStats {
        let label = label(addr);
        UpstreamStats {
            requests: self.requests.get_or_create_owned(&label),
            failures: self.failures.get_or_create_owned(&label),
            in_flight: self.in_flight.get_or_create_owned(&label),
            duration: self.duration.get_or_create_owned(&label),
        }
    }

    /// Records an upstream's configured weight and whether it may take
    /// requests.
    pub fn set_state(&self, addr: SocketAddr, weight: u32, healthy: bool) {
        let label = label(addr);
        self.weight.get_or_create(&label).set(i64::from(weight));
        self.healthy.get_or_create(&label).set(i64::from(healthy));
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
