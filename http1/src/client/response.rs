//! A response body on its way back from the upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::sender::BodySender;
use super::{Connection, ExchangeError};
use crate::decode::Decoder;
use crate::io::poll_read;

/// A response body as it arrives from the upstream, on a connection that
/// may still be carrying the rest of the request body (`B`) the other way.
#[derive(Debug)]
pub struct UpstreamBody<B> {
    /// The connection it arrives on; `None` once handed back or broken.
    connection: Option<Connection>,
    /// The rest of the request body, if the upstream answered before it had
    /// all gone out. Boxed: most requests have no body, and a response is
    /// moved several times on its way to the client.
    sending: Option<Box<BodySender<B>>>,
    decoder: Decoder,
    /// Whether the connection may carry another exchange once this body
    /// has ended and the request body has all gone out.
    reusable: bool,
}

impl<B: Body<Data = Bytes> + Unpin> UpstreamBody<B> {
    pub(super) fn new(
        connection: Connection,
        sending: Option<Box<BodySender<B>>>,
        decoder: Decoder,
        reusable: bool,
    ) -> Self {
        Self {
            connection: Some(connection),
            sending,
            decoder,
            reusable,
        }
    }

    /// The connection, once the body has ended, if it may carry another
    /// exchange.
    pub fn into_reusable(&mut self) -> Option<Connection> {
        if !self.decoder.is_done() || !self.reusable || self.sending.is_some() {
            return None;
        }
        let connection = self.connection.take()?;
        // Anything sent beyond the response is a broken upstream.
        connection.link.read.is_empty().then_some(connection)
    }

    fn fail(&mut self, error: ExchangeError) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        self.connection = None;
        self.sending = None;
        self.decoder = Decoder::Done;
        self.reusable = false;
        Poll::Ready(Some(Err(error)))
    }

    /// Goes on sending the request body, as far as it can without waiting.
    /// If writing fails, the response still comes, but the connection is
    /// not reused; if the client's body fails, so does the exchange (the
    /// upstream would wait for the rest of it).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        let (Some(sender), Some(connection)) = (self.sending.as_mut(), self.connection.as_ref())
        else {
            return Ok(());
        };
        match sender.poll_send(&connection.link.stream, cx) {
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
            let Some(connection) = this.connection.as_mut() else {
                return this.fail(ExchangeError::Closed);
            };
            match this.decoder.decode(&mut connection.link.read) {
                Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                Ok(None) if this.decoder.is_done() => return Poll::Ready(None),
                Ok(None) => {}
                Err(error) => return this.fail(error.into()),
            }
            let Poll::Ready(filled) = poll_read(
                &connection.link.stream,
                &mut connection.link.read,
                super::READ_SIZE,
                cx,
            ) else {
                let on_client =
                    (this.sending.as_ref()).is_some_and(|sender| sender.waits_on_client());
                if connection.link.patience.poll_expired(on_client, cx) {
                    return this.fail(ExchangeError::TimedOut);
                }
                return Poll::Pending;
            };
            connection.link.patience.reset();
            match filled {
                Ok(0) => match this.decoder.closed() {
                    Ok(()) => {
                        this.connection = None;
                        return Poll::Ready(None);
                    }
                    Err(_) => return this.fail(ExchangeError::Closed),
                },
                Ok(_) => {}
                Err(error) => return this.fail(error.into()),
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
