//! Accepting connections: the connection limit, the parking lot of the
//! worker, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use super::connection::{self, Kept};
use super::counters::{Open, Rejection};
use super::park::Lot;
use super::{Handler, Server};

/// A pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl Server {
    /// Serves the connections accepted on `listener` until shutdown; then
    /// stops accepting, lets requests in flight finish for up to
    /// `shutdown_grace`, and closes idle keep-alive connections at once.
    /// `make_handler` makes the handler of each connection from the
    /// client's address.
    pub async fn serve<F, H>(&self, listener: TcpListener, make_handler: F)
    where
        F: Fn(SocketAddr) -> H + Send + Sync + 'static,
        H: Handler,
    {
        let shared = &self.shared;
        let make_handler = Arc::new(make_handler);
        let connections = TaskTracker::new();
        let lot = match Lot::new(Arc::clone(&shared.connections)) {
            Ok((lot, attendant)) => {
                let (shared, tracker, park, make_handler) = (
                    Arc::clone(shared),
                    connections.clone(),
                    Arc::clone(&lot),
                    Arc::clone(&make_handler),
                );
                let resume = move |kept: Kept, stream| {
                    let handler = make_handler(kept.peer);
                    let park = Some(Arc::clone(&park));
                    tracker.spawn(connection::serve(
                        Arc::clone(&shared),
                        stream,
                        handler,
                        kept,
                        park,
                    ));
                };
                connections.spawn(attendant.run(resume, self.shared.shutdown.clone()));
                Some(lot)
            }
            Err(err) => {
                // Idle connections are then closed where they would be parked.
                tracing::error!(error = %err, "cannot watch parked connections");
                None
            }
        };
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                _ = shared.shutdown.cancelled() => break,
            };
            // The permit is taken after the accept, so that no worker holds
            // one while its listener is quiet and another's backlog waits.
            let permit = match Arc::clone(&shared.permits).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    // This connection waits for the next free permit; the
                    // ones behind it wait in the kernel's backlog. Open
                    // connections, idle ones included, are left alone.
                    shared.rejections.reject(
                        Rejection::ConnectionLimit,
                        peer,
                        &"max_connections reached",
                    );
                    tokio::select! {
                        permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            // The semaphore is never closed.
                            Err(_) => break,
                        },
                        _ = shared.shutdown.cancelled() => break,
                    }
                }
            };
            // Replies are written whole: send them without Nagle's delay.
            let _ = stream.set_nodelay(true);
            let kept = Kept {
                peer,
                resumed: false,
                _permit: permit,
                _open: Open::new(&shared.connections),
            };
            let handler = make_handler(peer);
            connections.spawn(connection::serve(
                Arc::clone(shared),
                stream,
                handler,
                kept,
                lot.clone(),
            ));
        }
        shared.stopping.store(true, Ordering::Release);
        shared.stop.notify_waiters();
        drop(listener);
        connections.close();
        tokio::select! {
            _ = connections.wait() => {}
            _ = tokio::time::sleep(shared.settings.shutdown_grace) => {
                tracing::warn!(
                    grace = ?shared.settings.shutdown_grace,
                    "requests still in flight when the grace period ended; closing them"
                );
            }
        }
    }
}
