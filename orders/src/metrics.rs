//! The Prometheus registry behind the admin address's `/metrics`. The
//! service counts into these series directly: `/stats` reads them too.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::event::Kind;
use crate::stream::Lag;

/// The label of a series by event kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Events written for the first time, by kind ([`Kind::ALL`]'s order).
    written: [Counter; 3],
    pub written_again: Counter,
    pub batches: Counter,
    pub retries: Counter,
    pub database_errors: Counter,
    pub redis_errors: Counter,
    pub claimed: Counter,
    pub dead_letters: Counter,
    pub trimmed: Counter,
    lag_events: Gauge,
    lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    stream_length: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("spike_orders");
        let written_family: Family<KindLabel, Counter> = Family::default();
        let written = Kind::ALL.map(|kind| {
            written_family
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .clone()
        });
        registry.register(
            "events_written",
            "Events written to the database for the first time, by kind",
            written_family,
        );
        let metrics = Self {
            written,
            written_again: Counter::default(),
            batches: Counter::default(),
            retries: Counter::default(),
            database_errors: Counter::default(),
            redis_errors: Counter::default(),
            claimed: Counter::default(),
            dead_letters: Counter::default(),
            trimmed: Counter::default(),
            lag_events: Gauge::default(),
            lag_seconds: Gauge::default(),
            stream_length: Gauge::default(),
            registry,
        };
        let mut registry = metrics.registry;
        for (name, help, counter) in [
            (
                "events_written_again",
                "Events delivered again and found in the database already",
                &metrics.written_again,
            ),
            ("batches", "Transactions committed", &metrics.batches),
            (
                "retries",
                "Writes tried again after the database failed",
                &metrics.retries,
            ),
            (
                "database_errors",
                "Writes the database failed or did not answer in time",
                &metrics.database_errors,
            ),
            (
                "redis_errors",
                "Reads and acknowledgements Redis failed",
                &metrics.redis_errors,
            ),
            (
                "claimed",
                "Events taken over from consumers idle too long",
                &metrics.claimed,
            ),
            (
                "dead_letters",
                "Entries that are not order events, parked in the dead letter stream",
                &metrics.dead_letters,
            ),
            (
                "trimmed",
                "Entries trimmed from the stream after every group acknowledged them",
                &metrics.trimmed,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "lag_events",
            "Events not in the database yet: pending and not yet read",
            metrics.lag_events.clone(),
        );
        registry.register(
            "lag_seconds",
            "How long the oldest event not in the database yet has waited",
            metrics.lag_seconds.clone(),
        );
        registry.register(
            "stream_length",
            "Entries in the order stream",
            metrics.stream_length.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    pub fn written(&self, kind: Kind) -> &Counter {
        &self.written[kind as usize]
    }

    pub fn set_lag(&self, lag: &Lag) {
        self.lag_events
            .set(i64::try_from(lag.events).unwrap_or(i64::MAX));
        self.lag_seconds.set(lag.oldest_ms as f64 / 1000.0);
        self.stream_length
            .set(i64::try_from(lag.stream).unwrap_or(i64::MAX));
    }

    /// The exposition, in the OpenMetrics text format that Prometheus reads.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
