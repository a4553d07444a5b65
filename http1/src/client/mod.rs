//! HTTP/1.1 to an upstream, spoken by the request's own task.
//!
//! A proxied request needs little of a general HTTP client: its head is
//! already parsed and checked by the server side, so it is written out as
//! it stands ([`crate::encode`]); the upstream's response head is parsed
//! into the [`Response`] the server side writes for the client
//! ([`crate::decode`]); and the response body is decoded by its framing
//! ([`crate::framing`], the same rules requests are held to) as the
//! client's connection asks for it. Everything runs inside the task that
//! serves the client's connection: no task, channel or wake-up per
//! connection or per exchange, and no copy of a body on its way through.
//!
//! - [`Connection`]: one connection to an upstream; [`Connection::send`]
//!   is one exchange on it;
//! - [`sender`]: the request body on its way up, written as the client's
//!   side yields it, while the response may already be coming back;
//! - [`response`]: [`UpstreamBody`], the response body on its way back,
//!   which hands the connection back once the exchange ended cleanly;
//! - [`patience`]: how long the upstream may keep an exchange waiting.
//!
//! Health probes use the same client as traffic, so an upstream that
//! answers its probes also answers requests.

mod patience;
mod pipeline;
mod response;
mod sender;

use std::io;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, StatusCode};
use http_body::Body;
use tokio::net::TcpStream;

pub use pipeline::Pipeline;
pub use response::UpstreamBody;

use crate::decode::{self, DecodeError, Decoder, HeadError};
use crate::encode;
use crate::fields::Known;
use crate::framing::{self, FramingError, Role, parse_decimal};
use crate::io::{Outgoing, poll_read};
use crate::message::{Request, Response};
use patience::Patience;
use sender::BodySender;

/// How much room a read of a response is given: a page, as nginx's
/// `proxy_buffer_size`; every pooled connection keeps it.
const READ_SIZE: usize = 4 * 1024;

/// Why no connection to an upstream could be had. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
}

/// Why an exchange with an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before its response was complete")]
    Closed,
    #[error("response head: {0}")]
    Head(#[from] HeadError),
    #[error("response framing: {0}")]
    Framing(#[from] FramingError),
    #[error("response body: {0}")]
    Body(#[from] DecodeError),
    #[error("the request body failed")]
    RequestBody,
    #[error("the upstream kept the exchange waiting past the response timeout")]
    TimedOut,
}

/// The outcome of [`Connection::send`] when it fails.
#[derive(Debug)]
pub enum SendError<B> {
    /// Nothing reached the upstream: the request is handed back whole.
    NotSent(Box<Request<B>>, ExchangeError),
    /// The request may have reached the upstream.
    Failed(ExchangeError),
}

/// A connection to an upstream.
///
/// Its state is boxed: a pooled connection is moved, whole, at every
/// exchange (out of its pool, into the response body, back again), and
/// eight bytes move where two hundred would.
#[derive(Debug)]
pub struct Connection {
    link: Box<Link>,
}

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    /// How long the upstream may keep the current exchange waiting.
    patience: Patience,
    /// What was read and not yet consumed; empty between exchanges.
    read: BytesMut,
    /// Request heads on their way out.
    out: Outgoing,
}

impl Connection {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        // Requests go out whole: without Nagle's delay.
        stream.set_nodelay(true)?;
        Ok(Self::new(stream))
    }

    pub fn new(stream: TcpStream) -> Self {
        Self {
            link: Box::new(Link {
                stream,
                patience: Patience::default(),
                read: BytesMut::new(),
                out: Outgoing::default(),
            }),
        }
    }

    /// Whether the connection may carry another exchange, as far as can be
    /// told without waiting: the upstream has neither closed it nor sent
    /// anything unasked. From tokio's readiness, with a system call only if
    /// the socket was reported readable (what it read is of no use: the
    /// connection is then closed).
    pub fn is_open(&mut self) -> bool {
        self.link.is_open()
    }

    /// Sends `req` (in origin form, its hop-by-hop headers gone) and reads
    /// the response head. The response's body reads from this connection,
    /// and goes on sending the request body if the upstream answered before
    /// it had all gone out; the connection comes back through
    /// [`UpstreamBody::into_reusable`].
    ///
    /// The upstream may keep the exchange waiting at most `timeout` for the
    /// response head, and then between two reads of the body (nginx's
    /// `proxy_read_timeout`); time spent waiting for the client's request
    /// body does not count (the client's own body timeout bounds it).
    pub async fn send<B>(
        mut self,
        req: Box<Request<B>>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody<B>>, SendError<B>>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        self.link.patience.start(timeout);
        let framing = RequestFraming::of(&req);
        let chunked = framing == RequestFraming::Chunked;
        self.link
            .out
            .push_head(|head| encode::request_head(head, &req, chunked));
        let written =
            std::future::poll_fn(|cx| match self.link.out.poll_write(&self.link.stream, cx) {
                Poll::Pending if self.link.patience.poll_expired(false, cx) => {
                    Poll::Ready(Err(io::ErrorKind::TimedOut.into()))
                }
                polled => polled,
            })
            .await;
        if let Err(err) = written {
            // A head refused (the socket found reset), or not taken at all,
            // sent nothing the upstream could act on.
            return Err(SendError::NotSent(req, err.into()));
        }
        let head_only = req.method() == Method::HEAD;
        // The head is let go as soon as it is written, while its memory is
        // still in the CPU's caches: at the response, after the upstream's
        // wait, freeing it would touch memory long gone cold.
        let mut sending = match framing {
            RequestFraming::None => {
                drop(req);
                None
            }
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
                match sender.poll_send(&self.link.stream, cx) {
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
            if let Poll::Ready(head) = self.link.poll_read_head(cx) {
                return Poll::Ready(head);
            }
            let on_client = sending
                .as_ref()
                .is_some_and(|sender| sender.waits_on_client());
            if self.link.patience.poll_expired(on_client, cx) {
                return Poll::Ready(Err(ExchangeError::TimedOut));
            }
            Poll::Pending
        })
        .await;
        self.link.patience.reset();
        let mut head = match head {
            Ok(head) => head,
            Err(error) => return Err(SendError::Failed(write_error.unwrap_or(error))),
        };
        let (decoder, reuse) = body_decoder(&mut head, head_only).map_err(SendError::Failed)?;
        let reuse = if write_error.is_some() {
            Reuse::No
        } else {
            reuse
        };
        let body = UpstreamBody::new(self, sending, decoder, reuse);
        Ok(head.map(|()| body))
    }
}

/// Whether a connection may carry another exchange after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reuse {
    Yes,
    /// The upstream closes it after this response (it said `close`, or
    /// the body ends with the connection): it processes nothing sent
    /// after the request (RFC 9112, section 9.6).
    Closes,
    /// It is not to be trusted further: a response framed two ways, a
    /// request not all sent.
    No,
}

/// How the body of the response `head` is decoded, and whether the
/// connection may carry another exchange after it (as far as the head
/// says). `head_only`: the request was HEAD.
fn body_decoder(
    head: &mut Response<()>,
    head_only: bool,
) -> Result<(Decoder, Reuse), ExchangeError> {
    let status = head.status();
    let (decoder, ambiguous) =
        if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            (Decoder::Done, false)
        } else {
            let framing =
                framing::body_framing(Role::Response, head.version(), head.headers_mut())?;
            (Decoder::new(framing.length), framing.ambiguous)
        };
    let reuse = if !framing::keeps_alive(head.version(), head.headers()) || !decoder.is_delimited()
    {
        Reuse::Closes
    } else if ambiguous {
        Reuse::No
    } else {
        Reuse::Yes
    };
    Ok((decoder, reuse))
}

impl Link {
    /// Whether the upstream has neither closed the connection nor sent
    /// anything unasked, as far as can be told without waiting.
    fn is_open(&self) -> bool {
        matches!(
            self.stream.try_read(&mut [0; 1]),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock
        )
    }

    /// Reads a final response head.
    fn poll_read_head(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<Response<()>, ExchangeError>> {
        loop {
            if !self.read.is_empty()
                && let Some(head) = decode::parse_response(&mut self.read)?
            {
                return Poll::Ready(Ok(head));
            }
            if std::task::ready!(poll_read(&self.stream, &mut self.read, READ_SIZE, cx))? == 0 {
                return Poll::Ready(Err(ExchangeError::Closed));
            }
        }
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
        let length = req.headers().get(Known::CONTENT_LENGTH);
        match length.and_then(|value| parse_decimal(value.as_bytes().trim_ascii())) {
            Some(length) => RequestFraming::Length(length),
            None => RequestFraming::Chunked,
        }
    }
}

#[cfg(test)]
mod tests;
