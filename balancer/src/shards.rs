//! Metrics that each worker updates on cache lines of its own.
//!
//! Every proxied request counts itself at its upstream: a request, one in
//! flight and back, its duration. With one shared series per upstream,
//! the workers, on their own cores, take turns at the same cache lines
//! (and at the lock of prometheus-client's histogram) at every request.
//! Here each worker writes only its own shard ([`workers::index`]), with
//! plain loads and stores since no other thread writes it; every other
//! thread shares shard 0, with atomic additions. `/metrics` reads the sum.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::workers;

/// One `T` per worker, `i` for worker `i`, and shard 0 for the other
/// threads.
#[derive(Debug)]
struct Shards<T>(Box<[CachePadded<T>]>);

impl<T: Default> Shards<T> {
    fn new() -> Self {
        Self(
            (0..=workers::count())
                .map(|_| CachePadded::default())
                .collect(),
        )
    }
}

/// This thread's shard of `shards`, and whether it is this thread's
/// alone. (A worker beyond the count the shards were made for, as a test
/// may make, shares shard 0.)
fn my_shard(shards: usize) -> (usize, Alone) {
    let index = workers::index();
    if index > 0 && index < shards {
        (index, Alone(true))
    } else {
        (0, Alone(false))
    }
}

impl<T> Shards<T> {
    /// This thread's shard, and whether it is this thread's alone.
    fn mine(&self) -> (&T, Alone) {
        let (index, alone) = my_shard(self.0.len());
        (&self.0[index], alone)
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|shard| &**shard)
    }
}

/// Whether a shard has one writer.
#[derive(Debug, Clone, Copy)]
struct Alone(bool);

impl Alone {
    /// Adds `value` to `n`, wrapping (a gauge's negative steps are added
    /// as their two's complement).
    fn add(self, n: &AtomicU64, value: u64) {
        if self.0 {
            n.store(
                n.load(Ordering::Relaxed).wrapping_add(value),
                Ordering::Relaxed,
            );
        } else {
            n.fetch_add(value, Ordering::Relaxed);
        }
    }

    fn add_f64(self, n: &AtomicU64, value: f64) {
        let add = |bits| (f64::from_bits(bits) + value).to_bits();
        if self.0 {
            n.store(add(n.load(Ordering::Relaxed)), Ordering::Relaxed);
        } else {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some(add(bits)));
        }
    }
}

/// A number kept in shards, read as their wrapping sum.
#[derive(Debug, Clone)]
struct Sum(Arc<Shards<AtomicU64>>);

impl Default for Sum {
    fn default() -> Self {
        Self(Arc::new(Shards::new()))
    }
}

impl Sum {
    fn add(&self, value: u64) {
        let (n, alone) = self.0.mine();
        alone.add(n, value);
    }

    fn get(&self) -> u64 {
        self.0
            .iter()
            .fold(0, |sum, n| sum.wrapping_add(n.load(Ordering::Relaxed)))
    }
}

/// A counter, summed over the workers' shards.
#[derive(Debug, Clone, Default)]
pub struct ShardedCounter(Sum);

impl ShardedCounter {
    pub fn inc(&self) {
        self.0.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A gauge that goes up and down on the same thread (a request counted in
/// flight on the worker that serves it), summed over the shards.
#[derive(Debug, Clone, Default)]
pub struct ShardedGauge(Sum);

impl ShardedGauge {
    pub fn inc(&self) {
        self.0.add(1);
    }

    pub fn dec(&self) {
        self.0.add(u64::MAX);
    }

    pub fn get(&self) -> i64 {
        self.0.get() as i64
    }
}

impl TypedMetric for ShardedGauge {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for ShardedGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram of fixed buckets, each shard its own counts and sum.
#[derive(Debug, Clone)]
pub struct ShardedHistogram {
    /// The buckets' upper bounds, ascending; the last bucket (`+Inf`)
    /// takes what is above them all.
    bounds: Arc<[f64]>,
    /// Per shard, the sum of the observations (as `f64` bits) and then the
    /// count of each bucket, `bounds.len() + 1` of them: `stride` cells,
    /// each shard from a cache line of its own.
    cells: Arc<[CachePadded<[AtomicU64; LINE]>]>,
    stride: usize,
}

/// Cells per padded line.
const LINE: usize = size_of::<CachePadded<[AtomicU64; 1]>>() / size_of::<AtomicU64>();

impl ShardedHistogram {
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Arc<[f64]> = bounds.into_iter().collect();
        let lines = (bounds.len() + 2).div_ceil(LINE);
        let cells = (0..(workers::count() + 1) * lines)
            .map(|_| CachePadded::new(std::array::from_fn(|_| AtomicU64::new(0))))
            .collect();
        Self {
            bounds,
            cells,
            stride: lines * LINE,
        }
    }

    /// Cell `i` of shard `shard`.
    fn cell(&self, shard: usize, i: usize) -> &AtomicU64 {
        let at = shard * self.stride + i;
        &self.cells[at / LINE][at % LINE]
    }

    fn shards(&self) -> usize {
        self.cells.len() * LINE / self.stride
    }

    pub fn observe(&self, value: f64) {
        let (shard, alone) = my_shard(self.shards());
        // From the smallest bound up: most requests end in the first few
        // buckets, and a scan's branches are predicted where a binary
        // search waits on each load.
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| value <= bound)
            .unwrap_or(self.bounds.len());
        alone.add(self.cell(shard, 1 + bucket), 1);
        alone.add_f64(self.cell(shard, 0), value);
    }

    /// The sum, the count, and the count of each bucket with its upper
    /// bound (the last one `+Inf`).
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .map(|bound| (bound, 0))
            .collect();
        for shard in 0..self.shards() {
            sum += f64::from_bits(self.cell(shard, 0).load(Ordering::Relaxed));
            for (i, total) in buckets.iter_mut().enumerate() {
                total.1 += self.cell(shard, 1 + i).load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, count)| count).sum();
        (sum, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    use super::*;

    fn exposition(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn a_sharded_histogram_exports_what_prometheus_clients_would() {
        let bounds = [0.001, 0.01, 0.1];
        let values = [0.0005, 0.001, 0.002, 0.05, 0.05, 3.0];
        let sharded = ShardedHistogram::new(bounds);
        let plain = Histogram::new(bounds);
        // Observed from the shards of three threads.
        std::thread::scope(|scope| {
            for (index, chunk) in values.chunks(2).enumerate() {
                let sharded = &sharded;
                scope.spawn(move || {
                    workers::enter(index);
                    for &value in chunk {
                        sharded.observe(value);
                    }
                });
            }
        });
        for value in values {
            plain.observe(value);
        }
        let ours = exposition(|registry| registry.register("d", "durations", sharded));
        let theirs = exposition(|registry| registry.register("d", "durations", plain));
        assert_eq!(ours, theirs);
        assert!(ours.contains("d_bucket{le=\"0.01\"} 3"), "{ours}");
    }

    #[test]
    fn sharded_counts_add_up_across_threads() {
        let counter = ShardedCounter::default();
        let gauge = ShardedGauge::default();
        std::thread::scope(|scope| {
            for index in 0..4 {
                let (counter, gauge) = (&counter, &gauge);
                scope.spawn(move || {
                    workers::enter(index);
                    for _ in 0..1_000 {
                        counter.inc();
                        gauge.inc();
                    }
                    for _ in 0..index * 100 {
                        gauge.dec();
                    }
                });
            }
        });
        assert_eq!(counter.get(), 4_000);
        assert_eq!(gauge.get(), 4_000 - 600);
        let text = exposition(|registry| {
            registry.register("requests", "requests", counter);
            registry.register("in_flight", "in flight", gauge);
        });
        assert!(text.contains("requests_total 4000"), "{text}");
        assert!(text.contains("in_flight 3400"), "{text}");
    }
}
