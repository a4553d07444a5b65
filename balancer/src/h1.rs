//! HTTP/1.1 to an upstream, spoken by the request's own task.
//!
//! A proxied request needs little of a general HTTP client: its head is
//! already parsed and checked by the server side, so it is written out as
//! it stands; the upstream's response head is parsed with `httparse` into
//! the [`http::Response`] the server side encodes for the client; and the
//! response body is decoded by its framing (RFC 9112, section 6.3) as the
//! client's connection asks for it. Everything runs inside the task that
//! serves the client's connection: no task, channel or wake-up per
//! connection or per exchange, and no copy of a body on its way through.
//!
//! An [`Upstream`] connection is reusable when an exchange on it ended
//! cleanly: the whole request was sent, the whole response read, nothing
//! more arrived and neither side asked to close.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::{Body, Frame};
use hyper::ext::ReasonPhrase;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::headers::connection_tokens;

/// The most header fields a response head (or a trailer section) may have.
const MAX_HEADERS: usize = 100;
/// The largest response head, or trailer section, accepted.
const MAX_HEAD: usize = 400 * 1024;
/// The longest chunk-size line (with its extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// How much room a read into the buffer is given.
const READ_SIZE: usize = 8 * 1024;

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before its response was complete")]
    Closed,
    #[error("malformed response head: {0}")]
    Head(#[from] httparse::Error),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    #[error("malformed chunked response body")]
    Chunked,
    #[error("the request body failed")]
    RequestBody,
    #[error("the upstream kept the exchange waiting past the response timeout")]
    TimedOut,
}

/// The outcome of [`Upstream::send`] when it fails.
#[derive(Debug)]
pub enum SendError<B> {
    /// Nothing reached the upstream: the request is handed back whole.
    NotSent(Box<Request<B>>, ExchangeError),
    /// The request may have reached the upstream.
    Failed(ExchangeError),
}

/// A connection to an upstream.
#[derive(Debug)]
pub struct Upstream {
    stream: TcpStream,
    /// How long the upstream may keep the current exchange waiting.
    patience: Patience,
    /// What was read and not yet consumed; empty between exchanges.
    read: BytesMut,
    /// The request head being written.
    write: Vec<u8>,
}

impl Upstream {
    pub fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            patience: Patience::default(),
            read: BytesMut::new(),
            write: Vec::new(),
        }
    }

    /// Whether the connection may carry another exchange, as far as can be
    /// told without waiting: the upstream has neither closed it nor sent
    /// anything unasked. From tokio's readiness, with a system call only if
    /// the socket was reported readable (what it read is of no use: the
    /// connection is then closed).
    pub fn is_open(&mut self) -> bool {
        matches!(
            self.stream.try_read(&mut [0; 1]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Sends `req` (in origin form, its hop-by-hop headers gone) and reads
    /// the response head. The response's body reads from this connection,
    /// and goes on sending the request body if the upstream answered before
    /// it had all gone out; the connection comes back through
    /// [`ResponseBody::into_reusable`].
    ///
    /// The upstream may keep the exchange waiting at most `timeout` for the
    /// response head, and then between two reads of the body (nginx's
    /// `proxy_read_timeout`); time spent waiting for the client's request
    /// body does not count (the client's own body timeout bounds it).
    pub async fn send<B>(
        mut self,
        req: Box<Request<B>>,
        timeout: Duration,
    ) -> Result<Response<ResponseBody<B>>, SendError<B>>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        self.patience.limit = timeout;
        self.patience.reset();
        let framing = RequestFraming::of(&req);
        encode_head(&mut self.write, &req, framing);
        let written = {
            let (stream, patience) = (&mut self.stream, &mut self.patience);
            let mut write = std::pin::pin!(stream.write_all(&self.write));
            std::future::poll_fn(|cx| match write.as_mut().poll(cx) {
                Poll::Ready(result) => Poll::Ready(result),
                Poll::Pending if patience.poll_expired(false, cx) => {
                    Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
                }
                Poll::Pending => Poll::Pending,
            })
            .await
        };
        if let Err(err) = written {
            // A head refused (the socket found reset), or not taken at all,
            // sent nothing the upstream could act on.
            return Err(SendError::NotSent(req, err.into()));
        }
        let head_only = req.method() == Method::HEAD;
        let mut sending = match framing {
            RequestFraming::None => None,
            RequestFraming::Length(length) => {
                Some(Box::new(BodySender::new(req.into_body(), Some(length))))
            }
            RequestFraming::Chunked => Some(Box::new(BodySender::new(req.into_body(), None))),
        };
        // The upstream may answer before the body is all sent: read while
        // writing. If writing fails, the upstream's answer (a 413 before it
        // closed, say) is still read and passed on.
        let mut write_error = None;
        let head = std::future::poll_fn(|cx| {
            if let Some(sender) = sending.as_mut() {
                match sender.poll_send(&mut self.stream, cx) {
                    Poll::Ready(Ok(())) => sending = None,
                    // The client's body failed: the exchange is void.
                    Poll::Ready(Err(ExchangeError::RequestBody)) => {
                        return Poll::Ready(Err(ExchangeError::RequestBody));
                    }
                    Poll::Ready(Err(error)) => {
                        sending = None;
                        write_error = Some(error);
                    }
                    Poll::Pending => {}
                }
            }
            if let Poll::Ready(head) = poll_read_head(&mut self.stream, &mut self.read, cx) {
                return Poll::Ready(head);
            }
            let on_client = sending
                .as_ref()
                .is_some_and(|sender| sender.waiting_on_client);
            if self.patience.poll_expired(on_client, cx) {
                return Poll::Ready(Err(ExchangeError::TimedOut));
            }
            Poll::Pending
        })
        .await;
        self.patience.reset();
        let mut head = match head {
            Ok(head) => head,
            Err(error) => return Err(SendError::Failed(write_error.unwrap_or(error))),
        };
        let framing = head.framing(head_only).map_err(SendError::Failed)?;
        let reusable = write_error.is_none() && head.keep_alive && framing.delimited;
        let mut response = Response::new(ResponseBody {
            upstream: Some(self),
            sending,
            kind: framing.kind,
            reusable,
        });
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        if let Some(reason) = head.reason {
            response.extensions_mut().insert(reason);
        }
        Ok(response)
    }

    /// Reads more into the buffer; `Ok(0)` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        reserve(&mut self.read);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }
}

/// Room for one more read.
fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_SIZE / 4 {
        buf.reserve(READ_SIZE);
    }
}

/// How long an upstream may keep an exchange waiting: `limit` for the
/// response head, then between two reads of the body. The clock stops
/// while the exchange waits for the client's request body, and starts
/// afresh after.
#[derive(Debug, Default)]
struct Patience {
    limit: Duration,
    /// Kept with the connection from one exchange to the next: moving a
    /// deadline later is cheap, registering a new timer is not.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is set for a wait under way.
    waiting: bool,
}

impl Patience {
    /// The exchange has to wait: whether it has waited on the upstream for
    /// `limit` since this wait began (registering to be woken when it has).
    /// A wait on the client's request body does not count.
    fn poll_expired(&mut self, on_client: bool, cx: &mut Context<'_>) -> bool {
        if on_client {
            self.reset();
            return false;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// The upstream sent something, or the exchange waits on the client:
    /// the next wait on the upstream starts afresh.
    fn reset(&mut self) {
        self.waiting = false;
    }
}

/// How a request body is framed to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestFraming {
    /// No body.
    None,
    /// By its `Content-Length` (which the server side checked).
    Length(u64),
    /// Chunked: a body whose length was not given.
    Chunked,
}

impl RequestFraming {
    fn of<B: Body>(req: &Request<B>) -> Self {
        if req.body().is_end_stream() {
            return RequestFraming::None;
        }
        let length = req.headers().get(header::CONTENT_LENGTH);
        match length.and_then(|value| parse_decimal(value.as_bytes().trim_ascii())) {
            Some(length) => RequestFraming::Length(length),
            None => RequestFraming::Chunked,
        }
    }
}

/// Writes the request line and headers of `req` into `out`, in HTTP/1.1.
fn encode_head<B>(out: &mut Vec<u8>, req: &Request<B>, framing: RequestFraming) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |path| path.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if framing == RequestFraming::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A request body on its way to the upstream, written as the client's side
/// yields it: its data as they came (no copy), framed by its length or
/// chunked.
#[derive(Debug)]
struct BodySender<B> {
    body: B,
    /// Framed by `Content-Length`: how much is still due; `None`: chunked.
    due: Option<u64>,
    /// Taken from the body, not yet written: a chunk's size line, its data,
    /// its CRLF.
    queue: VecDeque<Bytes>,
    /// The body has ended; what is queued is the last of it.
    ended: bool,
    /// Whether the last poll found the client's body with nothing to give.
    waiting_on_client: bool,
}

impl<B: Body<Data = Bytes> + Unpin> BodySender<B> {
    fn new(body: B, due: Option<u64>) -> Self {
        Self {
            body,
            due,
            queue: VecDeque::with_capacity(3),
            ended: false,
            waiting_on_client: false,
        }
    }

    /// Writes the body to `stream` until all of it went out (`Ok`), the
    /// body or the socket failed, or either has to wait. A body that does
    /// not match its `Content-Length` fails rather than desynchronise the
    /// connection.
    fn poll_send(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            if !self.queue.is_empty() {
                let mut slices = [IoSlice::new(&[]); 3];
                for (slice, bytes) in slices.iter_mut().zip(&self.queue) {
                    *slice = IoSlice::new(bytes);
                }
                let count = self.queue.len().min(slices.len());
                let mut written =
                    ready!(Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..count]))?;
                if written == 0 {
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                while let Some(front) = self.queue.front_mut() {
                    if written < front.len() {
                        front.advance(written);
                        break;
                    }
                    written -= front.len();
                    self.queue.pop_front();
                }
                continue;
            }
            // A body of known length is done when it has all gone out,
            // whether or not the client's side has said so yet.
            if self.ended || self.due == Some(0) {
                self.ended = true;
                return Poll::Ready(Ok(()));
            }
            let polled = Pin::new(&mut self.body).poll_frame(cx);
            self.waiting_on_client = polled.is_pending();
            let Some(frame) = ready!(polled) else {
                match self.due {
                    Some(0) => {}
                    Some(_) => return Poll::Ready(Err(ExchangeError::RequestBody)),
                    None => self.queue.push_back(Bytes::from_static(b"0\r\n\r\n")),
                }
                self.ended = true;
                continue;
            };
            let frame = frame.map_err(|_| ExchangeError::RequestBody)?;
            // Trailers of the client's own connection are not forwarded.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            match &mut self.due {
                Some(due) => {
                    *due = due
                        .checked_sub(data.len() as u64)
                        .ok_or(ExchangeError::RequestBody)?;
                    self.queue.push_back(data);
                }
                None => {
                    self.queue
                        .push_back(Bytes::from(format!("{:x}\r\n", data.len())));
                    self.queue.push_back(data);
                    self.queue.push_back(Bytes::from_static(b"\r\n"));
                }
            }
        }
    }
}

/// A response head as read.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// Whether the upstream keeps the connection open after this response.
    keep_alive: bool,
    /// The reason phrase, if it is not the status code's usual one.
    reason: Option<ReasonPhrase>,
}

/// How a response body is delimited.
#[derive(Debug)]
struct Framing {
    kind: Kind,
    /// Whether its end is known without the connection closing, and the
    /// framing was unambiguous: the connection may then be reused.
    delimited: bool,
}

impl Head {
    /// The framing of the body that follows this head (RFC 9112, 6.3). A
    /// `Content-Length` beside `Transfer-Encoding` is removed, as a proxy
    /// must before forwarding: the client would frame the body by it.
    fn framing(&mut self, head_only: bool) -> Result<Framing, ExchangeError> {
        let status = self.status.as_u16();
        if head_only || status == 204 || status == 304 {
            return Ok(Framing {
                kind: Kind::Done,
                delimited: true,
            });
        }
        if self.headers.contains_key(header::TRANSFER_ENCODING) {
            // Chunked is the only coding understood, as in nginx: the
            // header goes (hop-by-hop), so any other would reach the client
            // undone and unnamed.
            let mut codings = self
                .headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .flat_map(|value| value.as_bytes().split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|coding| !coding.is_empty());
            let chunked = codings
                .next()
                .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"));
            if !chunked || codings.next().is_some() {
                return Err(ExchangeError::Invalid(
                    "a transfer coding other than chunked",
                ));
            }
            // With both, the length is ignored, and the connection not
            // trusted for another exchange.
            let unambiguous = self.headers.remove(header::CONTENT_LENGTH).is_none();
            return Ok(Framing {
                kind: Kind::Chunked(Chunked::Size),
                delimited: unambiguous,
            });
        }
        let mut length = None;
        for value in self.headers.get_all(header::CONTENT_LENGTH) {
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = parse_decimal(part.trim_ascii())
                    .ok_or(ExchangeError::Invalid("Content-Length"))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(ExchangeError::Invalid("conflicting Content-Length"));
                }
                length = Some(n);
            }
        }
        Ok(match length {
            Some(0) => Framing {
                kind: Kind::Done,
                delimited: true,
            },
            Some(n) => Framing {
                kind: Kind::Length(n),
                delimited: true,
            },
            None => Framing {
                kind: Kind::UntilClose,
                delimited: false,
            },
        })
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Reads a final response head, passing over interim (1xx) ones.
fn poll_read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<Result<Head, ExchangeError>> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf)? {
                return Poll::Ready(Ok(head));
            }
            if buf.len() > MAX_HEAD {
                return Poll::Ready(Err(ExchangeError::HeadTooLarge));
            }
        }
        reserve(buf);
        if ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut *stream),
            cx,
            buf
        ))? == 0
        {
            return Poll::Ready(Err(ExchangeError::Closed));
        }
    }
}

/// Parses a final response head off the front of `buf`: `None` while it is
/// incomplete. Interim responses are consumed and passed over.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, ExchangeError> {
    loop {
        // Where each field's name and value, and the reason phrase, lie in
        // the head.
        let mut spans = [[0u32; 4]; MAX_HEADERS];
        let (len, code, minor, count, reason) = {
            let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut []);
            let httparse::Status::Complete(len) = httparse::ParserConfig::default()
                .parse_response_with_uninit_headers(&mut response, buf, &mut fields)?
            else {
                return Ok(None);
            };
            let base = buf.as_ptr() as usize;
            // Offsets within a head of at most `MAX_HEAD` bytes.
            let offset = |part: &[u8]| {
                let start = (part.as_ptr() as usize - base) as u32;
                (start, start + part.len() as u32)
            };
            let count = response.headers.len();
            for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
                let (name, value) = (offset(field.name.as_bytes()), offset(field.value));
                *span = [name.0, name.1, value.0, value.1];
            }
            let code = response.code.unwrap_or_default();
            let reason = response
                .reason
                .filter(|reason| {
                    !reason.is_empty()
                        && StatusCode::from_u16(code)
                            .ok()
                            .and_then(|status| status.canonical_reason())
                            != Some(*reason)
                })
                .map(|reason| offset(reason.as_bytes()));
            (
                len,
                code,
                response.version.unwrap_or_default(),
                count,
                reason,
            )
        };
        if len > MAX_HEAD {
            return Err(ExchangeError::HeadTooLarge);
        }
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(ExchangeError::Invalid("protocol upgrade"));
            }
            buf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| ExchangeError::Invalid("status code"))?;
        let head = buf.split_to(len).freeze();
        let slice = |start: u32, end: u32| head.slice(start as usize..end as usize);
        let mut headers = HeaderMap::with_capacity(count);
        for &[name_start, name_end, value_start, value_end] in &spans[..count] {
            let name = HeaderName::from_bytes(&slice(name_start, name_end))
                .map_err(|_| ExchangeError::Invalid("header name"))?;
            let value = HeaderValue::from_maybe_shared(slice(value_start, value_end))
                .map_err(|_| ExchangeError::Invalid("header value"))?;
            headers.append(name, value);
        }
        let version = if minor == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // HTTP/1.0 has no transfer codings: such framing is faulty (RFC
        // 9112, 6.1).
        if version == Version::HTTP_10 && headers.contains_key(header::TRANSFER_ENCODING) {
            return Err(ExchangeError::Invalid("Transfer-Encoding in HTTP/1.0"));
        }
        let keep_alive = keeps_alive(&headers, version);
        let reason = reason.and_then(|(start, end)| ReasonPhrase::try_from(slice(start, end)).ok());
        return Ok(Some(Head {
            status,
            version,
            headers,
            keep_alive,
            reason,
        }));
    }
}

/// Whether a response of `version` with these headers leaves its connection
/// open: HTTP/1.1 unless it says `close`, HTTP/1.0 only if it says
/// `keep-alive`.
fn keeps_alive(headers: &HeaderMap, version: Version) -> bool {
    let says =
        |option: &[u8]| connection_tokens(headers).any(|token| token.eq_ignore_ascii_case(option));
    if version == Version::HTTP_10 {
        says(b"keep-alive")
    } else {
        !says(b"close")
    }
}

/// Where the decoding of a response body stands.
#[derive(Debug)]
enum Kind {
    /// This many bytes are still to come.
    Length(u64),
    /// Chunked.
    Chunked(Chunked),
    /// Everything until the upstream closes the connection.
    UntilClose,
    /// The body has ended.
    Done,
}

impl Kind {
    fn is_done(&self) -> bool {
        matches!(self, Kind::Done)
    }
}

/// Where a chunked body's decoding stands.
#[derive(Debug)]
enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, with this much of it to come.
    Data(u64),
    /// At the CRLF that ends a chunk's data.
    DataEnd,
    /// At the trailer section after the last chunk.
    Trailers,
}

/// A response body as it arrives from the upstream, on a connection that
/// may still be carrying the rest of the request body (`B`) the other way.
#[derive(Debug)]
pub struct ResponseBody<B> {
    /// The connection it arrives on; `None` once handed back or broken.
    upstream: Option<Upstream>,
    /// The rest of the request body, if the upstream answered before it had
    /// all gone out. Boxed: most requests have no body, and a response is
    /// moved several times on its way to the client.
    sending: Option<Box<BodySender<B>>>,
    kind: Kind,
    /// Whether the connection may carry another exchange once this body
    /// has ended and the request body has all gone out.
    reusable: bool,
}

impl<B: Body<Data = Bytes> + Unpin> ResponseBody<B> {
    /// The connection, once the body has ended, if it may carry another
    /// exchange.
    pub fn into_reusable(&mut self) -> Option<Upstream> {
        if !self.kind.is_done() || !self.reusable || self.sending.is_some() {
            return None;
        }
        let upstream = self.upstream.take()?;
        // Anything sent beyond the response is a broken upstream.
        upstream.read.is_empty().then_some(upstream)
    }

    fn end(&mut self) {
        self.kind = Kind::Done;
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.upstream = None;
        self.sending = None;
        self.kind = Kind::Done;
        self.reusable = false;
        Poll::Ready(Some(Err(error)))
    }

    /// Goes on sending the request body, as far as it can without waiting.
    /// If writing fails, the response still comes, but the connection is
    /// not reused; if the client's body fails, so does the exchange (the
    /// upstream would wait for the rest of it).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        let (Some(sender), Some(upstream)) = (self.sending.as_mut(), self.upstream.as_mut()) else {
            return Ok(());
        };
        match sender.poll_send(&mut upstream.stream, cx) {
            Poll::Ready(Ok(())) => self.sending = None,
            Poll::Ready(Err(ExchangeError::RequestBody)) => return Err(ExchangeError::RequestBody),
            Poll::Ready(Err(_)) => {
                self.sending = None;
                self.reusable = false;
            }
            Poll::Pending => {}
        }
        Ok(())
    }
}

/// The next frame of a chunked body from what `buf` holds, with `kind` at
/// `Kind::Chunked`: `None` when more must be read first, or when the body
/// ended without trailers (`kind` is then `Kind::Done`).
fn decode_chunked(
    kind: &mut Kind,
    buf: &mut BytesMut,
) -> Result<Option<Frame<Bytes>>, ExchangeError> {
    loop {
        let Kind::Chunked(state) = kind else {
            return Ok(None);
        };
        match state {
            Chunked::Size => {
                let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                    if buf.len() > MAX_CHUNK_LINE {
                        return Err(ExchangeError::Chunked);
                    }
                    return Ok(None);
                };
                let line = &buf[..end];
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                // After the size: nothing, or extensions (ignored), with no
                // control character but tab.
                let rest = line[digits..].trim_ascii_start();
                if digits == 0
                    || digits > 15
                    || !(rest.is_empty() || rest[0] == b';')
                    || rest.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f)
                {
                    return Err(ExchangeError::Chunked);
                }
                let size = line[..digits].iter().fold(0u64, |n, &d| {
                    n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
                });
                buf.advance(end + 2);
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *state = Chunked::DataEnd;
                }
                return Ok(Some(Frame::data(buf.split_to(n as usize).freeze())));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(ExchangeError::Chunked);
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                    Ok(httparse::Status::Complete((len, fields))) => {
                        let mut trailers = HeaderMap::new();
                        for field in fields.iter() {
                            let (Ok(name), Ok(value)) = (
                                HeaderName::from_bytes(field.name.as_bytes()),
                                HeaderValue::from_bytes(field.value),
                            ) else {
                                return Err(ExchangeError::Chunked);
                            };
                            trailers.append(name, value);
                        }
                        (len, trailers)
                    }
                    Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => {
                        return Ok(None);
                    }
                    _ => return Err(ExchangeError::Chunked),
                };
                buf.advance(len);
                *kind = Kind::Done;
                return Ok((!trailers.is_empty()).then(|| Frame::trailers(trailers)));
            }
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        if let Err(error) = this.poll_send(cx) {
            return this.fail(error);
        }
        loop {
            match &mut this.kind {
                Kind::Done => return Poll::Ready(None),
                Kind::Length(left) => {
                    let Some(upstream) = this.upstream.as_mut() else {
                        return this.fail(ExchangeError::Closed);
                    };
                    if !upstream.read.is_empty() {
                        let n = (*left).min(upstream.read.len() as u64);
                        *left -= n;
                        let data = upstream.read.split_to(n as usize).freeze();
                        if *left == 0 {
                            this.end();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Kind::UntilClose => {
                    let Some(upstream) = this.upstream.as_mut() else {
                        return this.fail(ExchangeError::Closed);
                    };
                    if !upstream.read.is_empty() {
                        let data = upstream.read.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Kind::Chunked(_) => {
                    let Some(upstream) = this.upstream.as_mut() else {
                        return this.fail(ExchangeError::Closed);
                    };
                    match decode_chunked(&mut this.kind, &mut upstream.read) {
                        Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                        Ok(None) if this.kind.is_done() => return Poll::Ready(None),
                        Ok(None) => {}
                        Err(error) => return this.fail(error),
                    }
                }
            }
            let Some(upstream) = this.upstream.as_mut() else {
                return this.fail(ExchangeError::Closed);
            };
            let Poll::Ready(filled) = upstream.poll_fill(cx) else {
                let on_client =
                    (this.sending.as_ref()).is_some_and(|sender| sender.waiting_on_client);
                if upstream.patience.poll_expired(on_client, cx) {
                    return this.fail(ExchangeError::TimedOut);
                }
                return Poll::Pending;
            };
            upstream.patience.reset();
            match filled {
                Ok(0) if matches!(this.kind, Kind::UntilClose) => {
                    this.upstream = None;
                    this.end();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(ExchangeError::Closed),
                Ok(_) => {}
                Err(error) => return this.fail(error.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_done()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.kind {
            Kind::Length(left) => hyper::body::SizeHint::with_exact(left),
            Kind::Done => hyper::body::SizeHint::with_exact(0),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    use super::*;

    /// A response timeout no test here reaches.
    const PATIENT: Duration = Duration::from_secs(10);

    /// A request body of the given frames, then pending forever if
    /// `endless`.
    #[derive(Debug)]
    struct Frames {
        frames: VecDeque<&'static str>,
        endless: bool,
    }

    impl Frames {
        fn new(frames: &[&'static str], endless: bool) -> Self {
            Self {
                frames: frames.iter().copied().collect(),
                endless,
            }
        }
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            match self.frames.pop_front() {
                Some(data) => {
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
                }
                None if self.endless => Poll::Pending,
                None => Poll::Ready(None),
            }
        }

        fn is_end_stream(&self) -> bool {
            self.frames.is_empty() && !self.endless
        }
    }

    /// A request body whose frames (`None`: a failure) the test sends when
    /// it likes.
    #[derive(Debug)]
    struct Sent(mpsc::UnboundedReceiver<Option<&'static str>>);

    impl Body for Sent {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|sent| {
                sent.map(|data| match data {
                    Some(data) => Ok(Frame::data(Bytes::from_static(data.as_bytes()))),
                    None => Err(io::Error::other("the client's body failed")),
                })
            })
        }
    }

    /// An upstream that reads a request head (and `body_len` bytes of body),
    /// answers `reply`, closes if `close`, and yields all it read once the
    /// connection is closed.
    async fn scripted(
        reply: &'static str,
        body_len: usize,
        close: bool,
    ) -> (SocketAddr, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            let mut chunk = [0; 4096];
            while !received.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "request head cut short");
                received.extend_from_slice(&chunk[..n]);
            }
            let head_len = received.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            while received.len() < head_len + body_len {
                let n = stream.read(&mut chunk).await.unwrap();
                received.extend_from_slice(&chunk[..n]);
            }
            stream.write_all(reply.as_bytes()).await.unwrap();
            if !close {
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    received.extend_from_slice(&chunk[..n]);
                }
            }
            String::from_utf8(received).unwrap()
        });
        (addr, task)
    }

    async fn connect(addr: SocketAddr) -> Upstream {
        Upstream::new(TcpStream::connect(addr).await.unwrap())
    }

    /// The body's data, or its error.
    async fn read_all<B: Body<Data = Bytes> + Unpin>(
        body: &mut ResponseBody<B>,
    ) -> Result<String, ExchangeError> {
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(chunk) = frame?.into_data() {
                data.extend_from_slice(&chunk);
            }
        }
        Ok(String::from_utf8(data).unwrap())
    }

    fn get(path: &str) -> Box<Request<Frames>> {
        Box::new(
            Request::get(path)
                .header("host", "backend")
                .header("x-test", "1")
                .body(Frames::new(&[], false))
                .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_request_goes_out_in_http_1_1_and_a_sized_body_comes_back_whole() {
        let (addr, upstream) = scripted(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-reply: yes\r\n\r\nhello",
            0,
            false,
        )
        .await;
        let mut response = connect(addr)
            .await
            .send(get("/buy?user=7"), PATIENT)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-reply"], "yes");
        assert_eq!(read_all(response.body_mut()).await.unwrap(), "hello");
        let reusable = response.body_mut().into_reusable();
        assert!(
            reusable.is_some(),
            "a cleanly ended exchange keeps its connection"
        );
        drop(reusable);
        assert_eq!(
            upstream.await.unwrap(),
            "GET /buy?user=7 HTTP/1.1\r\nhost: backend\r\nx-test: 1\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_chunked_and_one_of_known_length_as_is() {
        let reply = "HTTP/1.1 204 No Content\r\n\r\n";
        let chunked_body = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        let (addr, upstream) = scripted(reply, chunked_body.len(), false).await;
        let req = Request::post("/")
            .body(Frames::new(&["hello", " world"], false))
            .unwrap();
        let mut response = connect(addr)
            .await
            .send(Box::new(req), PATIENT)
            .await
            .unwrap();
        assert!(response.body_mut().into_reusable().is_some());
        drop(response);
        let received = upstream.await.unwrap();
        assert!(
            received.contains("transfer-encoding: chunked\r\n"),
            "{received}"
        );
        assert!(
            received.ends_with(&format!("\r\n\r\n{chunked_body}")),
            "{received}"
        );

        let (addr, upstream) = scripted(reply, 11, false).await;
        let req = Request::post("/")
            .header("content-length", "11")
            .body(Frames::new(&["hello", " world"], false))
            .unwrap();
        drop(
            connect(addr)
                .await
                .send(Box::new(req), PATIENT)
                .await
                .unwrap(),
        );
        let received = upstream.await.unwrap();
        assert!(!received.contains("transfer-encoding"), "{received}");
        assert!(received.ends_with("\r\n\r\nhello world"), "{received}");
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_ends_the_exchange_and_the_connection() {
        let (addr, _upstream) = scripted(
            "HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n",
            0,
            false,
        )
        .await;
        let req = Request::post("/")
            .body(Frames::new(&["part of a body"], true))
            .unwrap();
        let mut response = connect(addr)
            .await
            .send(Box::new(req), PATIENT)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(response.body().is_end_stream());
        assert!(
            response.body_mut().into_reusable().is_none(),
            "a connection whose request was cut short is not reused"
        );
    }

    #[tokio::test]
    async fn a_body_without_framing_ends_with_the_connection_and_a_cut_one_fails() {
        let (addr, _upstream) = scripted("HTTP/1.1 200 OK\r\n\r\nall of it", 0, true).await;
        let mut response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
        assert_eq!(read_all(response.body_mut()).await.unwrap(), "all of it");
        assert!(response.body_mut().into_reusable().is_none());

        let (addr, _upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", 0, true).await;
        let mut response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
        assert!(matches!(
            read_all(response.body_mut()).await,
            Err(ExchangeError::Closed)
        ));
        assert!(response.body_mut().into_reusable().is_none());
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_open() {
        let (addr, _upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 0, true).await;
        let mut response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
        let mut upstream = response.body_mut().into_reusable().unwrap();
        upstream.stream.readable().await.unwrap();
        assert!(!upstream.is_open());

        let (addr, _upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 0, false).await;
        let mut response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
        let mut upstream = response.body_mut().into_reusable().unwrap();
        assert!(upstream.is_open());
    }

    #[tokio::test]
    async fn a_silent_upstream_or_a_stalled_body_times_out() {
        let limit = Duration::from_millis(300);
        // Reads the request and never answers.
        let (addr, _upstream) = scripted("", 0, false).await;
        let started = std::time::Instant::now();
        let sent = connect(addr).await.send(get("/"), limit).await;
        assert!(matches!(
            sent,
            Err(SendError::Failed(ExchangeError::TimedOut))
        ));
        assert!(started.elapsed() >= limit);

        // Answers part of its body, then nothing more.
        let (addr, _upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", 0, false).await;
        let mut response = connect(addr).await.send(get("/"), limit).await.unwrap();
        let body = response.body_mut();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "abc");
        let started = std::time::Instant::now();
        assert!(matches!(
            body.frame().await,
            Some(Err(ExchangeError::TimedOut))
        ));
        assert!(started.elapsed() >= limit);
        assert!(body.into_reusable().is_none());
    }

    #[tokio::test]
    async fn waiting_for_the_client_body_does_not_count_against_the_upstream() {
        let limit = Duration::from_millis(500);
        let (addr, upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", 6, false).await;
        let (frames, body) = mpsc::unbounded_channel();
        let req = Request::post("/")
            .header("content-length", "6")
            .body(Sent(body))
            .unwrap();
        frames.send(Some("abc")).unwrap();
        // The rest of the body comes three times the limit later.
        let slow_client = tokio::spawn(async move {
            tokio::time::sleep(3 * limit).await;
            frames.send(Some("def")).unwrap();
            frames
        });
        let mut response = connect(addr)
            .await
            .send(Box::new(req), limit)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(read_all(response.body_mut()).await.unwrap(), "ok");
        drop((response, slow_client.await.unwrap()));
        assert!(upstream.await.unwrap().ends_with("\r\n\r\nabcdef"));
    }

    #[tokio::test]
    async fn an_upstream_that_answers_before_the_body_still_gets_all_of_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // It answers at once, then echoes the chunked request body, as a
        // streaming upstream does.
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            let mut chunk = [0; 4096];
            while !received.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.unwrap();
                received.extend_from_slice(&chunk[..n]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            while !received.ends_with(b"0\r\n\r\n") {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the request body was cut short");
                received.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8(received).unwrap();
            let echo = body.split_once("\r\n\r\n").unwrap().1;
            let reply = format!("{:x}\r\n{echo}\r\n0\r\n\r\n", echo.len());
            stream.write_all(reply.as_bytes()).await.unwrap();
            stream.read(&mut chunk).await.unwrap()
        });
        let (frames, body) = mpsc::unbounded_channel();
        let req = Request::post("/echo").body(Sent(body)).unwrap();
        frames.send(Some("first")).unwrap();
        let mut response = connect(addr)
            .await
            .send(Box::new(req), PATIENT)
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        // The rest of the body goes out while the response comes in.
        frames.send(Some("second")).unwrap();
        drop(frames);
        let echoed = read_all(response.body_mut()).await.unwrap();
        assert_eq!(echoed, "5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n");
        assert!(response.body_mut().into_reusable().is_some());
        drop(response);
        assert_eq!(upstream.await.unwrap(), 0, "the connection was closed");
    }

    #[tokio::test]
    async fn a_body_of_known_length_is_done_once_all_of_it_went_out() {
        let (addr, _upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 5, false).await;
        // The body never says it ended: its length does.
        let req = Request::post("/")
            .header("content-length", "5")
            .body(Frames::new(&["hello"], true))
            .unwrap();
        let mut response = connect(addr)
            .await
            .send(Box::new(req), PATIENT)
            .await
            .unwrap();
        assert!(response.body_mut().into_reusable().is_some());
    }

    #[tokio::test]
    async fn a_client_body_failing_after_the_answer_fails_the_response() {
        let (addr, _upstream) =
            scripted("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", 0, false).await;
        let (frames, body) = mpsc::unbounded_channel();
        let req = Request::post("/").body(Sent(body)).unwrap();
        let mut response = connect(addr)
            .await
            .send(Box::new(req), PATIENT)
            .await
            .unwrap();
        frames.send(None).unwrap();
        let read = tokio::time::timeout(Duration::from_secs(10), read_all(response.body_mut()));
        assert!(matches!(read.await, Ok(Err(ExchangeError::RequestBody))));
    }

    #[tokio::test]
    async fn a_body_that_does_not_match_its_length_fails_the_exchange() {
        for (length, frames) in [("3", ["abcd"]), ("9", ["abcd"])] {
            let (addr, _upstream) =
                scripted("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 99, false).await;
            let req = Request::post("/")
                .header("content-length", length)
                .body(Frames::new(&frames, false))
                .unwrap();
            assert!(matches!(
                connect(addr).await.send(Box::new(req), PATIENT).await,
                Err(SendError::Failed(ExchangeError::RequestBody))
            ));
        }
    }

    #[tokio::test]
    async fn an_unusual_reason_phrase_is_kept() {
        let (addr, _upstream) = scripted(
            "HTTP/1.1 409 Sold Out\r\ncontent-length: 0\r\n\r\n",
            0,
            false,
        )
        .await;
        let response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
        let reason = response.extensions().get::<ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"Sold Out");
        let (addr, _upstream) = scripted(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            0,
            false,
        )
        .await;
        let response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
        assert!(response.extensions().get::<ReasonPhrase>().is_none());
    }

    /// Feeds `input` to the chunked decoder a byte at a time: the data, the
    /// trailers and what is left after the body.
    fn decode_bytewise(input: &str) -> Result<(String, Option<HeaderMap>, String), ExchangeError> {
        let mut kind = Kind::Chunked(Chunked::Size);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for &byte in input.as_bytes() {
            if kind.is_done() {
                buf.extend_from_slice(&[byte]);
                continue;
            }
            buf.extend_from_slice(&[byte]);
            while let Some(frame) = decode_chunked(&mut kind, &mut buf)? {
                match frame.into_data() {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        assert!(kind.is_done(), "the body did not end");
        Ok((
            String::from_utf8(data).unwrap(),
            trailers,
            String::from_utf8(buf.to_vec()).unwrap(),
        ))
    }

    #[test]
    fn chunked_bodies_decode_from_any_split() {
        let (data, trailers, rest) = decode_bytewise(
            "4;name=value\r\nWiki\r\n5 ; x\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-sum: 7\r\n\r\nNEXT",
        )
        .unwrap();
        assert_eq!(data, "Wikipedia in\r\n\r\nchunks.");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
        assert_eq!(rest, "NEXT");
        let (data, trailers, rest) = decode_bytewise("3\r\nabc\r\n0\r\n\r\n").unwrap();
        assert_eq!((data.as_str(), trailers, rest.as_str()), ("abc", None, ""));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            "zz\r\n",
            "\r\n",
            "3\r\nabcX\r\n",
            "10000000000000000\r\n",
            "3 x\r\nabc\r\n",
            "5;x\nhello\r\n",
        ] {
            assert!(
                matches!(decode_bytewise(bad), Err(ExchangeError::Chunked)),
                "{bad:?}"
            );
        }
    }

    fn head(text: &str) -> Head {
        let mut buf = BytesMut::from(text);
        parse_head(&mut buf).unwrap().unwrap()
    }

    #[test]
    fn interim_responses_are_passed_over() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\n\r\nbody",
        );
        let head = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert_eq!(head.headers["x-a"], "1");
        assert!(!head.headers.contains_key("link"));
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn an_incomplete_head_waits_for_more() {
        let partial = "HTTP/1.1 200 OK\r\ncontent-le";
        let mut buf = BytesMut::from(partial);
        assert!(parse_head(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), partial.len());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |text: &str, head_only: bool| head(text).framing(head_only);
        let length = framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false).unwrap();
        assert!(matches!(length.kind, Kind::Length(5)) && length.delimited);
        let same = framing(
            "HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(matches!(same.kind, Kind::Length(5)));
        assert!(
            framing(
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
                false
            )
            .is_err()
        );
        assert!(framing("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n", false).is_err());
        let chunked = framing(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(matches!(chunked.kind, Kind::Chunked(_)) && chunked.delimited);
        let mut both =
            head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
        let framing_of_both = both.framing(false).unwrap();
        assert!(matches!(framing_of_both.kind, Kind::Chunked(_)) && !framing_of_both.delimited);
        assert!(
            !both.headers.contains_key(header::CONTENT_LENGTH),
            "the ignored length is not passed on"
        );
        // Codings other than chunked are not undone: refused, not passed on
        // without their name.
        for other in [
            "transfer-encoding: gzip, chunked",
            "transfer-encoding: gzip\r\ntransfer-encoding: chunked",
            "transfer-encoding: gzip",
            "transfer-encoding: chunked, chunked",
        ] {
            let text = format!("HTTP/1.1 200 OK\r\n{other}\r\n\r\n");
            assert!(framing(&text, false).is_err(), "{other}");
        }
        let unframed = framing("HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert!(matches!(unframed.kind, Kind::UntilClose));
        for empty in [
            ("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true),
            ("HTTP/1.1 204 No Content\r\n\r\n", false),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                false,
            ),
        ] {
            assert!(
                framing(empty.0, empty.1).unwrap().kind.is_done(),
                "{empty:?}"
            );
        }
    }

    #[test]
    fn keep_alive_depends_on_version_and_connection() {
        assert!(head("HTTP/1.1 200 OK\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.1 200 OK\r\nconnection: x, close\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.0 200 OK\r\n\r\n").keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn an_upgrade_or_a_bad_head_is_an_error() {
        let mut upgrade = BytesMut::from("HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert!(parse_head(&mut upgrade).is_err());
        let mut garbage = BytesMut::from("HTTP/1.1 2000 OK\r\n\r\n");
        assert!(parse_head(&mut garbage).is_err());
        let mut chunked_1_0 =
            BytesMut::from("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        assert!(parse_head(&mut chunked_1_0).is_err());
    }
}
