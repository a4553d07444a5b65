//! A request body on its way to the upstream.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Body;
use tokio::net::TcpStream;

use super::ExchangeError;
use crate::encode::{BodyEncoder, BodyFraming};
use crate::io::Outgoing;

/// A request body on its way to the upstream, written as the client's side
/// yields it: its data as they came (no copy), framed by its length or
/// chunked.
#[derive(Debug)]
pub(super) struct BodySender<B> {
    body: B,
    encoder: BodyEncoder,
    /// Taken from the body, not yet written.
    out: Outgoing,
    /// The body has ended; what is queued is the last of it.
    ended: bool,
    /// Whether the last poll found the client's body with nothing to give.
    waiting_on_client: bool,
}

impl<B: Body<Data = Bytes> + Unpin> BodySender<B> {
    /// A body framed by `length`, or chunked if `None`.
    pub fn new(body: B, length: Option<u64>) -> Self {
        let framing = length.map_or(BodyFraming::Chunked, BodyFraming::Length);
        Self {
            body,
            encoder: BodyEncoder::new(framing),
            out: Outgoing::default(),
            ended: false,
            waiting_on_client: false,
        }
    }

    /// Whether the last poll found the client's body with nothing to give:
    /// the exchange then waits on the client, not on the upstream.
    pub fn waits_on_client(&self) -> bool {
        self.waiting_on_client
    }

    /// Writes the body to `stream` until all of it went out (`Ok`), the
    /// body or the socket failed, or either has to wait. A body that does
    /// not match its `Content-Length` fails rather than desynchronise the
    /// connection. Trailers of the client's own connection are not
    /// forwarded.
    pub fn poll_send(
        &mut self,
        stream: &TcpStream,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), ExchangeError>> {
        loop {
            if !self.out.is_empty() {
                ready!(self.out.poll_write(stream, cx))?;
                continue;
            }
            // A body of known length is done when it has all gone out,
            // whether or not the client's side has said so yet.
            if self.ended || self.encoder.is_complete() {
                self.ended = true;
                return Poll::Ready(Ok(()));
            }
            let polled = Pin::new(&mut self.body).poll_frame(cx);
            self.waiting_on_client = polled.is_pending();
            match ready!(polled) {
                None => {
                    self.encoder
                        .finish(None, &mut self.out)
                        .map_err(|_| ExchangeError::RequestBody)?;
                    self.ended = true;
                }
                Some(Err(_)) => return Poll::Ready(Err(ExchangeError::RequestBody)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.encoder
                            .data(data, &mut self.out)
                            .map_err(|_| ExchangeError::RequestBody)?;
                    }
                }
            }
        }
    }
}
