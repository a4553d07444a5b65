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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use spike_config::BalancerConfig;
use spike_config::balancer::{ProxySettings, RateLimitSettings, UpstreamConfig};

use crate::health::{State, now_ms};
use crate::limit::RateLimit;
use crate::pool::PoolSettings;
use crate::upstream::{InFlight, Registry, Upstream};

/// An upstream as one routing table sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub upstream: Arc<Upstream>,
    /// The configured weight; 0 takes the peer out of rotation.
    pub weight: u32,
    pub backup: bool,
}

/// One immutable routing table: the peers in file order, and how requests
/// routed by it are admitted and sent.
#[derive(Debug)]
pub struct Table {
    pub peers: Vec<Peer>,
    pub proxy: ProxySettings,
    /// The per-client rate limit, if on; kept by a new table with the same
    /// settings, so that a reload does not refill every bucket.
    pub rate_limit: Option<Arc<RateLimit>>,
}

impl Table {
    /// The peer of the upstream at `addr`.
    pub fn peer(&self, addr: SocketAddr) -> Option<&Peer> {
        self.peers.iter().find(|peer| peer.upstream.addr() == addr)
    }

    /// Whether `other` routes to the same upstreams with the same weights.
    fn same_weights(&self, other: &Table) -> bool {
        self.peers.len() == other.peers.len()
            && self.peers.iter().zip(&other.peers).all(|(a, b)| {
                a.upstream.addr() == b.upstream.addr()
                    && a.weight == b.weight
                    && a.backup == b.backup
            })
    }
}

/// The current routing table and the state of the smooth round-robin.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<Table>,
    /// Serialises picks and table changes. The state it guards is the
    /// `current_weight` and `effective_weight` of the upstreams, which live
    /// in the upstreams themselves so that they outlast any one table, and
    /// which table is current. Held for one loop over the peers, never
    /// across an `.await`.
    pick_lock: Mutex<()>,
    registry: Registry,
}

impl Router {
    /// A router over the upstreams of the configuration the balancer starts
    /// with, all taken to be up until their checks say otherwise.
    pub fn new(routing: Routing<'_>, registry: Registry) -> Self {
        let table = build_table(routing, None, &registry, |_| State::Up);
        Self {
            table: ArcSwap::from_pointee(table),
            pick_lock: Mutex::new(()),
            registry,
        }
    }

    /// Makes a table of `upstreams` current, from the next pick on.
    /// Upstreams it keeps keep their state; a new one starts unknown (it
    /// serves once its checks pass), or up if its checks are off. If the
    /// weights changed, the round-robin starts over, so that every window
    /// of the new weights' sum holds each upstream exactly its weight from
    /// the first pick; otherwise it goes on where it was.
    pub fn install(&self, routing: Routing<'_>) {
        let current = self.table.load_full();
        let table = build_table(routing, Some(&current), &self.registry, |config| {
            if config.health.enabled {
                State::Unknown
            } else {
                State::Up
            }
        });
        let _picking = self.pick_lock.lock().expect("pick lock");
        if !table.same_weights(&self.table.load()) {
            for peer in &table.peers {
                peer.upstream.current_weight.store(0, Ordering::Relaxed);
            }
        }
        self.table.store(Arc::new(table));
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
    /// so that `max_requests_per_upstream` holds across threads). `None`
    /// when none can.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<(Peer, InFlight)> {
        let now = now_ms();
        let _picking = self.pick_lock.lock().expect("pick lock");
        // Loaded under the lock: a pick never mixes the state of one table
        // with the weights of another.
        let table = self.table.load();
        let busy = table.proxy.max_requests_per_upstream;
        let peer = pick(&table.peers, false, tried, busy, now)
            .or_else(|| pick(&table.peers, true, tried, busy, now))?;
        let upstream = &peer.upstream;
        upstream.health.picked(|| upstream.health_settings(), now);
        Some((peer.clone(), upstream.start_request()))
    }
}

/// What a routing table is built from: a configuration's upstreams,
/// `[proxy]` and `[rate_limit]`.
#[derive(Debug, Clone, Copy)]
pub struct Routing<'a> {
    pub upstreams: &'a [UpstreamConfig],
    pub proxy: &'a ProxySettings,
    pub rate_limit: &'a RateLimitSettings,
}

impl<'a> From<&'a BalancerConfig> for Routing<'a> {
    fn from(config: &'a BalancerConfig) -> Self {
        Self {
            upstreams: &config.upstreams,
            proxy: &config.proxy,
            rate_limit: &config.rate_limit,
        }
    }
}

fn build_table(
    routing: Routing<'_>,
    current: Option<&Table>,
    registry: &Registry,
    initial: impl Fn(&UpstreamConfig) -> State,
) -> Table {
    let pool = PoolSettings::from(routing.proxy);
    let rate_limit = match current.and_then(|table| table.rate_limit.as_ref()) {
        Some(limit) if limit.settings() == routing.rate_limit => Some(Arc::clone(limit)),
        _ => RateLimit::new(routing.rate_limit).map(Arc::new),
    };
    let peers = routing
        .upstreams
        .iter()
        .map(|config| {
            let upstream = registry.get_or_create(config, pool, initial(config));
            registry.metrics().set_weight(config.addr, config.weight);
            upstream.refresh_metrics();
            Peer {
                upstream,
                weight: config.weight,
                backup: config.backup,
            }
        })
        .collect();
    Table {
        peers,
        proxy: routing.proxy.clone(),
        rate_limit,
    }
}

/// nginx's pick, over the peers of the kind `backup` that may take the
/// request at `now`, are not in `tried` and have fewer than `busy` requests
/// in flight (if `busy` is not 0). Must run under the pick lock.
fn pick<'a>(
    peers: &'a [Peer],
    backup: bool,
    tried: &[SocketAddr],
    busy: u32,
    now: u64,
) -> Option<&'a Peer> {
    let mut best: Option<(&Peer, i64)> = None;
    let mut total = 0;
    let candidates = peers.iter().filter(|peer| {
        peer.backup == backup
            && peer.weight > 0
            && !tried.contains(&peer.upstream.addr())
            && (busy == 0 || peer.upstream.stats.in_flight.get() < i64::from(busy))
    });
    for peer in candidates {
        let upstream = &peer.upstream;
        // Down, resting, or ramping up after coming back.
        let Some(weight) =
            upstream
                .health
                .weight_now(peer.weight, || upstream.health_settings(), now)
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
            best = Some((peer, current));
        }
    }
    let (peer, current) = best?;
    peer.upstream
        .current_weight
        .store(current - total, Ordering::Relaxed);
    Some(peer)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use spike_config::health::HealthSettings;

    use super::*;
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
        let registry = Registry::new(Arc::new(Metrics::new()), None);
        Router::new(routing(&upstreams(weights)), registry)
    }

    /// The letter of each pick: `a` for the first upstream, `b` for the next...
    fn picks(router: &Router, count: usize) -> String {
        (0..count)
            .map(|_| {
                let port = router.pick(&[]).unwrap().0.upstream.addr().port();
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
                        .map(|_| router.pick(&[]).unwrap().0.upstream.addr().port())
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
        first.stats.requests.inc();
        router.install(routing(&upstreams(&[1, 1, 1])));
        let table = router.table();
        assert!(Arc::ptr_eq(&first, &table.peers[0].upstream));
        assert_eq!(table.peers[0].upstream.stats.requests.get(), 1);
        assert_eq!(table.peers[2].upstream.health.state(), State::Unknown);
        // Until it passes its checks, the new upstream gets nothing.
        assert_eq!(picks(&router, 6), "ababab");
    }

    #[test]
    fn a_busy_upstream_is_skipped() {
        let registry = Registry::new(Arc::new(Metrics::new()), None);
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
        );
        let first = Arc::clone(&router.table().peers[0].upstream);
        let _in_flight = [first.start_request(), first.start_request()];
        assert_eq!(picks(&router, 4), "bbbb");
    }
}
