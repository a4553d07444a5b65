//! One client connection, from its first byte to its close: read a request's
//! head, check it, hand it to the service with its body, write the reply,
//! and then wait for the next request, park, or close.
//!
//! Each connection is one task, and everything a request does runs in it:
//! reading the head, the service (and, in the balancer, the exchange with
//! the upstream), reading the body and writing the reply. So the task
//! always knows the phase the connection is in ([`super::phase`]), and
//! which deadline applies.

use std::future::Future;
use std::net::{Shutdown, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::Body;
use http_body_util::Empty;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use super::body::{BodyLimits, Home, Prefetched, Report, RequestBody};
use super::counters::{Open, Rejection};
use super::park::{Lot, Parked};
use super::phase::{self, Expiry, Phase, Stall};
use super::service::{self, Refused};
use super::{Handler, Shared};
use crate::decode::{self, Decoder, HeadError};
use crate::encode::{self, BodyEncoder, BodyFraming, ResponseFraming};
use crate::fields::Known;
use crate::framing;
use crate::io::{Outgoing, poll_read};
use crate::message::{Request, Response};
use crate::timer::{LastWaker, Timer};

/// How much room a read of a head is given: most heads fit (nginx's
/// `client_header_buffer_size` is as much), a larger one takes more reads,
/// and a thousand connections waiting for their replies hold a kilobyte
/// each.
const HEAD_READ_SIZE: usize = 1024;
/// How much of a reply may be queued, taken from its body, before it is
/// written out.
const MAX_QUEUED: usize = 64 * 1024;

/// The most bytes of replies held for the next write (see
/// `Connection::write`).
pub(super) const HOLD_MAX: usize = 16 * 1024;
/// How long a closed connection's input is read and discarded: see
/// [`Connection::close_lingering`].
const LINGER: Duration = Duration::from_secs(5);

/// What a client connection keeps from one request to the next, parked or
/// not: nothing on the heap, so that a parked connection holds no memory of
/// its own but its place in the lot.
#[derive(Debug)]
pub(super) struct Kept {
    pub peer: SocketAddr,
    /// Whether it comes back from the lot, idle, rather than newly
    /// accepted.
    pub resumed: bool,
    /// Its place under the connection limit, and in the count of open
    /// connections, held until it closes.
    pub _permit: OwnedSemaphorePermit,
    pub _open: Open,
}

/// How reading a head ended, when no request came of it.
enum NoRequest {
    /// Idle long enough to be parked.
    Park,
    /// Closed: by the client, a timeout or shutdown.
    Close,
    /// The head is refused.
    Refuse(Refused),
}

/// What a connection does after an exchange.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    /// Closed, gracefully (its input read and discarded for a while) or
    /// at once (the exchange broke).
    Close {
        linger: bool,
    },
}

/// A reply could not be written whole; the connection is closed at once.
struct Aborted;

/// One client connection.
struct Connection {
    shared: Arc<Shared>,
    /// Shared with the request body while it reads.
    stream: Arc<TcpStream>,
    /// What was read and not yet consumed; lent to a request body while it
    /// is read.
    read: BytesMut,
    out: Outgoing,
    timer: Timer,
    /// Where a request body gives the read buffer back; made for the first
    /// request with a body.
    home: Option<Arc<Home>>,
    kept: Kept,
}

/// Serves one connection with `handler` until it ends, a deadline of its
/// phase passes, or shutdown; or, once it is idle, parks it in `lot`.
pub(super) async fn serve<H: Handler>(
    shared: Arc<Shared>,
    stream: TcpStream,
    handler: H,
    kept: Kept,
    lot: Option<Arc<Lot<Kept>>>,
) {
    let notice = Arc::clone(&shared);
    let mut stop = Stop {
        stopping: &notice.stopping,
        notified: pin!(notice.stop.notified()),
        waker: LastWaker::default(),
    };
    // A new connection's first request is due within the header timeout;
    // one back from the lot is idle until its first byte.
    let mut phase = if kept.resumed {
        Phase::Idle
    } else {
        Phase::Head
    };
    let mut conn = Connection {
        shared,
        stream: Arc::new(stream),
        read: BytesMut::new(),
        out: Outgoing::default(),
        timer: Timer::default(),
        home: None,
        kept,
    };
    // When the phase began; read from the clock only when a deadline is
    // needed, which a request that comes whole at once never does.
    let mut since = None;
    loop {
        let parking = lot.is_some();
        let req = match conn.read_head(phase, &mut since, parking, &mut stop).await {
            Ok(req) => req,
            Err(NoRequest::Close) => {
                conn.flush().await;
                return;
            }
            Err(NoRequest::Refuse(refused)) => {
                conn.refuse(refused, Version::HTTP_11).await;
                return;
            }
            Err(NoRequest::Park) => {
                if let Some(lot) = lot
                    && conn.flush().await
                {
                    conn.park(&lot, since.unwrap_or_else(Instant::now));
                }
                return;
            }
        };
        match conn.exchange(&handler, req).await {
            Next::KeepAlive => {
                phase = Phase::Idle;
                since = None;
            }
            // A reply that did not go out (or a refusal, which went out
            // with everything before it) leaves nothing to write.
            Next::Close { linger } => {
                if linger && conn.flush().await {
                    conn.close_lingering().await;
                }
                return;
            }
        }
    }
}

/// The shutdown, as a connection waiting for its next request sees it.
/// The task registers with the accept loops' notice once; after that, while
/// its waker stays the same, only the flag they set before sending the
/// notice is read (the token's own future takes two locks at every poll).
struct Stop<'a, 'b> {
    stopping: &'a AtomicBool,
    notified: Pin<&'b mut Notified<'a>>,
    /// The waker the notice wakes.
    waker: LastWaker,
}

impl Stop<'_, '_> {
    /// Whether the server is shutting down; if not, the task is woken
    /// when it does.
    fn poll_stopping(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waker.is(cx) {
            if self.notified.as_mut().poll(cx).is_ready() {
                return true;
            }
            self.waker.set(cx);
        }
        self.stopping.load(Ordering::Acquire)
    }
}

impl Connection {
    fn peer(&self) -> SocketAddr {
        self.kept.peer
    }

    /// Reads the next request's head, keeping the deadlines of `phase`
    /// (begun at `since`, which the first wait sets if it is `None`): the
    /// header timeout once a head is under way;
    /// while idle, the moment to park (if `parking`) or close. On shutdown,
    /// a connection with no byte of a request read closes at once.
    async fn read_head(
        &mut self,
        mut phase: Phase,
        since: &mut Option<Instant>,
        parking: bool,
        stop: &mut Stop<'_, '_>,
    ) -> Result<Request<()>, NoRequest> {
        let limits = decode::HeadLimits {
            bytes: self.shared.settings.max_header_bytes,
            headers: self.shared.settings.max_headers,
        };
        std::future::poll_fn(|cx| {
            loop {
                if !self.read.is_empty() {
                    if phase == Phase::Idle {
                        phase = Phase::Head;
                        *since = None;
                    }
                    match decode::parse_request(&mut self.read, limits) {
                        Ok(Some(req)) => return Poll::Ready(Ok(req)),
                        Ok(None) => {}
                        Err(error) => return Poll::Ready(Err(NoRequest::Refuse(refusal(&error)))),
                    }
                }
                match poll_read(&self.stream, &mut self.read, HEAD_READ_SIZE, cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(NoRequest::Close)),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => {}
                }
                // Replies held for a next request (see `Connection::exchange`)
                // go out before the connection waits for more of it.
                if !self.out.is_empty()
                    && let Poll::Ready(Err(_)) = self.out.poll_write(&self.stream, cx)
                {
                    return Poll::Ready(Err(NoRequest::Close));
                }
                if self.read.is_empty() && stop.poll_stopping(cx) {
                    return Poll::Ready(Err(NoRequest::Close));
                }
                let settings = &self.shared.settings;
                let begun = *since.get_or_insert_with(Instant::now);
                let (deadline, slack, expiry) = phase::deadline(phase, begun, settings, parking);
                if !self.timer.poll_passed_within(deadline, slack, cx) {
                    return Poll::Pending;
                }
                return Poll::Ready(Err(match expiry {
                    Expiry::HeaderTimeout => {
                        self.shared.rejections.reject(
                            Rejection::HeaderTimeout,
                            self.peer(),
                            &"no complete head within header_timeout",
                        );
                        NoRequest::Close
                    }
                    Expiry::IdleTimeout => NoRequest::Close,
                    Expiry::Park => NoRequest::Park,
                }));
            }
        })
        .await
    }

    /// One request: checked, served, answered.
    async fn exchange<H: Handler>(&mut self, handler: &H, mut req: Request<()>) -> Next {
        let settings = &self.shared.settings;
        let checked = match service::check(&mut req, settings.max_body_bytes) {
            Ok(checked) => checked,
            Err(refused) => {
                self.refuse(refused, req.version()).await;
                return Next::Close { linger: false };
            }
        };
        let limits = BodyLimits {
            bytes: settings.max_body_bytes,
            timeout: settings.body_timeout,
        };
        let head_request = req.method() == Method::HEAD;
        let version = req.version();
        let mut keep_alive =
            framing::keeps_alive(version, req.headers()) && !checked.framing.ambiguous;
        // A client's trailers are held to its limit on heads.
        let mut decoder =
            Decoder::new(checked.framing.length).limit_trailers(settings.max_header_bytes);
        let prefetched = match Prefetched::decode(&mut decoder, &mut self.read, limits.bytes) {
            Ok(prefetched) => prefetched,
            Err(error) => {
                let refused = Refused::body(error);
                self.refuse(refused, version).await;
                return Next::Close { linger: false };
            }
        };
        let lent = !decoder.is_done();
        let body = if lent {
            let home = Arc::clone(self.home.get_or_insert_with(Arc::default));
            let buf = std::mem::take(&mut self.read);
            let report = Report {
                rejections: Arc::clone(&self.shared.rejections),
                client: self.peer(),
            };
            let stream = Arc::clone(&self.stream);
            RequestBody::reading(prefetched, stream, buf, decoder, home, limits, report)
        } else {
            RequestBody::whole(prefetched)
        };
        let failure = body.failure();
        if checked.expects_continue {
            self.out
                .push(Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n"));
            if self.write(None::<(Empty<Bytes>, _)>, false).await.is_err() {
                return Next::Close { linger: false };
            }
        }
        // The handler's future ends here, before the reply is written: the
        // writing's state then takes the same memory, and a request touches
        // fewer cache lines of its connection's task.
        let reply = {
            let mut call = pin!(handler.call(req.map(|()| body)));
            std::future::poll_fn(|cx| {
                let reply = call.as_mut().poll(cx);
                if reply.is_pending() && !self.out.is_empty() {
                    // Replies held for this one go out while it waits: only
                    // an answer at once joins them. A failure shows at the
                    // next write.
                    let _ = self.out.poll_write(&self.stream, cx);
                }
                reply
            })
            .await
        };
        // The body gives the buffer back when it ends, or when it is
        // dropped; the next request is where the body ended, and without
        // that end it cannot be found. A body the handler let go, or one
        // that failed, so closes the connection after the reply, and the
        // reply says so. (One still read as the reply streams, by an
        // upstream that answered early, is known only after it.)
        let mut returned = self
            .home
            .as_ref()
            .filter(|_| lent)
            .and_then(|home| home.take());
        keep_alive &= !self.shared.stopping.load(Ordering::Acquire)
            && failure.get().is_none()
            && returned.as_ref().is_none_or(|returned| returned.complete)
            && !reply.headers().connection().close;
        // A client that pipelines (the balancer, to a node) gets the
        // replies to the requests it sent together in one write: a reply
        // is held while more of the client's input is already here, and
        // goes out with the next reply, or before the connection waits for
        // more input.
        let hold = !lent && !self.read.is_empty();
        let written = self
            .write_reply(reply, head_request, version, &mut keep_alive, hold)
            .await;
        if lent {
            returned = returned.or_else(|| self.home.as_ref().and_then(|home| home.take()));
            match returned {
                Some(returned) => {
                    self.read = returned.buf;
                    keep_alive &= returned.complete;
                }
                None => keep_alive = false,
            }
        }
        match (written, keep_alive) {
            (Err(Aborted), _) => Next::Close { linger: false },
            (Ok(()), true) => Next::KeepAlive,
            (Ok(()), false) => Next::Close { linger: true },
        }
    }

    /// Writes `reply` to a request of `version` (a HEAD request if
    /// `head_request`): its head framed as decided here, then its body.
    /// Clears `keep_alive` if the body can only end with the connection.
    async fn write_reply<B: ServedBody>(
        &mut self,
        mut reply: Response<B>,
        head_request: bool,
        version: Version,
        keep_alive: &mut bool,
        hold: bool,
    ) -> Result<(), Aborted> {
        let status = reply.status();
        let bodiless = head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let size = reply.body().size_hint().exact();
        let framing = (!bodiless).then(|| match size {
            Some(length) => BodyFraming::Length(length),
            None if version == Version::HTTP_11 => BodyFraming::Chunked,
            None => {
                *keep_alive = false;
                BodyFraming::UntilClose
            }
        });
        if head_request
            && !reply.headers().contains_key(Known::CONTENT_LENGTH)
            && let Some(length) = size.filter(|&length| length > 0)
        {
            // A handler that answers HEAD as it answers GET: the length the
            // GET's body would have. (An empty body says nothing of it.)
            reply
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        self.out.push_head(|head| {
            encode::response_head(
                head,
                status,
                reply.reason(),
                reply.headers(),
                ResponseFraming {
                    body: framing,
                    keep_alive: *keep_alive,
                    client: version,
                },
            );
        });
        let body = reply.into_body();
        // Held only whole, on a connection that goes on, and while little
        // is queued.
        let hold = hold && *keep_alive;
        match framing {
            Some(framing) => {
                self.write(Some((body, BodyEncoder::new(framing))), hold)
                    .await
            }
            None => {
                drop(body);
                self.write(None::<(B, _)>, hold).await
            }
        }
    }

    /// Writes what is queued and then `body`, if any, taking its data as
    /// it comes and writing it as the socket takes it: the head and the
    /// first data go out together when the body has them at once. A write
    /// that waits for the client longer than `send_timeout` aborts.
    ///
    /// With `hold`, a body that comes whole at once is only queued, behind
    /// what is queued already, as long as that stays under [`HOLD_MAX`]:
    /// it goes out with the next write.
    async fn write<B: ServedBody>(
        &mut self,
        body: Option<(B, BodyEncoder)>,
        hold: bool,
    ) -> Result<(), Aborted> {
        let send_timeout = self.shared.settings.send_timeout;
        let peer = self.peer();
        let (mut body, mut encoder) = match body {
            Some((body, encoder)) => (Some(body), encoder),
            None => (None, BodyEncoder::new(BodyFraming::Length(0))),
        };
        let mut trailers: Option<HeaderMap> = None;
        let mut stall = Stall::default();
        std::future::poll_fn(|cx| {
            loop {
                while let Some(source) = body.as_mut().filter(|_| self.out.queued() < MAX_QUEUED) {
                    let Poll::Ready(frame) = Pin::new(source).poll_frame(cx) else {
                        break;
                    };
                    let queued = match frame {
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data) => encoder.data(data, &mut self.out),
                            Err(frame) => {
                                trailers = frame.into_trailers().ok();
                                Ok(())
                            }
                        },
                        Some(Err(error)) => {
                            tracing::debug!(%peer, %error, "the reply's body failed: closed");
                            return Poll::Ready(Err(Aborted));
                        }
                        None => {
                            body = None;
                            encoder.finish(trailers.as_ref(), &mut self.out)
                        }
                    };
                    if queued.is_err() {
                        tracing::debug!(%peer, "the reply's body does not match its length: closed");
                        return Poll::Ready(Err(Aborted));
                    }
                }
                if self.out.is_empty() {
                    return match body {
                        None => Poll::Ready(Ok(())),
                        // Waiting on the body.
                        Some(_) => Poll::Pending,
                    };
                }
                if hold && body.is_none() && self.out.queued() < HOLD_MAX {
                    return Poll::Ready(Ok(()));
                }
                match self.out.poll_write(&self.stream, cx) {
                    Poll::Ready(Ok(())) => stall.cleared(),
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(Aborted)),
                    Poll::Pending => {
                        let deadline = stall.waiting(send_timeout);
                        if self.timer.poll_passed(deadline, cx) {
                            tracing::debug!(%peer, "the client stopped reading its reply: closed");
                            return Poll::Ready(Err(Aborted));
                        }
                        return Poll::Pending;
                    }
                }
            }
        })
        .await
    }

    /// Writes the replies held for a next request that is not coming:
    /// whether they all went out.
    async fn flush(&mut self) -> bool {
        self.out.is_empty() || self.write(None::<(Empty<Bytes>, _)>, false).await.is_ok()
    }

    /// Counts a refusal and answers it; the connection is then closed,
    /// gracefully.
    async fn refuse(&mut self, refused: Refused, version: Version) {
        self.shared
            .rejections
            .reject(refused.reason, self.peer(), &refused.detail);
        let mut keep_alive = false;
        let written = self
            .write_reply(refused.reply(), false, version, &mut keep_alive, false)
            .await;
        if written.is_ok() {
            self.close_lingering().await;
        }
    }

    /// Parks the idle connection (idle since `since`) in `lot`: its task
    /// ends, its buffers are freed, and its socket is watched with the
    /// other parked ones until its client sends again or its idle timeout
    /// passes. If it cannot be parked, it is closed.
    fn park(self, lot: &Lot<Kept>, since: Instant) {
        let deadline = since + self.shared.settings.idle_timeout;
        let Connection {
            stream, mut kept, ..
        } = self;
        let Ok(stream) = Arc::try_unwrap(stream) else {
            return;
        };
        kept.resumed = true;
        if let Ok(stream) = stream.into_std() {
            lot.park(Parked {
                stream,
                deadline,
                conn: kept,
            });
        }
    }

    /// Closes the connection as nginx does: its write side is shut (the
    /// client sees the end of the reply), and what the client still sends
    /// is read and discarded until it closes its side or [`LINGER`]
    /// passes. Closing a socket with unread input resets the connection,
    /// and the reset can destroy the reply before the client has read it:
    /// a 413 to a client still sending its body, say.
    async fn close_lingering(&mut self) {
        let _ = socket2::SockRef::from(&*self.stream).shutdown(Shutdown::Write);
        let deadline = Instant::now() + LINGER;
        let mut sink = BytesMut::new();
        std::future::poll_fn(|cx| {
            loop {
                sink.clear();
                match poll_read(&self.stream, &mut sink, HEAD_READ_SIZE, cx) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Pending => {}
                }
                return match self.timer.poll_passed(deadline, cx) {
                    true => Poll::Ready(()),
                    false => Poll::Pending,
                };
            }
        })
        .await;
    }
}

/// The refusal of a head that could not be read.
fn refusal(error: &HeadError) -> Refused {
    match error {
        HeadError::TooLarge(_) => Refused {
            reason: Rejection::HeadersTooLarge,
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            detail: "the request line and headers are over max_header_bytes",
        },
        HeadError::TooManyHeaders(_) => Refused {
            reason: Rejection::HeadersTooLarge,
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            detail: "more header fields than max_headers",
        },
        HeadError::Malformed(detail) => Refused {
            reason: Rejection::BadRequest,
            status: StatusCode::BAD_REQUEST,
            detail,
        },
    }
}

/// A reply body the connection can write.
pub(super) trait ServedBody: Body<Data = Bytes, Error: std::fmt::Display> + Unpin {}

impl<B> ServedBody for B where B: Body<Data = Bytes, Error: std::fmt::Display> + Unpin {}
