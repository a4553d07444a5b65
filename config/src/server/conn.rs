//! Accepting and serving connections: the connection limit, the header
//! and idle timeouts, the request checks, and graceful shutdown.
//!
//! Each connection is one task that drives hyper's HTTP/1 state machine and
//! watches the clock beside it. Reading, calling the service and writing the
//! response all happen while that task polls the connection, so the task
//! always knows the phase the connection is in, and which deadline applies:
//!
//! | phase | from | deadline |
//! |---|---|---|
//! | head | the connection opened, or a first byte arrived after an idle spell | `header_timeout`, then closed (a slowloris ends here) |
//! | busy | the head was read | none here: the body has its own ([`super::body`]), the upstream its own |
//! | idle | the response was written | `idle_timeout`, then closed |
//!
//! hyper's own header timeout is not used: it starts counting when the
//! connection becomes ready for a request, so it cannot tell a slow head
//! from an idle keep-alive connection.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::{HttpService, Service, service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use super::ServerSettings;
use super::body::RequestBody;
use super::frame;
use super::reject::{Rejection, Rejections};

/// A pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How long a keep-alive connection stays idle before it is parked: hyper's
/// state and its two 8 KiB buffers are freed, and only the socket is
/// watched until the next request comes (nginx frees its buffers the same
/// way). Setting that state up again costs about 10% of a proxied request's
/// CPU, so a connection whose next request follows at once keeps it.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// What a server serves: a service from a checked request to a reply with
/// a body `B`.
pub trait Handler<B>:
    Service<
        Request<RequestBody>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + Sync
    + 'static
{
}

impl<S, B> Handler<B> for S where
    S: Service<
            Request<RequestBody>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + Sync
        + 'static
{
}

/// The body of a handler's reply.
pub trait HandlerBody:
    Body<Data = Bytes, Error: Into<Box<dyn StdError + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<B> HandlerBody for B where
    B: Body<Data = Bytes, Error: Into<Box<dyn StdError + Send + Sync>>> + Send + Unpin + 'static
{
}

/// The body of a reply: the service's, or the server's own refusal.
pub type ReplyBody<B> = Watched<Either<B, Full<Bytes>>>;

/// A client-facing HTTP/1 server: its settings, its connection limit (one
/// for all its listeners), its refusals, and its shutdown. Shared by every
/// worker that serves a listener.
#[derive(Debug)]
pub struct Server {
    /// Shared with every connection's task.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: ServerSettings,
    http: http1::Builder,
    permits: Arc<Semaphore>,
    connections: Arc<ConnectionCounts>,
    rejections: Arc<Rejections>,
    shutdown: CancellationToken,
}

impl Server {
    pub fn new(
        settings: ServerSettings,
        rejections: Arc<Rejections>,
        shutdown: CancellationToken,
    ) -> Self {
        let mut http = http1::Builder::new();
        http.max_header_size(settings.max_header_bytes);
        if settings.max_headers != super::DEFAULT_MAX_HEADERS {
            // Headers then live on the heap, which costs hyper about 5%.
            http.max_headers(settings.max_headers);
        }
        let shared = Shared {
            http,
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            connections: Arc::default(),
            settings,
            rejections,
            shutdown,
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    pub fn settings(&self) -> &ServerSettings {
        &self.shared.settings
    }

    /// The client connections open now, and how many of them are parked.
    pub fn connections(&self) -> &Arc<ConnectionCounts> {
        &self.shared.connections
    }

    pub fn rejections(&self) -> &Arc<Rejections> {
        &self.shared.rejections
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shared.shutdown
    }

    /// Serves the connections accepted on `listener` until shutdown; then
    /// stops accepting, lets requests in flight finish for up to
    /// `shutdown_grace`, and closes idle keep-alive connections at once.
    /// `make_service` builds the service of each connection from the
    /// client's address.
    pub async fn serve<F, S, B>(&self, listener: TcpListener, mut make_service: F)
    where
        F: FnMut(SocketAddr) -> S,
        S: Handler<B>,
        B: HandlerBody,
    {
        let connections = TaskTracker::new();
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
                _ = self.shared.shutdown.cancelled() => break,
            };
            // The permit is taken after the accept, so that no worker holds
            // one while its listener is quiet and another's backlog waits.
            let permit = match Arc::clone(&self.shared.permits).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    // This connection waits for the next free permit; the
                    // ones behind it wait in the kernel's backlog.
                    self.shared.rejections.reject(
                        Rejection::ConnectionLimit,
                        peer,
                        &"max_connections reached",
                    );
                    tokio::select! {
                        permit = Arc::clone(&self.shared.permits).acquire_owned() => permit.expect("never closed"),
                        _ = self.shared.shutdown.cancelled() => break,
                    }
                }
            };
            // Replies are written whole: send them without Nagle's delay.
            let _ = stream.set_nodelay(true);
            let service = make_service(peer);
            let serving = self.connection(stream, peer, service, permit);
            connections.spawn(serving);
        }
        drop(listener);
        connections.close();
        tokio::select! {
            _ = connections.wait() => {}
            _ = tokio::time::sleep(self.shared.settings.shutdown_grace) => {
                tracing::warn!(
                    grace = ?self.shared.settings.shutdown_grace,
                    "requests still in flight when the grace period ended; closing them"
                );
            }
        }
    }

    /// Serves one connection until it ends, a deadline of its phase passes,
    /// or shutdown.
    fn connection<S, B>(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        service: S,
        permit: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        S: Handler<B>,
        B: HandlerBody,
    {
        let phase = Arc::new(PhaseClock::new());
        let mut stream = WatchedStream {
            inner: stream,
            phase: Arc::clone(&phase),
            unread: Bytes::new(),
        };
        let mut service = checked_service(
            service,
            &self.shared.settings,
            Arc::clone(&self.shared.rejections),
            peer,
            Arc::clone(&phase),
        );
        let shared = Arc::clone(&self.shared);
        async move {
            // Held until the connection ends, however it ends.
            let _permit = permit;
            let _open = Held::new(&shared.connections.open);
            let mut cancelled = std::pin::pin!(shared.shutdown.clone().cancelled_owned());
            let mut sleep: Pin<Box<Sleep>> =
                Box::pin(tokio::time::sleep(shared.settings.header_timeout));
            loop {
                // Boxed, so that parking the connection frees hyper's state
                // and buffers.
                let mut connection =
                    Box::new(shared.http.serve_connection(TokioIo::new(stream), service));
                let ended = drive(
                    &mut connection,
                    &phase,
                    &shared.settings,
                    sleep.as_mut(),
                    cancelled.as_mut(),
                )
                .await;
                match ended {
                    Ended::Done(Ok(())) => {
                        // Done by HTTP's rules (the client closed, or a reply
                        // said `Connection: close`): end the stream as hyper
                        // would have.
                        let mut stream = connection.into_parts().io.into_inner();
                        let _ = stream.inner.shutdown().await;
                        return;
                    }
                    Ended::Done(Err(err)) => {
                        if err.is_parse_too_large() {
                            shared
                                .rejections
                                .reject(Rejection::HeadersTooLarge, peer, &err);
                        } else if err.is_parse() {
                            shared.rejections.reject(Rejection::BadRequest, peer, &err);
                        } else {
                            tracing::debug!(%peer, error = %err, "connection ended with an error");
                        }
                        return;
                    }
                    Ended::HeaderTimeout => {
                        shared.rejections.reject(
                            Rejection::HeaderTimeout,
                            peer,
                            &"no complete head within header_timeout",
                        );
                        return;
                    }
                    Ended::IdleTimeout => return,
                    Ended::Parked => {}
                }
                let parts = connection.into_parts();
                service = parts.service;
                stream = parts.io.into_inner();
                if !parts.read_buf.is_empty() {
                    // Bytes of a next request that hyper had read: kept,
                    // copied out of hyper's buffer so that it is freed.
                    stream.unread = Bytes::copy_from_slice(&parts.read_buf);
                    continue;
                }
                drop(parts.read_buf);
                // Parked: only the socket, the service and this task remain
                // until the client sends its next request.
                let (_, since) = phase.get();
                sleep
                    .as_mut()
                    .reset(phase.deadline_after(since, shared.settings.idle_timeout));
                let _parked = Held::new(&shared.connections.parked);
                tokio::select! {
                    ready = stream.inner.readable() => {
                        if ready.is_err() {
                            return;
                        }
                    }
                    _ = sleep.as_mut() => return,
                    _ = cancelled.as_mut() => return,
                }
            }
        }
    }
}

/// The client connections of a server.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: AtomicU64,
    parked: AtomicU64,
}

impl ConnectionCounts {
    /// Connections open now, parked ones included.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Idle connections parked now: hyper's state freed, the socket
    /// watched.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }
}

/// One unit of a count, held until dropped.
struct Held<'a>(&'a AtomicU64);

impl<'a> Held<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP/1 state machine of one connection, as this server runs it.
type Connection<S> = http1::Connection<TokioIo<WatchedStream>, S>;

/// Why [`drive`] stopped driving a connection.
enum Ended {
    /// hyper finished the connection, with its result.
    Done(hyper::Result<()>),
    /// Idle for [`PARK_AFTER`]: hyper has let go of the connection, which
    /// may be served again.
    Parked,
    HeaderTimeout,
    IdleTimeout,
}

/// Drives hyper's state machine for one connection and keeps the deadline
/// of its phase: the header timeout while a head arrives, none while
/// busy, and while idle the moment to park it, or the idle timeout if that
/// comes first. On shutdown, an idle connection ends at once and a busy one
/// after its reply (hyper's graceful shutdown).
async fn drive<S, B>(
    connection: &mut Connection<S>,
    phase: &PhaseClock,
    settings: &ServerSettings,
    mut sleep: Pin<&mut Sleep>,
    mut cancelled: Pin<&mut WaitForCancellationFutureOwned>,
) -> Ended
where
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut armed_for = u64::MAX;
    let (mut parking, mut draining) = (false, false);
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = connection.poll_without_shutdown(cx) {
                return Poll::Ready(match result {
                    Ok(()) if parking => Ended::Parked,
                    result => Ended::Done(result),
                });
            }
            if !draining && !parking && cancelled.as_mut().poll(cx).is_ready() {
                draining = true;
                Pin::new(&mut *connection).graceful_shutdown();
                continue;
            }
            if draining || parking {
                return Poll::Pending;
            }
            let (current, since) = phase.get();
            let (limit, ended) = match current {
                Phase::Head => (settings.header_timeout, Ended::HeaderTimeout),
                Phase::Idle if PARK_AFTER < settings.idle_timeout => (PARK_AFTER, Ended::Parked),
                Phase::Idle => (settings.idle_timeout, Ended::IdleTimeout),
                Phase::Busy => return Poll::Pending,
            };
            let key = since * 4 + current as u64;
            if armed_for != key {
                sleep.as_mut().reset(phase.deadline_after(since, limit));
                armed_for = key;
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if !matches!(ended, Ended::Parked) {
                return Poll::Ready(ended);
            }
            // An idle connection: hyper closes it at once, without
            // touching the socket, and hands back what it had read.
            parking = true;
            Pin::new(&mut *connection).graceful_shutdown();
        }
    })
    .await
}

/// The service of one connection, with the request checks in front and the
/// phase kept up to date.
fn checked_service<S, B>(
    inner: S,
    settings: &ServerSettings,
    rejections: Arc<Rejections>,
    peer: SocketAddr,
    phase: Arc<PhaseClock>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ReplyBody<B>>,
    Error = Infallible,
    Future: Send + Unpin + 'static,
> + Send
+ Unpin
+ 'static
where
    S: Handler<B>,
    B: HandlerBody,
{
    let inner = Arc::new(inner);
    let (max_body, body_timeout) = (settings.max_body_bytes, settings.body_timeout);
    service_fn(move |mut req: Request<Incoming>| {
        phase.set(Phase::Busy);
        let checked = frame::check(&mut req, max_body);
        let (inner, rejections, phase) = (
            Arc::clone(&inner),
            Arc::clone(&rejections),
            Arc::clone(&phase),
        );
        // Boxed: hyper can hand back a connection (to park it) only if its
        // service's future is `Unpin`.
        Box::pin(async move {
            let close = match checked {
                Ok(close) => close,
                Err(refused) => {
                    rejections.reject(refused.reason, peer, &refused.detail);
                    let status = match refused.reason {
                        Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                        _ => StatusCode::BAD_REQUEST,
                    };
                    let reply = refusal(status, refused.reason, refused.detail);
                    return Ok(reply.map(|body| Watched::new(Either::Right(body), phase)));
                }
            };
            let req = req.map(|body| RequestBody::new(body, max_body, body_timeout));
            let mut reply = inner.call(req).await?;
            if close {
                reply
                    .headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(reply.map(|body| Watched::new(Either::Left(body), phase)))
        })
    })
}

/// The server's own refusal: a short JSON body, and the connection closed.
pub fn refusal(status: StatusCode, reason: Rejection, detail: &str) -> Response<Full<Bytes>> {
    let body = format!("{{\"error\":\"{reason}\",\"detail\":\"{detail}\"}}\n");
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    let headers = reply.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    reply
}

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Head = 0,
    Busy = 1,
    Idle = 2,
}

/// A connection's phase and when it began (milliseconds since the
/// connection opened). Shared by the stream, the service and the reply
/// body of one connection, all driven by its one task: relaxed atomics only
/// because the service must be `Send`.
#[derive(Debug)]
struct PhaseClock {
    start: Instant,
    phase: AtomicU8,
    since: AtomicU64,
}

impl PhaseClock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            phase: AtomicU8::new(Phase::Head as u8),
            since: AtomicU64::new(0),
        }
    }

    fn get(&self) -> (Phase, u64) {
        let phase = match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Head,
            1 => Phase::Busy,
            _ => Phase::Idle,
        };
        (phase, self.since.load(Ordering::Relaxed))
    }

    /// The moment `limit` after `since` (milliseconds since the start).
    fn deadline_after(&self, since: u64, limit: Duration) -> Instant {
        self.start + Duration::from_millis(since) + limit
    }

    fn set(&self, phase: Phase) {
        self.since
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }
}

/// The client's TCP stream: the first byte read after an idle spell starts
/// a head. `unread` holds bytes read from the socket before the connection
/// was parked, to be read again first.
#[derive(Debug)]
struct WatchedStream {
    inner: TcpStream,
    phase: Arc<PhaseClock>,
    unread: Bytes,
}

impl AsyncRead for WatchedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = if this.unread.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            Poll::Ready(Ok(()))
        };
        if buf.filled().len() > before && this.phase.get().0 == Phase::Idle {
            this.phase.set(Phase::Head);
        }
        read
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A reply body that, once written (dropped), makes its connection idle.
#[derive(Debug)]
pub struct Watched<B> {
    inner: B,
    phase: Arc<PhaseClock>,
}

impl<B> Watched<B> {
    fn new(inner: B, phase: Arc<PhaseClock>) -> Self {
        Self { inner, phase }
    }
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        self.phase.set(Phase::Idle);
    }
}

impl<B: Body + Unpin> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
