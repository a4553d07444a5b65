//! The bodies a proxied exchange streams through: the client's request body
//! on its way to the upstream, and the upstream's response body on its way
//! back. Neither is ever buffered whole.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::h1::{self, ExchangeError};
use crate::upstream::InFlight;

/// A client's request body, as sent to an upstream: streamed as it arrives,
/// within the server's size limit and body timeout.
pub use spike_config::server::body::RequestBody;

/// An upstream's response body on its way to the client.
///
/// The request counts as in flight on its upstream until this is dropped.
/// When the body has ended, the connection it came on goes back to the
/// upstream's pool if it may carry another exchange; if the client goes
/// away first, the connection is dropped with it (it is in the middle of a
/// response and cannot be reused).
#[derive(Debug)]
pub struct UpstreamBody {
    inner: h1::ResponseBody<RequestBody>,
    in_flight: InFlight,
}

impl UpstreamBody {
    pub fn new(inner: h1::ResponseBody<RequestBody>, in_flight: InFlight) -> Self {
        let mut body = Self { inner, in_flight };
        // A response without a body (HEAD, 204, 304, length 0) has ended
        // already.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    fn release(&mut self) {
        if let Some(upstream) = self.inner.into_reusable() {
            self.in_flight.upstream().pool.release(upstream);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
