//! The upstreams alive, by address: a new routing table finds the state of
//! the upstreams it keeps here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::health::State;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// The upstreams alive, held weakly: tables and requests keep them alive.
#[derive(Debug)]
pub struct Registry {
    /// Held only for a map lookup or insert; never across an `.await`.
    upstreams: Mutex<HashMap<SocketAddr, Weak<Upstream>>>,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            upstreams: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The upstream alive at `addr`, or a new one of configured `weight` in
    /// state `initial`; and whether it is new.
    pub fn get_or_create(
        &self,
        addr: SocketAddr,
        weight: u32,
        initial: State,
    ) -> (Arc<Upstream>, bool) {
        let mut upstreams = self.upstreams.lock();
        if let Some(upstream) = upstreams.get(&addr).and_then(Weak::upgrade) {
            return (upstream, false);
        }
        let upstream = Arc::new(Upstream::new(
            addr,
            weight,
            initial,
            Arc::clone(&self.metrics),
        ));
        upstreams.retain(|_, upstream| upstream.strong_count() > 0);
        upstreams.insert(addr, Arc::downgrade(&upstream));
        (upstream, true)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}
