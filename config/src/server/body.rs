//! A request body held to the server's limits: it must arrive whole within
//! the body timeout (hyper has no such timeout) and stay within the size
//! limit while it streams (a `Content-Length` over the limit is refused
//! before the body is read at all, by [`super::frame`]).
//!
//! When it fails, the body says why through a [`BodyFailure`] that stays
//! readable after the body itself was handed on: the balancer gives the body
//! to the upstream connection, and if that exchange then fails, it tells the
//! client's fault (400, 408, 413) from the upstream's (502).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::Sleep;

use super::reject::Rejection;

/// Why a request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is over the size limit")]
    TooLarge,
    #[error("the request body did not arrive within the body timeout")]
    Timeout,
    #[error("the request body is malformed or was cut short")]
    Malformed,
}

impl BodyError {
    /// The reply the client gets.
    pub fn status(self) -> StatusCode {
        match self {
            BodyError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Timeout => StatusCode::REQUEST_TIMEOUT,
            BodyError::Malformed => StatusCode::BAD_REQUEST,
        }
    }

    pub fn rejection(self) -> Rejection {
        match self {
            BodyError::TooLarge => Rejection::BodyTooLarge,
            BodyError::Timeout => Rejection::BodyTimeout,
            BodyError::Malformed => Rejection::BadRequest,
        }
    }
}

/// The failure of a body, if it failed; shared with the body.
#[derive(Debug, Clone, Default)]
pub struct BodyFailure(Arc<OnceLock<BodyError>>);

impl BodyFailure {
    pub fn get(&self) -> Option<BodyError> {
        self.0.get().copied()
    }

    fn set(&self, error: BodyError) -> BodyError {
        *self.0.get_or_init(|| error)
    }
}

/// A client's request body, read within the server's limits.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    received: u64,
    timeout: Duration,
    /// Started at the first read of a body that has one.
    deadline: Option<Pin<Box<Sleep>>>,
    failure: BodyFailure,
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, timeout: Duration) -> Self {
        Self {
            inner,
            limit,
            received: 0,
            timeout,
            deadline: None,
            failure: BodyFailure::default(),
        }
    }

    /// A handle on this body's failure, to read after handing it on.
    pub fn failure(&self) -> BodyFailure {
        self.failure.clone()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Some(error) = this.failure.get() {
            return Poll::Ready(Some(Err(error)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.received > this.limit {
                        return Poll::Ready(Some(Err(this.failure.set(BodyError::TooLarge))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                Poll::Ready(Some(Err(this.failure.set(BodyError::Malformed))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.timeout;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(this.failure.set(BodyError::Timeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
