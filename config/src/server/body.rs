//! A request body held to the server's limits: it must not keep its reader
//! waiting longer than the body timeout in all (hyper has no such timeout),
//! and must stay within the size limit while it streams (a `Content-Length`
//! over the limit is refused before the body is read at all, by
//! [`super::frame`]).
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
use tokio::time::{Instant, Sleep};

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
///
/// The body timeout counts only the time spent waiting for the client: from
/// each poll that finds nothing to read to the next poll. While whoever
/// reads the body is held up elsewhere (an upstream that stops reading, say)
/// and does not ask for more, the client is not kept waiting and the clock
/// stands still.
#[derive(Debug)]
pub struct RequestBody<B = Incoming> {
    inner: B,
    limit: u64,
    received: u64,
    timeout: Duration,
    /// The waiting on the client before the current wait.
    waited: Duration,
    /// When the current wait began, if the last poll found nothing.
    waiting_since: Option<Instant>,
    /// When the body timeout runs out if the current wait goes on; made at
    /// the first wait.
    deadline: Option<Pin<Box<Sleep>>>,
    failure: BodyFailure,
}

impl<B> RequestBody<B> {
    pub fn new(inner: B, limit: u64, timeout: Duration) -> Self {
        Self {
            inner,
            limit,
            received: 0,
            timeout,
            waited: Duration::ZERO,
            waiting_since: None,
            deadline: None,
            failure: BodyFailure::default(),
        }
    }

    /// A handle on this body's failure, to read after handing it on.
    pub fn failure(&self) -> BodyFailure {
        self.failure.clone()
    }

    fn fail(&self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Poll::Ready(Some(Err(self.failure.set(error))))
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
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
        if let Some(since) = this.waiting_since.take() {
            this.waited += since.elapsed();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    if this.received > this.limit {
                        return this.fail(BodyError::TooLarge);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => this.fail(BodyError::Malformed),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let Some(left) = this
                    .timeout
                    .checked_sub(this.waited)
                    .filter(|left| !left.is_zero())
                else {
                    return this.fail(BodyError::Timeout);
                };
                let now = Instant::now();
                this.waiting_since = Some(now);
                let deadline = match &mut this.deadline {
                    Some(deadline) => {
                        deadline.as_mut().reset(now + left);
                        deadline
                    }
                    None => this
                        .deadline
                        .insert(Box::pin(tokio::time::sleep_until(now + left))),
                };
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => this.fail(BodyError::Timeout),
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::sync::mpsc;

    use super::*;

    /// A client's body whose bytes the test sends when it likes.
    #[derive(Debug)]
    struct Client(mpsc::UnboundedReceiver<&'static str>);

    impl Body for Client {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|data| Ok(Frame::data(Bytes::from_static(data.as_bytes())))))
        }
    }

    fn body(timeout: Duration) -> (mpsc::UnboundedSender<&'static str>, RequestBody<Client>) {
        let (client, body) = mpsc::unbounded_channel();
        (client, RequestBody::new(Client(body), 100, timeout))
    }

    async fn next(body: &mut RequestBody<Client>) -> Option<Result<Bytes, BodyError>> {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        frame.map(|frame| frame.map(|frame| frame.into_data().unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_the_reader_waiting_too_long_in_all_times_out() {
        let (client, mut body) = body(Duration::from_secs(1));
        let mut chunks = VecDeque::from(["a", "b"]);
        // Two waits of 600 ms each: 1.2 s of waiting in all.
        let feeder = tokio::spawn(async move {
            while let Some(chunk) = chunks.pop_front() {
                tokio::time::sleep(Duration::from_millis(600)).await;
                client.send(chunk).unwrap();
            }
            std::future::pending::<()>().await;
        });
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "a");
        assert_eq!(next(&mut body).await, Some(Err(BodyError::Timeout)));
        assert_eq!(body.failure().get(), Some(BodyError::Timeout));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_reader_spends_elsewhere_is_not_the_client_s() {
        let (client, mut body) = body(Duration::from_secs(1));
        let sender = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            sender.send("a").unwrap();
        });
        // 100 ms of waiting on the client.
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "a");
        // The reader is then held up for 5 s (an upstream not reading),
        // while the client has long sent the next part.
        client.send("b").unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "b");
        // 800 ms more of waiting on the client: 900 ms in all, within the
        // timeout.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            client.send("c").unwrap();
        });
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "c");
    }
}
