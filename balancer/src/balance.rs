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

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use spike_config::balancer::UpstreamConfig;

use crate::upstream::{Registry, Upstream};

/// An upstream as one routing table sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub upstream: Arc<Upstream>,
    /// The configured weight; 0 takes the peer out of rotation.
    pub weight: u32,
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
        let table = build_table(upstreams, &registry);
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

    /// The next upstream of the smooth round-robin among those with a
    /// weight, or `None` when every weight is 0.
    pub fn pick(&self) -> Option<Arc<Upstream>> {
        let table = self.table.load();
        let _picking = self.pick_lock.lock().expect("pick lock");
        pick(&table.peers).map(|peer| Arc::clone(&peer.upstream))
    }
}

fn build_table(upstreams: &[UpstreamConfig], registry: &Registry) -> Table {
    let peers = upstreams
        .iter()
        .map(|config| {
            let upstream = registry.get_or_create(config.addr, config.weight);
            registry
                .metrics()
                .set_state(config.addr, config.weight, true);
            Peer {
                upstream,
                weight: config.weight,
            }
        })
        .collect();
    Table { peers }
}

/// nginx's pick, over the peers with a weight. Must run under the pick lock.
fn pick(peers: &[Peer]) -> Option<&Peer> {
    let mut best: Option<(&Peer, i64)> = None;
    let mut total = 0;
    for peer in peers.iter().filter(|peer| peer.weight > 0) {
        let upstream = &peer.upstream;
        let weight = i64::from(peer.weight);
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
    use std::net::SocketAddr;
    use std::time::Duration;

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
            })
            .collect();
        let pool = PoolSettings {
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_idle: 1,
        };
        Router::new(&upstreams, Registry::new(Arc::new(Metrics::new()), pool))
    }

    /// The letter of each pick: `a` for the first upstream, `b` for the next...
    fn picks(router: &Router, count: usize) -> String {
        (0..count)
            .map(|_| {
                let port = router.pick().unwrap().addr().port();
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
        assert!(self::router(&[0, 0]).pick().is_none());
    }

    #[test]
    fn concurrent_picks_keep_the_weights_exact() {
        let router = Arc::new(router(&[1, 2, 3, 4]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let router = Arc::clone(&router);
                std::thread::spawn(move || {
                    (0..2_500)
                        .map(|_| router.pick().unwrap().addr().port())
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
