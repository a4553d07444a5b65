//! Choosing an upstream: nginx's smooth weighted round-robin over one
//! immutable routing table.
//!
//! On each pick, every eligible peer adds its effective weight to its
//! current weight; the peer with the largest current weight wins (the first
//! in file order on a tie) and has the sum of the effective weights taken
//! off. Weights {a:5, b:1, c:1} pick `a a b a c a a`, and every window of
//! sum(weights) consecutive picks holds each peer exactly its weight times
//! (nginx, `ngx_http_upstream_get_peer` in
//! `src/http/ngx_http_upstream_round_robin.c`).
//!
//! There is one pick state for the whole process, not one per worker thread:
//! picks take a short lock, so the windows hold across all threads.
//!
//! Only upstreams that may take requests count ([`crate::health`]): one
//! that is down, resting after failures, or already tried for this request
//! is skipped, and the others share its requests by their weights. Backup
//! upstreams are picked only when no other can be (nginx's `backup`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::check::Checker;
use crate::health::{State, ms_at};
use crate::registry::Registry;
use crate::table::{Peer, Routing, Table};
use crate::upstream::InFlight;

/// The current routing table and the state of the smooth round-robin.
#[derive(Debug)]
pub struct Router {
    /// The table in force; the checkers read their upstreams' settings from
    /// it too.
    table: Arc<ArcSwap<Table>>,
    /// Serialises picks and table changes. The state it guards is the
    /// `current_weight` and `effective_weight` of the upstreams, which live
    /// in the upstreams themselves so that they outlast any one table, and
    /// which table is current. Held for one loop over the peers, never
    /// across an `.await`. A panic while it is held leaves the weights as
    /// they were at that moment, a state the next pick corrects: the lock
    /// does not poison, and no later request pays for that one.
    pick_lock: Mutex<()>,
    registry: Registry,
    /// Starts the active checks of each new upstream; none in unit tests.
    checker: Option<Checker>,
}

impl Router {
    /// A router over the upstreams of the configuration the balancer starts
    /// with, all taken to be up until their checks say otherwise; their
    /// checks run until `checks` is cancelled (none if `None`).
    pub fn new(
        routing: Routing<'_>,
        registry: Registry,
        checks: Option<CancellationToken>,
    ) -> Self {
        let (table, new) = Table::build(routing, None, &registry, |_| State::Up);
        let table = Arc::new(ArcSwap::from_pointee(table));
        let checker = checks.map(|shutdown| Checker::new(Arc::clone(&table), shutdown));
        let router = Self {
            table,
            pick_lock: Mutex::new(()),
            registry,
            checker,
        };
        router.watch(&new);
        router
    }

    /// Makes a table of `routing` current, from the next pick on: one store
    /// makes every setting of it current at once. Upstreams it keeps keep
    /// their state; a new one starts unknown (it serves once its checks
    /// pass), or up if its checks are off. If the weights changed, the
    /// round-robin starts over, so that every window of the new weights'
    /// sum holds each upstream exactly its weight from the first pick;
    /// otherwise it goes on where it was.
    pub fn install(&self, routing: Routing<'_>) {
        let current = self.table.load_full();
        let (table, new) = Table::build(routing, Some(&current), &self.registry, |config| {
            if config.health.enabled {
                State::Unknown
            } else {
                State::Up
            }
        });
        {
            let _picking = self.pick_lock.lock();
            if !table.same_weights(&self.table.load()) {
                for peer in &table.peers {
                    let upstream = &peer.upstream;
                    upstream.current_weight.store(0, Ordering::Relaxed);
                    upstream
                        .effective_weight
                        .store(i64::from(peer.weight), Ordering::Relaxed);
                }
            }
            self.table.store(Arc::new(table));
        }
        if let Some(checker) = &self.checker {
            checker.reconfigured();
        }
        self.watch(&new);
    }

    /// Starts the checks of new upstreams.
    fn watch(&self, new: &[Arc<crate::upstream::Upstream>]) {
        if let Some(checker) = &self.checker {
            for upstream in new {
                checker.watch(upstream);
            }
        }
    }

    /// The current routing table.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The current routing table, for a quick look: hold the guard briefly.
    pub fn current(&self) -> arc_swap::Guard<Arc<Table>> {
        self.table.load()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The next upstream of the smooth round-robin among those that may
    /// take requests and are not in `tried`: a primary if any can, else a
    /// backup, with the request counted in flight there (under the lock,
    /// so that `max_requests_per_upstream` holds across threads). When
    /// none can because every one that is up is resting after failures of
    /// live traffic, those are picked all the same (as Envoy's panic
    /// threshold keeps balancing): the balancer does not refuse every
    /// request on the strength of failures that may have passed. `None`
    /// when none can.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<InFlight> {
        // One look at the clock for the pick and the request's duration.
        let started = tokio::time::Instant::now();
        let now = ms_at(started);
        let _picking = self.pick_lock.lock();
        // Loaded under the lock: a pick never mixes the state of one table
        // with the weights of another.
        let table = self.table.load();
        let busy = table.proxy.max_requests_per_upstream;
        let pick =
            |backup, despite_rest| pick(&table.peers, backup, despite_rest, tried, busy, now);
        let index = match pick(false, false).or_else(|| pick(true, false)) {
            Some(index) => index,
            None => {
                let index = pick(false, true).or_else(|| pick(true, true))?;
                self.registry.metrics().picks_despite_rest.inc();
                index
            }
        };
        let peer = &table.peers[index];
        peer.upstream.health.picked(&peer.health, now);
        let table = arc_swap::Guard::into_inner(table);
        Some(InFlight::start(table, index, started.into_std()))
    }
}

/// nginx's pick, over the peers of the kind `backup` that may take the
/// request at `now` (resting ones too if `despite_rest`), are not in
/// `tried` and have fewer than `busy` requests in flight (if `busy` is not
/// 0). Must run under the pick lock.
fn pick(
    peers: &[Peer],
    backup: bool,
    despite_rest: bool,
    tried: &[SocketAddr],
    busy: u32,
    now: u64,
) -> Option<usize> {
    let mut best: Option<(usize, i64)> = None;
    let mut total = 0;
    let candidates = peers.iter().enumerate().filter(|(_, peer)| {
        peer.backup == backup
            && peer.weight > 0
            && !tried.contains(&peer.upstream.addr())
            && (busy == 0 || peer.upstream.counters.in_flight.get() < i64::from(busy))
    });
    for (index, peer) in candidates {
        let upstream = &peer.upstream;
        // Down, resting, or ramping up after coming back.
        let Some(weight) = upstream
            .health
            .weight_now(peer.weight, &peer.health, now, despite_rest)
        else {
            continue;
        };
        let weight = i64::from(weight);
        // A weight lowered by a new table also bounds the effective weight.
        let effective = upstream
            .effective_weight
            .load(Ordering::Relaxed)
            .min(weight);
        let current = upstream.current_weight.load(Ordering::Relaxed) + effective;
        upstream.current_weight.store(current, Ordering::Relaxed);
        total += effective;
        // nginx's gradual recovery after failures: one step per pick.
        let recovered = if effective < weight {
            effective + 1
        } else {
            effective
        };
        upstream
            .effective_weight
            .store(recovered, Ordering::Relaxed);
        if best.is_none_or(|(_, best_current)| current > best_current) {
            best = Some((index, current));
        }
    }
    let (index, current) = best?;
    peers[index]
        .upstream
        .current_weight
        .store(current - total, Ordering::Relaxed);
    Some(index)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use spike_config::balancer::{ProxySettings, RateLimitSettings, UpstreamConfig};
    use spike_config::health::HealthSettings;

    use super::*;
    use crate::error::UpstreamFailure;
    use crate::health::now_ms;
    use crate::metrics::Metrics;

    fn upstreams(weights: &[u32]) -> Vec<UpstreamConfig> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| UpstreamConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 3001 + i as u16)),
                weight,
                backup: false,
                health: HealthSettings::default(),
            })
            .collect()
    }

    fn routing(upstreams: &[UpstreamConfig]) -> Routing<'_> {
        static PROXY: std::sync::LazyLock<ProxySettings> =
            std::sync::LazyLock::new(ProxySettings::default);
        static RATE: RateLimitSettings = RateLimitSettings {
            per_second: 0,
            burst: 0,
        };
        Routing {
            upstreams,
            proxy: &PROXY,
            rate_limit: &RATE,
        }
    }

    fn router(weights: &[u32]) -> Router {
        let registry = Registry::new(Arc::new(Metrics::new()));
        Router::new(routing(&upstreams(weights)), registry, None)
    }

    /// The letter of each pick: `a` for the first upstream, `b` for the next...
    fn picks(router: &Router, count: usize) -> String {
        (0..count)
            .map(|_| {
                let port = router.pick(&[]).unwrap().upstream().addr().port();
                char::from(b'a' + (port - 3001) as u8)
            })
            .collect()
    }

    #[test]
    fn weights_5_1_1_pick_nginxs_sequence() {
        let router = router(&[5, 1, 1]);
        assert_eq!(picks(&router, 14), "aabacaaaabacaa");
    }

    #[test]
    fn every_window_of_the_weight_sum_holds_each_weight() {
        let router = router(&[1, 2, 3, 4]);
        let sequence = picks(&router, 1_000);
        for window in sequence.as_bytes().chunks(10) {
            let mut counts = [0; 4];
            for letter in window {
                counts[usize::from(letter - b'a')] += 1;
            }
            assert_eq!(counts, [1, 2, 3, 4], "{}", String::from_utf8_lossy(window));
        }
        // The smooth order interleaves instead of sending runs: d c b d a c d b c d.
        assert_eq!(&sequence[..10], "dcbdacdbcd");
    }

    #[test]
    fn a_zero_weight_takes_no_requests() {
        let router = router(&[0, 1, 0]);
        assert_eq!(picks(&router, 5), "bbbbb");
        assert!(self::router(&[0, 0]).pick(&[]).is_none());
    }

    #[test]
    fn concurrent_picks_keep_the_weights_exact() {
        let router = Arc::new(router(&[1, 2, 3, 4]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let router = Arc::clone(&router);
                std::thread::spawn(move || {
                    (0..2_500)
                        .map(|_| router.pick(&[]).unwrap().upstream().addr().port())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut counts: HashMap<u16, usize> = HashMap::new();
        for thread in threads {
            for port in thread.join().unwrap() {
                *counts.entry(port).or_default() += 1;
            }
        }
        let counts: Vec<_> = (3001..=3004).map(|port| counts[&port]).collect();
        assert_eq!(counts, [1_000, 2_000, 3_000, 4_000]);
    }

    #[test]
    fn new_weights_hold_exactly_from_the_first_pick_after_install() {
        let router = router(&[1, 2, 3, 4]);
        // Leave the round-robin mid-window.
        picks(&router, 7);
        router.install(routing(&upstreams(&[4, 3, 2, 1])));
        let sequence = picks(&router, 1_000);
        for window in sequence.as_bytes().chunks(10) {
            let mut counts = [0; 4];
            for letter in window {
                counts[usize::from(letter - b'a')] += 1;
            }
            assert_eq!(counts, [4, 3, 2, 1]);
        }
    }

    #[test]
    fn a_raised_weight_holds_from_the_first_pick_after_install() {
        let router = router(&[1, 1]);
        picks(&router, 3);
        router.install(routing(&upstreams(&[10, 1])));
        let sequence = picks(&router, 22);
        for window in sequence.as_bytes().chunks(11) {
            assert_eq!(
                window.iter().filter(|&&l| l == b'b').count(),
                1,
                "{sequence}"
            );
        }
    }

    #[test]
    fn unchanged_weights_keep_the_round_robin_going() {
        let router = router(&[5, 1, 1]);
        let before = picks(&router, 3);
        router.install(routing(&upstreams(&[5, 1, 1])));
        assert_eq!(before + &picks(&router, 11), "aabacaaaabacaa");
    }

    #[test]
    fn kept_upstreams_keep_their_state_and_new_ones_wait_for_their_checks() {
        let router = router(&[1, 1]);
        let first = Arc::clone(&router.table().peers[0].upstream);
        first.counters.requests.inc();
        router.install(routing(&upstreams(&[1, 1, 1])));
        let table = router.table();
        assert!(Arc::ptr_eq(&first, &table.peers[0].upstream));
        assert_eq!(table.peers[0].upstream.counters.requests.get(), 1);
        assert_eq!(table.peers[2].upstream.health.state(), State::Unknown);
        // Until it passes its checks, the new upstream gets nothing.
        assert_eq!(picks(&router, 6), "ababab");
    }

    #[test]
    fn a_busy_upstream_is_skipped() {
        let registry = Registry::new(Arc::new(Metrics::new()));
        let proxy = ProxySettings {
            max_requests_per_upstream: 2,
            ..ProxySettings::default()
        };
        let upstreams = upstreams(&[1, 1]);
        let rate = RateLimitSettings::default();
        let router = Router::new(
            Routing {
                upstreams: &upstreams,
                proxy: &proxy,
                rate_limit: &rate,
            },
            registry,
            None,
        );
        let table = router.table();
        let _in_flight = [0, 0]
            .map(|index| InFlight::start(Arc::clone(&table), index, std::time::Instant::now()));
        assert_eq!(picks(&router, 4), "bbbb");
    }

    #[test]
    fn a_panic_under_the_pick_lock_does_not_poison_later_picks() {
        let router = Arc::new(router(&[1, 1]));
        let panicked = std::thread::spawn({
            let router = Arc::clone(&router);
            move || {
                let _picking = router.pick_lock.lock();
                panic!("a pick that panics");
            }
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(picks(&router, 4), "abab");
        router.install(routing(&upstreams(&[2, 1])));
        assert_eq!(picks(&router, 3), "aba");
    }

    #[test]
    fn when_every_upstream_rests_they_are_picked_all_the_same() {
        let router = router(&[1, 3]);
        let table = router.table();
        for peer in &table.peers {
            for _ in 0..peer.health.max_fails {
                peer.failed(UpstreamFailure::Error);
            }
        }
        assert!(
            table
                .peers
                .iter()
                .all(|peer| peer.upstream.health.state_name(&peer.health, now_ms()) == "resting")
        );
        // By their weights, as ever, once nginx's gradual recovery from the
        // failures has brought the effective weights back.
        let sequence = picks(&router, 40);
        assert_eq!(sequence[8..].matches('b').count(), 24, "{sequence}");
        assert_eq!(router.registry().metrics().picks_despite_rest.get(), 40);
        // One that is down by its checks is not picked.
        let down = HealthSettings::default();
        for _ in 0..down.fall {
            table.peers[1]
                .upstream
                .health
                .record_probe(Err("down".to_owned()), &down, now_ms());
        }
        assert_eq!(picks(&router, 3), "aaa");
    }
}
