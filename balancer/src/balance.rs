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
use spike_config::balancer::UpstreamConfig;

use crate::health::{State, now_ms};
use crate::upstream::{Registry, Upstream};

/// An upstream as one routing table sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub upstream: Arc<Upstream>,
    /// The configured weight; 0 takes the peer out of rotation.
    pub weight: u32,
    pub backup: bool,
}

/// One immutable routing table: the peers in file order.
#[derive(Debug)]
pub struct Table {
    pub peers: Vec<Peer>,
}

/// The current routing table and the state of the smooth round-robin.
#[derive(Debug)]
pub struct Router {
    table: ArcSwap<Table>,
    /// Serialises picks. The state it guards is the `current_weight` and
    /// `effective_weight` of the upstreams, which live in the upstreams
    /// themselves so that they outlast any one table. Held for one loop
    /// over the peers, never across an `.await`.
    pick_lock: Mutex<()>,
    registry: Registry,
}

impl Router {
    pub fn new(upstreams: &[UpstreamConfig], registry: Registry) -> Self {
        let table = build_table(upstreams, &registry, State::Up);
        Self {
            table: ArcSwap::from_pointee(table),
            pick_lock: Mutex::new(()),
            registry,
        }
    }

    /// The current routing table.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The next upstream of the smooth round-robin among those that may
    /// take requests and are not in `tried`: a primary if any can, else a
    /// backup. `None` when none can.
    pub fn pick(&self, tried: &[SocketAddr]) -> Option<Peer> {
        let table = self.table.load();
        let now = now_ms();
        let _picking = self.pick_lock.lock().expect("pick lock");
        let peer = pick(&table.peers, false, tried, now)
            .or_else(|| pick(&table.peers, true, tried, now))?;
        let upstream = &peer.upstream;
        upstream.health.picked(|| upstream.health_settings(), now);
        Some(peer.clone())
    }
}

fn build_table(upstreams: &[UpstreamConfig], registry: &Registry, initial: State) -> Table {
    let peers = upstreams
        .iter()
        .map(|config| {
            let upstream =
                registry.get_or_create(config.addr, config.weight, &config.health, initial);
            registry.metrics().set_weight(config.addr, config.weight);
            upstream.refresh_metrics();
            Peer {
                upstream,
                weight: config.weight,
                backup: config.backup,
            }
        })
        .collect();
    Table { peers }
}

/// nginx's pick, over the peers of the kind `backup` that may take the
/// request at `now` and are not in `tried`. Must run under the pick lock.
fn pick<'a>(peers: &'a [Peer], backup: bool, tried: &[SocketAddr], now: u64) -> Option<&'a Peer> {
    let mut best: Option<(&Peer, i64)> = None;
    let mut total = 0;
    let candidates = peers.iter().filter(|peer| {
        peer.backup == backup && peer.weight > 0 && !tried.contains(&peer.upstream.addr())
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
    use std::time::Duration;

    use spike_config::health::HealthSettings;

    use super::*;
    use crate::metrics::Metrics;
    use crate::pool::PoolSettings;

    fn router(weights: &[u32]) -> Router {
        let upstreams: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| UpstreamConfig {
                addr: SocketAddr::from(([127, 0, 0, 1], 3001 + i as u16)),
                weight,
                backup: false,
                health: HealthSettings::default(),
            })
            .collect();
        let pool = PoolSettings {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_idle: 1,
        };
        Router::new(
            &upstreams,
            Registry::new(Arc::new(Metrics::new()), pool, None),
        )
    }

    /// The letter of each pick: `a` for the first upstream, `b` for the next...
    fn picks(router: &Router, count: usize) -> String {
        (0..count)
            .map(|_| {
                let port = router.pick(&[]).unwrap().upstream.addr().port();
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
                        .map(|_| router.pick(&[]).unwrap().upstream.addr().port())
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
}
