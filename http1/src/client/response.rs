//! A response body on its way back from the upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::pipeline::Turn;
use super::sender::BodySender;
use super::{Connection, ExchangeError, Link, Reuse};
use crate::decode::Decoder;
use crate::io::poll_read;

/// A response body as it arrives from the upstream, on a connection that
/// may still be carrying the rest of the request body (`B`) the other way.
#[derive(Debug)]
pub struct UpstreamBody<B> {
    /// The connection it arrives on; `None` once handed back or broken.
    carrier: Option<Carrier>,
    /// The rest of the request body, if the upstream answered before it had
    /// all gone out. Boxed: most requests have no body, and a response is
    /// moved several times on its way to the client.
    sending: Option<Box<BodySender<B>>>,
    decoder: Decoder,
    /// Whether the connection may carry another exchange once this body
    /// has ended and the request body has all gone out.
    reuse: Reuse,
}

/// What a response body arrives on.
#[derive(Debug)]
enum Carrier {
    /// A connection of its own.
    Own(Connection),
    /// Its turn on a pipeline.
    Turn(Turn),
}

impl Carrier {
    fn with_link<R>(&mut self, f: impl FnOnce(&mut Link) -> R) -> R {
        match self {
            Carrier::Own(connection) => f(&mut connection.link),
            Carrier::Turn(turn) => f(&mut turn.link()),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> UpstreamBody<B> {
    pub(super) fn new(
        connection: Connection,
        sending: Option<Box<BodySender<B>>>,
        decoder: Decoder,
        reuse: Reuse,
    ) -> Self {
        Self {
            carrier: Some(Carrier::Own(connection)),
            sending,
            decoder,
            reuse,
        }
    }

    /// A body read in its `turn` on a pipeline.
    pub(super) fn in_turn(turn: Turn, decoder: Decoder, reuse: Reuse) -> Self {
        Self {
            carrier: Some(Carrier::Turn(turn)),
            sending: None,
            decoder,
            reuse,
        }
    }

    /// The connection, once the body has ended, if it may carry another
    /// exchange. On a pipeline, the body's end gives the next exchange its
    /// turn, and the connection stays where it is: `None`.
    pub fn into_reusable(&mut self) -> Option<Connection> {
        if !self.decoder.is_done() || self.sending.is_some() {
            return None;
        }
        match self.carrier.take()? {
            Carrier::Turn(turn) => {
                turn.end(self.reuse);
                None
            }
            // Anything sent beyond the response is a broken upstream.
            Carrier::Own(connection) => {
                (self.reuse == Reuse::Yes && connection.link.read.is_empty()).then_some(connection)
            }
        }
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.carrier = None;
        self.sending = None;
        self.decoder = Decoder::Done;
        self.reuse = Reuse::No;
        Poll::Ready(Some(Err(error)))
    }

    /// Goes on sending the request body, as far as it can without waiting.
    /// If writing fails, the response still comes, but the connection is
    /// not reused; if the client's body fails, so does the exchange (the
    /// upstream would wait for the rest of it).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        let (Some(sender), Some(Carrier::Own(connection))) =
            (self.sending.as_mut(), self.carrier.as_ref())
        else {
            return Ok(());
        };
        match sender.poll_send(&connection.link.stream, cx) {
            Poll::Ready(Ok(())) => self.sending = None,
            Poll::Ready(Err(ExchangeError::RequestBody)) => return Err(ExchangeError::RequestBody),
            Poll::Ready(Err(_)) => {
                self.sending = None;
                self.reuse = Reuse::No;
            }
            Poll::Pending => {}
        }
        Ok(())
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for UpstreamBody<B> {
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
            if this.decoder.is_done() {
                return Poll::Ready(None);
            }
            let Some(carrier) = this.carrier.as_mut() else {
                return this.fail(ExchangeError::Closed);
            };
            let on_client = (this.sending.as_ref()).is_some_and(|sender| sender.waits_on_client());
            let decoder = &mut this.decoder;
            let step = carrier.with_link(|link| {
                match decoder.decode(&mut link.read) {
                    Ok(Some(frame)) => return Step::Frame(frame),
                    Ok(None) if decoder.is_done() => return Step::Done,
                    Ok(None) => {}
                    Err(error) => return Step::Failed(error.into()),
                }
                let Poll::Ready(filled) =
                    poll_read(&link.stream, &mut link.read, super::READ_SIZE, cx)
                else {
                    if link.patience.poll_expired(on_client, cx) {
                        return Step::Failed(ExchangeError::TimedOut);
                    }
                    return Step::Pending;
                };
                link.patience.reset();
                match filled {
                    Ok(0) => match decoder.closed() {
                        Ok(()) => Step::Closed,
                        Err(_) => Step::Failed(ExchangeError::Closed),
                    },
                    Ok(_) => Step::Read,
                    Err(error) => Step::Failed(error.into()),
                }
            });
            match step {
                Step::Frame(frame) => return Poll::Ready(Some(Ok(frame))),
                Step::Done => return Poll::Ready(None),
                Step::Read => {}
                Step::Pending => return Poll::Pending,
                Step::Closed => {
                    // The body ended with the connection, which carries
                    // nothing more.
                    if let Some(Carrier::Turn(turn)) = this.carrier.take() {
                        turn.end(Reuse::Closes);
                    }
                    return Poll::Ready(None);
                }
                Step::Failed(error) => return this.fail(error),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.size_hint()
    }
}

impl<B> Drop for UpstreamBody<B> {
    fn drop(&mut self) {
        // A body on a pipeline let go before its end (its client went
        // away): what of it is here already is passed over, and the next
        // exchange passes over the rest before reading its own response.
        let Some(Carrier::Turn(turn)) = self.carrier.take() else {
            return;
        };
        let ended = {
            let mut link = turn.link();
            loop {
                match self.decoder.decode(&mut link.read) {
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(self.decoder.is_done()),
                    Err(error) => break Err(error),
                }
            }
        };
        match ended {
            Ok(true) => turn.end(self.reuse),
            Ok(false) => {
                let rest = std::mem::replace(&mut self.decoder, Decoder::Done);
                turn.abandon(rest, self.reuse);
            }
            // Dropped, the turn breaks the connection.
            Err(_) => {}
        }
    }
}

/// What one pass of reading a response body came to.
enum Step {
    Frame(Frame<Bytes>),
    /// The body has ended.
    Done,
    /// More was read: decode again.
    Read,
    Pending,
    /// The upstream closed the connection where the body ends.
    Closed,
    Failed(ExchangeError),
}
