//! Serving: the accept loop, the HTTP/1 settings, and graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use spike_config::NodeConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::Handler;
use crate::sale::Sale;
use crate::store::Store;

/// How long a client may take to send a request's headers. hyper enforces it
/// only when the connection has a timer, which [`run`] gives it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests may take to finish after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid redis_url: {0}")]
    RedisUrl(#[from] redis::RedisError),
    #[error("cannot read the listener's address: {0}")]
    Listener(#[from] std::io::Error),
}

/// Serves the node on `listener` until `shutdown` is cancelled, then lets
/// in-flight requests finish for up to [`SHUTDOWN_GRACE`].
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
    let store = Store::new(&config.redis_url, &config.event, config.redis_timeout)?;
    let sale = Arc::new(Sale::new(
        name,
        config.total_stock,
        config.local_stock,
        store,
    ));
    let sync = tokio::spawn({
        let sale = Arc::clone(&sale);
        let (interval, stop) = (config.sync_interval, shutdown.clone());
        async move { sale.sync(interval, stop).await }
    });
    tracing::info!(
        node = sale.name(),
        %local,
        event = %config.event,
        local_stock = config.local_stock,
        "serving"
    );

    let handler = Arc::new(Handler::new(sale));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Replies are small and written at once: send them without delay.
        let _ = stream.set_nodelay(true);
        let handler = Arc::clone(&handler);
        let service = service_fn(move |req| {
            let handler = Arc::clone(&handler);
            async move { handler.handle(req).await }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still in flight after {SHUTDOWN_GRACE:?}; closing them");
        }
    }
    let _ = sync.await;
    Ok(())
}
