//! A routing table: one configuration, made into what requests are routed
//! by. Immutable once built: a change to the configuration is a new table,
//! made current whole by one store ([`crate::balance::Router::install`]).
//! It holds every setting a request or a probe reads (each upstream's
//! weight and checks, `[proxy]`, the pool's, the rate limit), while the
//! state that must outlive it (weights of the round-robin, health,
//! counters, connections) lives in the [`Upstream`]s it shares with the
//! tables before and after it.

use std::net::SocketAddr;
use std::sync::Arc;

use spike_config::BalancerConfig;
use spike_config::balancer::{ProxySettings, RateLimitSettings, UpstreamConfig};
use spike_config::health::HealthSettings;

use crate::error::UpstreamFailure;
use crate::health::State;
use crate::limit::RateLimit;
use crate::pool::PoolSettings;
use crate::registry::Registry;
use crate::upstream::Upstream;

/// An upstream as one routing table sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub upstream: Arc<Upstream>,
    /// The configured weight; 0 takes the peer out of rotation.
    pub weight: u32,
    pub backup: bool,
    /// Its checks, from this table's configuration.
    pub health: Arc<HealthSettings>,
}

impl Peer {
    /// Counts a failure of live traffic at this peer's upstream.
    pub fn failed(&self, failure: UpstreamFailure) {
        self.upstream.failed(failure, self.weight, &self.health);
    }

    /// Brings the upstream's health gauges up to date.
    pub fn refresh_metrics(&self) {
        self.upstream.refresh_metrics(&self.health);
    }
}

/// One immutable routing table: the peers in file order, and how requests
/// routed by it are admitted and sent.
#[derive(Debug)]
pub struct Table {
    pub peers: Vec<Peer>,
    pub proxy: ProxySettings,
    pub pool: PoolSettings,
    /// The per-client rate limit, if on; kept by a new table with the same
    /// settings, so that a reload does not refill every bucket.
    pub rate_limit: Option<Arc<RateLimit>>,
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

impl Table {
    /// The table of `routing`, keeping the upstreams alive in `registry`
    /// and the rate limit of `current`; an upstream it is the first to
    /// name starts in state `initial`. Also returns those new upstreams.
    pub fn build(
        routing: Routing<'_>,
        current: Option<&Table>,
        registry: &Registry,
        initial: impl Fn(&UpstreamConfig) -> State,
    ) -> (Self, Vec<Arc<Upstream>>) {
        let rate_limit = match current.and_then(|table| table.rate_limit.as_ref()) {
            Some(limit) if limit.settings() == routing.rate_limit => Some(Arc::clone(limit)),
            _ => RateLimit::new(routing.rate_limit).map(Arc::new),
        };
        let mut new = Vec::new();
        let peers = routing
            .upstreams
            .iter()
            .map(|config| {
                let (upstream, created) =
                    registry.get_or_create(config.addr, config.weight, initial(config));
                if created {
                    new.push(Arc::clone(&upstream));
                }
                let peer = Peer {
                    upstream,
                    weight: config.weight,
                    backup: config.backup,
                    health: Arc::new(config.health.clone()),
                };
                registry.metrics().set_weight(config.addr, config.weight);
                peer.refresh_metrics();
                peer
            })
            .collect();
        let table = Table {
            peers,
            proxy: routing.proxy.clone(),
            pool: PoolSettings::from(routing.proxy),
            rate_limit,
        };
        (table, new)
    }

    /// The peer of the upstream at `addr`.
    pub fn peer(&self, addr: SocketAddr) -> Option<&Peer> {
        self.peers.iter().find(|peer| peer.upstream.addr() == addr)
    }

    /// Whether `other` routes to the same upstreams with the same weights.
    pub(crate) fn same_weights(&self, other: &Table) -> bool {
        self.peers.len() == other.peers.len()
            && self.peers.iter().zip(&other.peers).all(|(a, b)| {
                a.upstream.addr() == b.upstream.addr()
                    && a.weight == b.weight
                    && a.backup == b.backup
            })
    }
}
