//! Accepting and serving connections: the connection limit, the header,
//! idle and send timeouts, the request checks, parking idle connections,
//! and graceful shutdown.
//!
//! Each connection is one task that drives hyper's HTTP/1 state machine and
//! watches the clock beside it. Reading, calling the service and writing the
//! response all happen while that task polls the connection, so the task
//! always knows the phase the connection is in, and which deadline applies:
//!
//! | phase | from | deadline |
//! |---|---|---|
//! | head | the connection opened, or a first byte arrived after a reply | `header_timeout`, then closed (a slowloris ends here) |
//! | busy | the head was read | none here: the body has its own ([`super::body`]), the upstream its own |
//! | flushing | hyper took the whole reply | none here |
//! | idle | hyper wrote the reply out | [`PARK_AFTER`], then parked; `idle_timeout`, then closed |
//!
//! In every phase, a write that waits for the client longer than
//! `send_timeout` closes the connection. hyper's own header timeout is not
//! used: it starts counting when the connection becomes ready for a
//! request, so it cannot tell a slow head from an idle keep-alive
//! connection.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::{HttpService, Service, service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

use super::ServerSettings;
use super::body::RequestBody;
use super::frame;
use super::park::{Lot, Parked};
use super::reject::{Rejection, Rejections};

/// A pause after a failed accept (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How long a keep-alive connection stays idle before it is parked
/// ([`super::park`]): its task, hyper's state and its two 8 KiB buffers are
/// freed, and only the socket is watched until the next request comes
/// (nginx frees its buffers the same way). Setting that state up again
/// costs about 10% of a proxied request's CPU, so a connection whose next
/// request follows at once keeps it.
pub(super) const PARK_AFTER: Duration = Duration::from_millis(100);

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
    pub async fn serve<F, S, B>(&self, listener: TcpListener, make_service: F)
    where
        F: Fn(SocketAddr) -> S + Send + Sync + 'static,
        S: Handler<B>,
        B: HandlerBody,
    {
        let make_service = Arc::new(make_service);
        let connections = TaskTracker::new();
        let lot = match Lot::new(Arc::clone(&self.shared.connections)) {
            Ok((lot, attendant)) => {
                let (shared, tracker, park, make_service) = (
                    Arc::clone(&self.shared),
                    connections.clone(),
                    Arc::clone(&lot),
                    Arc::clone(&make_service),
                );
                let resume = move |kept: Kept, stream| {
                    let service = make_service(kept.peer);
                    let park = Some(Arc::clone(&park));
                    tracker.spawn(connection(Arc::clone(&shared), stream, service, kept, park));
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
                _ = self.shared.shutdown.cancelled() => break,
            };
            // The permit is taken after the accept, so that no worker holds
            // one while its listener is quiet and another's backlog waits.
            let permit = match Arc::clone(&self.shared.permits).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    // This connection waits for the next free permit; the
                    // ones behind it wait in the kernel's backlog. Open
                    // connections, idle ones included, are left alone.
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
            let kept = Kept {
                peer,
                parked_before: false,
                _permit: permit,
                _open: Open::new(&self.shared.connections),
            };
            let service = make_service(peer);
            let serving = connection(Arc::clone(&self.shared), stream, service, kept, lot.clone());
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
}

/// What a client connection keeps from one request to the next, parked or
/// not: nothing on the heap, so that a parked connection holds no memory of
/// its own but its place in the lot.
struct Kept {
    peer: SocketAddr,
    /// Whether it has served a request, and so comes back from the lot.
    parked_before: bool,
    _permit: OwnedSemaphorePermit,
    _open: Open,
}

/// Serves one connection with `service` until it ends, a deadline of its
/// phase passes, or shutdown; or, once it is idle, parks it in `lot`.
fn connection<S, B>(
    shared: Arc<Shared>,
    stream: TcpStream,
    service: S,
    mut kept: Kept,
    lot: Option<Arc<Lot<Kept>>>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: Handler<B>,
    B: HandlerBody,
{
    // Back from the lot, its socket readable: idle until hyper reads the
    // first byte of a head, which starts the header timeout.
    let phase = Arc::new(PhaseClock::new(if kept.parked_before {
        Phase::Idle
    } else {
        Phase::Head
    }));
    let mut stream = WatchedStream {
        inner: stream,
        phase: Arc::clone(&phase),
        unread: Bytes::new(),
    };
    let mut service = checked_service(
        service,
        &shared.settings,
        Arc::clone(&shared.rejections),
        kept.peer,
        Arc::clone(&phase),
    );
    async move {
        let peer = kept.peer;
        let mut cancelled = std::pin::pin!(shared.shutdown.clone().cancelled_owned());
        let mut sleep: Pin<Box<Sleep>> =
            Box::pin(tokio::time::sleep(shared.settings.header_timeout));
        loop {
            // Boxed, so that parking the connection frees hyper's state and
            // buffers.
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
                    // said `Connection: close`), and the reply flushed.
                    let stream = connection.into_parts().io.into_inner();
                    linger(&stream.inner, sleep.as_mut()).await;
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
                Ended::SendTimeout => {
                    tracing::debug!(%peer, "the client stopped reading its reply: closed");
                    return;
                }
                Ended::IdleTimeout => return,
                Ended::Parked => {}
            }
            let parts = connection.into_parts();
            service = parts.service;
            stream = parts.io.into_inner();
            if !parts.read_buf.is_empty() {
                // Bytes of a next request that hyper had read: kept, copied
                // out of hyper's buffer so that it is freed.
                stream.unread = Bytes::copy_from_slice(&parts.read_buf);
                continue;
            }
            // Parked: the socket leaves tokio's reactor for the lot, and
            // this task ends. If it cannot, the idle connection is closed.
            let (_, since) = phase.get();
            let deadline = phase.deadline_after(since, shared.settings.idle_timeout);
            kept.parked_before = true;
            if let (Some(lot), Ok(stream)) = (lot, stream.inner.into_std()) {
                lot.park(Parked {
                    stream,
                    deadline,
                    conn: kept,
                });
            }
            return;
        }
    }
}

/// How long a closed connection's input is read and discarded: see
/// [`linger`].
const LINGER: Duration = Duration::from_secs(5);

/// Reads and discards what the client still sends after the reply that
/// ended its connection, until it closes its side or [`LINGER`] passes
/// (nginx's lingering close). Closing a socket with unread input resets
/// the connection, and the reset can destroy the reply before the client
/// has read it: a 413 to a client still sending its body, say.
async fn linger(stream: &TcpStream, mut sleep: Pin<&mut Sleep>) {
    sleep.as_mut().reset(Instant::now() + LINGER);
    loop {
        match discard(stream) {
            Ok(false) => {}
            Ok(true) | Err(_) => return,
        }
        tokio::select! {
            ready = stream.readable() => {
                if ready.is_err() {
                    return;
                }
            }
            _ = sleep.as_mut() => return,
        }
    }
}

/// Reads what `stream` has until it would block; true at its end.
fn discard(stream: &TcpStream) -> io::Result<bool> {
    let mut sink = [0u8; 4096];
    loop {
        match stream.try_read(&mut sink) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(err) => return Err(err),
        }
    }
}

/// The client connections of a server.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: AtomicU64,
    pub(super) parked: AtomicU64,
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

/// One open connection in a server's count, until dropped.
struct Open(Arc<ConnectionCounts>);

impl Open {
    fn new(counts: &Arc<ConnectionCounts>) -> Self {
        counts.open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counts))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP/1 state machine of one connection, as this server runs it.
type Connection<S> = http1::Connection<TokioIo<WatchedStream>, S>;

/// Why [`drive`] stopped driving a connection.
enum Ended {
    /// hyper finished the connection, with its result; a reply it was
    /// writing is flushed and the socket's write side shut.
    Done(hyper::Result<()>),
    /// Idle for [`PARK_AFTER`]: hyper has let go of the connection, which
    /// may be served again.
    Parked,
    HeaderTimeout,
    IdleTimeout,
    SendTimeout,
}

/// Drives hyper's state machine for one connection and keeps its
/// deadlines: the header timeout while a head arrives; while idle, the
/// moment to park it, or the idle timeout if that comes first; and,
/// whatever the phase, the send timeout while a write waits for the client.
/// On shutdown, an idle connection ends at once and a busy one after its
/// reply (hyper's graceful shutdown).
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
    let mut armed = None;
    let (mut parking, mut draining, mut finishing) = (false, false, false);
    std::future::poll_fn(|cx| {
        loop {
            if finishing {
                // Polled as a future, hyper flushes what it still holds and
                // then shuts the socket's write side.
                if let Poll::Ready(result) = Pin::new(&mut *connection).poll(cx) {
                    return Poll::Ready(Ended::Done(result));
                }
            } else if let Poll::Ready(result) = connection.poll_without_shutdown(cx) {
                match result {
                    // Parked only once idle, when nothing is left to write.
                    Ok(()) if parking => return Poll::Ready(Ended::Parked),
                    Ok(()) => {
                        finishing = true;
                        continue;
                    }
                    Err(err) => return Poll::Ready(Ended::Done(Err(err))),
                }
            }
            if !draining && cancelled.as_mut().poll(cx).is_ready() {
                draining = true;
                Pin::new(&mut *connection).graceful_shutdown();
                continue;
            }
            let (current, since) = phase.get();
            let mut next = match current {
                Phase::Head => Some((settings.header_timeout, Ended::HeaderTimeout)),
                Phase::Idle
                    if !(parking || draining || finishing)
                        && PARK_AFTER < settings.idle_timeout =>
                {
                    Some((PARK_AFTER, Ended::Parked))
                }
                Phase::Idle => Some((settings.idle_timeout, Ended::IdleTimeout)),
                Phase::Busy | Phase::Flushing => None,
            }
            .map(|(limit, ended)| (phase.deadline_after(since, limit), ended));
            if let Some(stalled) = phase.write_stalled_since() {
                let deadline = phase.deadline_after(stalled, settings.send_timeout);
                if next.as_ref().is_none_or(|(other, _)| deadline < *other) {
                    next = Some((deadline, Ended::SendTimeout));
                }
            }
            let Some((deadline, ended)) = next else {
                return Poll::Pending;
            };
            if armed != Some(deadline) {
                sleep.as_mut().reset(deadline);
                armed = Some(deadline);
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
>
+ Send
+ Unpin
+ 'static
+ use<S, B>
where
    S: Handler<B>,
    B: HandlerBody,
{
    let inner = Arc::new(inner);
    let (max_body, body_timeout) = (settings.max_body_bytes, settings.body_timeout);
    service_fn(move |mut req: Request<Incoming>| {
        phase.set(Phase::Busy);
        let phase = Arc::clone(&phase);
        // Boxed: hyper can hand back a connection (to park it) only if its
        // service's future is `Unpin`. The handler's future is made here,
        // and moved once, into the box.
        Box::pin(match frame::check(&mut req, max_body) {
            Ok(close) => {
                let req = req.map(|body| RequestBody::new(body, max_body, body_timeout));
                Checked::Serving {
                    handler: inner.call(req),
                    close,
                    phase: Some(phase),
                }
            }
            Err(refused) => {
                rejections.reject(refused.reason, peer, &refused.detail);
                let status = match refused.reason {
                    Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => StatusCode::BAD_REQUEST,
                };
                let reply = refusal(status, refused.reason, refused.detail);
                Checked::Refused {
                    reply: Some(reply.map(|body| Watched::new(Either::Right(body), phase))),
                }
            }
        })
    })
}

pin_project_lite::pin_project! {
    /// The future of one request through [`checked_service`]: its handler's,
    /// or the server's own refusal, ready at once.
    #[project = CheckedProj]
    enum Checked<F, B> {
        Serving {
            #[pin]
            handler: F,
            // Whether the reply must close the connection.
            close: bool,
            phase: Option<Arc<PhaseClock>>,
        },
        Refused {
            reply: Option<Response<ReplyBody<B>>>,
        },
    }
}

impl<F, B> Future for Checked<F, B>
where
    F: Future<Output = Result<Response<B>, Infallible>>,
{
    type Output = Result<Response<ReplyBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CheckedProj::Serving {
                handler,
                close,
                phase,
            } => {
                let Ok(mut reply) = ready!(handler.poll(cx));
                if *close {
                    reply
                        .headers_mut()
                        .insert(CONNECTION, HeaderValue::from_static("close"));
                }
                let phase = phase.take().expect("polled after completion");
                Poll::Ready(Ok(reply.map(|body| Watched::new(Either::Left(body), phase))))
            }
            CheckedProj::Refused { reply } => {
                Poll::Ready(Ok(reply.take().expect("polled after completion")))
            }
        }
    }
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
    /// The reply handed to hyper whole, not yet all written to the socket.
    Flushing = 2,
    Idle = 3,
}

/// A connection's phase and when it began, and since when a write has
/// been waiting for the client to read (milliseconds since the connection
/// opened). Shared by the stream, the service and the reply body of one
/// connection, all driven by its one task: relaxed atomics only because the
/// service must be `Send`.
#[derive(Debug)]
struct PhaseClock {
    start: Instant,
    phase: AtomicU8,
    since: AtomicU64,
    /// `NOT_STALLED` while writes go through.
    stalled_since: AtomicU64,
}

const NOT_STALLED: u64 = u64::MAX;

impl PhaseClock {
    /// The clock of a connection in `phase` from now.
    fn new(phase: Phase) -> Self {
        Self {
            start: Instant::now(),
            phase: AtomicU8::new(phase as u8),
            since: AtomicU64::new(0),
            stalled_since: AtomicU64::new(NOT_STALLED),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Since when a write has been waiting, if one is.
    fn write_stalled_since(&self) -> Option<u64> {
        let since = self.stalled_since.load(Ordering::Relaxed);
        (since != NOT_STALLED).then_some(since)
    }

    /// Records how a write went: pending (the client is not reading) or
    /// through.
    fn wrote<T>(&self, write: &Poll<T>) {
        let stalled = self.stalled_since.load(Ordering::Relaxed);
        match (write.is_pending(), stalled == NOT_STALLED) {
            (true, true) => self.stalled_since.store(self.now(), Ordering::Relaxed),
            (false, false) => self.stalled_since.store(NOT_STALLED, Ordering::Relaxed),
            _ => {}
        }
    }

    fn get(&self) -> (Phase, u64) {
        let phase = match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Head,
            1 => Phase::Busy,
            2 => Phase::Flushing,
            _ => Phase::Idle,
        };
        (phase, self.since.load(Ordering::Relaxed))
    }

    /// The moment `limit` after `since` (milliseconds since the start).
    fn deadline_after(&self, since: u64, limit: Duration) -> Instant {
        self.start + Duration::from_millis(since) + limit
    }

    fn set(&self, phase: Phase) {
        self.since.store(self.now(), Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }
}

/// The client's TCP stream, which keeps the phase: the first byte read after
/// a reply starts a head, and the flush hyper asks for once it has written
/// a whole reply makes the connection idle. It records stalled writes for
/// the send timeout. `unread` holds bytes read from the socket before the
/// connection was parked, to be read again first.
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
        if buf.filled().len() > before
            && matches!(this.phase.get().0, Phase::Flushing | Phase::Idle)
        {
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
        let this = self.get_mut();
        let write = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.phase.wrote(&write);
        write
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let write = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.phase.wrote(&write);
        write
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// hyper flushes its stream only once its own buffer is empty.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flush = Pin::new(&mut this.inner).poll_flush(cx);
        if flush.is_ready() && this.phase.get().0 == Phase::Flushing {
            this.phase.set(Phase::Idle);
        }
        flush
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A reply body that, once hyper has taken all of it (dropped), leaves the
/// connection flushing its reply.
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
        self.phase.set(Phase::Flushing);
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A server answering "ok" to everything on a loopback port, and a
    /// client connected to it.
    async fn serve(settings: ServerSettings) -> (Arc<ConnectionCounts>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::new(settings, Arc::default(), CancellationToken::new());
        let counts = Arc::clone(server.connections());
        tokio::spawn(async move {
            server
                .serve(listener, |_| {
                    service_fn(|_req: Request<RequestBody>| async {
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    })
                })
                .await;
        });
        (counts, TcpStream::connect(addr).await.unwrap())
    }

    /// Sends a GET and reads its whole reply (a 2-byte body).
    async fn get(client: &mut TcpStream) -> String {
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n\r\nok") {
            let mut chunk = [0; 1024];
            let n = client.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&reply));
            reply.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8(reply).unwrap()
    }

    async fn closed(client: &mut TcpStream) -> bool {
        matches!(client.read(&mut [0; 64]).await, Ok(0) | Err(_))
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_parked_then_serves_its_next_request() {
        let (counts, mut client) = serve(ServerSettings::default()).await;
        assert!(get(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        while counts.parked() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!((counts.open(), counts.parked()), (1, 1));
        assert!(get(&mut client).await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert_eq!(counts.parked(), 0, "served again, no longer parked");
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_still_ends_at_the_idle_timeout() {
        let settings = ServerSettings {
            idle_timeout: Duration::from_secs(5),
            ..ServerSettings::default()
        };
        let (counts, mut client) = serve(settings).await;
        get(&mut client).await;
        let served = Instant::now();
        assert!(closed(&mut client).await);
        let idle = served.elapsed();
        assert!(
            idle >= Duration::from_secs(5) && idle < Duration::from_secs(6),
            "{idle:?}"
        );
        while counts.open() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_starts_after_an_idle_spell_has_the_header_timeout() {
        let settings = ServerSettings {
            header_timeout: Duration::from_secs(2),
            ..ServerSettings::default()
        };
        let (_, mut client) = serve(settings).await;
        get(&mut client).await;
        // Parked, then half a head, which never ends.
        tokio::time::sleep(Duration::from_secs(1)).await;
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        let started = Instant::now();
        assert!(closed(&mut client).await);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[test]
    fn a_reply_is_idle_only_once_hyper_flushed_it() {
        let phase = Arc::new(PhaseClock::new(Phase::Head));
        phase.set(Phase::Busy);
        drop(Watched::new((), Arc::clone(&phase)));
        assert_eq!(phase.get().0, Phase::Flushing);
    }

    #[test]
    fn a_write_the_client_does_not_take_is_timed_until_one_goes_through() {
        let phase = PhaseClock::new(Phase::Head);
        assert_eq!(phase.write_stalled_since(), None);
        phase.wrote(&Poll::<()>::Pending);
        let since = phase.write_stalled_since().expect("stalled");
        phase.wrote(&Poll::<()>::Pending);
        assert_eq!(
            phase.write_stalled_since(),
            Some(since),
            "from the first one"
        );
        phase.wrote(&Poll::Ready(()));
        assert_eq!(phase.write_stalled_since(), None);
    }

    #[tokio::test]
    async fn the_flush_after_a_whole_reply_makes_the_connection_idle_and_a_byte_starts_a_head() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inner, _) = listener.accept().await.unwrap();
        let phase = Arc::new(PhaseClock::new(Phase::Head));
        let mut stream = WatchedStream {
            inner,
            phase: Arc::clone(&phase),
            unread: Bytes::new(),
        };
        phase.set(Phase::Busy);
        stream.flush().await.unwrap();
        assert_eq!(
            phase.get().0,
            Phase::Busy,
            "a flush mid-reply changes nothing"
        );
        phase.set(Phase::Flushing);
        stream.flush().await.unwrap();
        assert_eq!(phase.get().0, Phase::Idle);
        client.write_all(b"G").await.unwrap();
        let mut byte = [0; 1];
        stream.read_exact(&mut byte).await.unwrap();
        assert_eq!(phase.get().0, Phase::Head);
    }
}
