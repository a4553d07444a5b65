//! Serving: the node's state, its background sync, and its listener.

use std::sync::Arc;

use spike_config::NodeConfig;
use spike_http1::server::{Rejections, Server};
use spike_http1::task;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::Api;
use crate::sale::{Sale, Terms};
use crate::store::Store;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid Redis setting: {0}")]
    RedisUrl(#[from] redis::RedisError),
    #[error("cannot read the listener's address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Serves the node on `listener` until `shutdown` is cancelled, then lets
/// requests in flight finish (see [`Server`]).
pub async fn run(
    listener: TcpListener,
    config: &NodeConfig,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let local = listener.local_addr()?;
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| format!("node-{}", local.port()));
    let store = Store::with_replica_acks(
        &config.redis,
        &config.event,
        config.redis_timeout,
        config.replica_acks,
    )?;
    let terms = Terms {
        name,
        total: config.total_stock,
        local_stock: config.local_stock,
        pay_window: config.pay_window,
        opens_at: config.opens_at.map(millis_since_epoch),
    };
    let sale = Arc::new(Sale::new(terms, store));
    let sync = task::supervise("sync", shutdown.clone(), {
        let sale = Arc::clone(&sale);
        let (interval, stop) = (config.sync_interval, shutdown.clone());
        move || {
            let (sale, stop) = (Arc::clone(&sale), stop.clone());
            async move { sale.sync(interval, stop).await }
        }
    });
    let expiry = task::supervise("expiry", shutdown.clone(), {
        let sale = Arc::clone(&sale);
        let (interval, stop) = (config.sweep_interval, shutdown.clone());
        move || {
            let (sale, stop) = (Arc::clone(&sale), stop.clone());
            async move { sale.expire(interval, stop).await }
        }
    });
    tracing::info!(
        node = sale.name(),
        %local,
        event = %config.event,
        local_stock = config.local_stock,
        "serving"
    );

    // Refused input counts with the node's other rejected requests.
    let rejections = Arc::new(Rejections::with_hook({
        let sale = Arc::clone(&sale);
        move |_| {
            sale.counters.rejected();
        }
    }));
    let server = Server::new(config.server.clone(), rejections, shutdown);
    let api = Arc::new(Api::new(sale));
    server.serve(listener, move |_peer| Arc::clone(&api)).await;
    let _ = tokio::join!(sync, expiry);
    Ok(())
}

/// Milliseconds from the epoch to `time` (0 before it).
pub fn millis_since_epoch(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
