//! `[server]`: the settings of a client-facing HTTP/1 listener, shared by the
//! node and the balancer, and [`serve`], the accept loop that applies them.
//!
//! HTTP/1.0 and HTTP/1.1 clients are both served, with keep-alive when they
//! ask for it (`ab -k` sends `Connection: keep-alive` over HTTP/1.0).

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use toml::Spanned;

use crate::source::{self, Validator};

/// How long a client may take to send a request's headers, and how long an
/// idle keep-alive connection waits for its next request. hyper enforces it
/// only on a connection that has a timer, which [`serve`] gives it.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may take to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The validated `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub header_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Worker threads of the runtime; `None` (the default) means one per
    /// core, like nginx's `worker_processes auto`.
    pub workers: Option<usize>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            workers: None,
        }
    }
}

/// The `[server]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    header_timeout: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    workers: Option<Spanned<u64>>,
}

impl ServerSettings {
    pub(crate) fn validate(raw: Option<RawServer>, v: &mut Validator<'_>) -> Self {
        let raw = raw.unwrap_or_default();
        let defaults = Self::default();
        Self {
            header_timeout: v.field(
                raw.header_timeout,
                defaults.header_timeout,
                source::duration,
            ),
            shutdown_grace: v.field(
                raw.shutdown_grace,
                defaults.shutdown_grace,
                source::duration,
            ),
            workers: v.field(raw.workers, defaults.workers, |n| {
                source::at_least(1)(n).map(|n| Some(n as usize))
            }),
        }
    }

    /// The multi-threaded runtime these settings ask for.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(workers) = self.workers {
            builder.worker_threads(workers);
        }
        builder.enable_all().build()
    }
}

/// Serves HTTP/1 connections accepted on `listener` until `shutdown` is
/// cancelled; then stops accepting, lets requests in flight finish for up to
/// `shutdown_grace`, and closes idle keep-alive connections at once.
///
/// `make_service` builds the service of each connection from the client's
/// address.
pub async fn serve<F, S>(
    listener: TcpListener,
    settings: &ServerSettings,
    shutdown: CancellationToken,
    mut make_service: F,
) where
    F: FnMut(SocketAddr) -> S,
    S: HttpService<Incoming, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as Body>::Data: Send,
    <S::ResBody as Body>::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    let graceful = GracefulShutdown::new();
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
            _ = shutdown.cancelled() => break,
        };
        // Replies are written whole: send them without Nagle's delay.
        let _ = stream.set_nodelay(true);
        let connection = http.serve_connection(TokioIo::new(stream), make_service(peer));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(settings.shutdown_grace) => {
            tracing::warn!(
                grace = ?settings.shutdown_grace,
                "requests still in flight when the grace period ended; closing them"
            );
        }
    }
}

/// A token cancelled on the first SIGTERM or Ctrl-C (SIGINT): the shutdown
/// signal of a binary.
pub fn shutdown_on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}
