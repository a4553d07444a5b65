//! A client's request body, as a service reads it: straight from the
//! client's connection, decoded by its framing ([`crate::decode`]), within
//! the server's size limit and body timeout.
//!
//! What of the body came with the request's head is decoded at once, before
//! any handler sees the request ([`Prefetched`]): a body sent whole with its
//! head (the usual case) is checked then, so a malformed one is refused
//! before anything of it is forwarded, and holds nothing of the connection.
//! The rest is read as the handler asks for it. While the body is read, it
//! holds the connection's read buffer (and a
//! handle on its socket); when the body has ended, or is dropped, the
//! buffer goes back to the connection, with anything read beyond the body
//! (a pipelined next request). A body dropped before its end leaves the
//! connection unable to find the next request: it is closed after the
//! reply.
//!
//! A failure is counted as a refusal of the client, by its reason. The
//! body also says why through a [`BodyFailure`] that stays
//! readable after the body itself was handed on: the balancer gives the
//! body to the upstream connection, and if that exchange then fails, it
//! tells the client's fault (400, 408, 413) from the upstream's (502).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::counters::{Rejection, Rejections};
use crate::decode::Decoder;
use crate::io::poll_read;

/// How much room a read of a body is given.
const BODY_READ_SIZE: usize = 16 * 1024;

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

/// The failure of a body, if it failed; shared with the body. A request
/// without a body cannot fail, and shares nothing.
#[derive(Debug, Clone, Default)]
pub struct BodyFailure(Option<Arc<OnceLock<BodyError>>>);

impl BodyFailure {
    pub fn get(&self) -> Option<BodyError> {
        self.0.as_ref().and_then(|failure| failure.get().copied())
    }
}

/// A client's request body, read within the server's limits.
///
/// The body timeout counts only the time spent waiting for the client: from
/// each poll that finds nothing to read to the next poll. While whoever
/// reads the body is held up elsewhere (an upstream that stops reading, say)
/// and does not ask for more, the client is not kept waiting and the clock
/// stands still.
#[derive(Debug, Default)]
pub struct RequestBody {
    /// Frames decoded from what came with the head, to hand out first.
    ready: VecDeque<Frame<Bytes>>,
    /// The rest, read off the connection; `None`: no more, or it has ended.
    reading: Option<Box<Reading>>,
    failure: BodyFailure,
}

/// What of a body could be decoded from what came with its request's head.
#[derive(Debug, Default)]
pub(super) struct Prefetched {
    pub frames: VecDeque<Frame<Bytes>>,
    /// Data bytes among them.
    pub received: u64,
}

impl Prefetched {
    /// Decodes the body framed by `decoder` from what `buf` holds, as far
    /// as it goes, within `limit` bytes of data.
    pub fn decode(
        decoder: &mut Decoder,
        buf: &mut BytesMut,
        limit: u64,
    ) -> Result<Self, BodyError> {
        let mut prefetched = Prefetched::default();
        while let Some(frame) = decoder.decode(buf).map_err(|_| BodyError::Malformed)? {
            if let Some(data) = frame.data_ref() {
                prefetched.received += data.len() as u64;
                if prefetched.received > limit {
                    return Err(BodyError::TooLarge);
                }
            }
            prefetched.frames.push_back(frame);
        }
        Ok(prefetched)
    }
}

/// A body being read off its connection.
#[derive(Debug)]
struct Reading {
    stream: Arc<TcpStream>,
    /// The connection's read buffer, lent.
    buf: BytesMut,
    decoder: Decoder,
    /// Where the buffer goes back.
    home: Arc<Home>,
    limit: u64,
    received: u64,
    wait: ClientWait,
    failure: Arc<OnceLock<BodyError>>,
    /// Where a failure is counted.
    report: Report,
}

/// Where a body's failure is counted, as a refusal of its client.
#[derive(Debug, Clone)]
pub(super) struct Report {
    pub rejections: Arc<Rejections>,
    pub client: std::net::SocketAddr,
}

/// Where a connection gets its read buffer back from its request's body.
#[derive(Debug, Default)]
pub(super) struct Home {
    returned: Mutex<Option<Returned>>,
}

/// A read buffer given back, and whether the body was read to its end.
#[derive(Debug)]
pub(super) struct Returned {
    pub buf: BytesMut,
    pub complete: bool,
}

impl Home {
    /// The buffer, if the body has given it back.
    pub fn take(&self) -> Option<Returned> {
        self.returned.lock().take()
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let complete = self.decoder.is_done() && self.failure.get().is_none();
        *self.home.returned.lock() = Some(Returned {
            buf: std::mem::take(&mut self.buf),
            complete,
        });
    }
}

/// What a body is read within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BodyLimits {
    pub bytes: u64,
    pub timeout: Duration,
}

impl RequestBody {
    /// A request without a body.
    pub fn empty() -> Self {
        Self::default()
    }

    /// A body that came whole with its head.
    pub(super) fn whole(prefetched: Prefetched) -> Self {
        Self {
            ready: prefetched.frames,
            ..Self::default()
        }
    }

    /// The body framed by `decoder`: the frames `prefetched` first, then
    /// the rest read from `stream` after what `buf` already holds; `buf`
    /// goes back to `home` when the body ends or is dropped.
    pub(super) fn reading(
        prefetched: Prefetched,
        stream: Arc<TcpStream>,
        buf: BytesMut,
        decoder: Decoder,
        home: Arc<Home>,
        limits: BodyLimits,
        report: Report,
    ) -> Self {
        let failure = Arc::new(OnceLock::new());
        Self {
            ready: prefetched.frames,
            failure: BodyFailure(Some(Arc::clone(&failure))),
            reading: Some(Box::new(Reading {
                stream,
                buf,
                decoder,
                home,
                limit: limits.bytes,
                received: prefetched.received,
                wait: ClientWait::new(limits.timeout),
                failure,
                report,
            })),
        }
    }

    /// A handle on this body's failure, to read after handing it on.
    pub fn failure(&self) -> BodyFailure {
        self.failure.clone()
    }

    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(reading) = self.reading.take() {
            let _ = reading.failure.set(error);
            let report = &reading.report;
            report
                .rejections
                .reject(error.rejection(), report.client, &error);
        }
        Poll::Ready(Some(Err(self.failure.get().unwrap_or(error))))
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
        if let Some(frame) = this.ready.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(error) = this.failure.get() {
            return Poll::Ready(Some(Err(error)));
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        reading.wait.resumed();
        loop {
            match reading.decoder.decode(&mut reading.buf) {
                Ok(Some(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        reading.received += data.len() as u64;
                        if reading.received > reading.limit {
                            return this.fail(BodyError::TooLarge);
                        }
                    }
                    if reading.decoder.is_done() {
                        // Ended: the buffer goes back to the connection.
                        this.reading = None;
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(None) if reading.decoder.is_done() => {
                    this.reading = None;
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(_) => return this.fail(BodyError::Malformed),
            }
            match poll_read(&reading.stream, &mut reading.buf, BODY_READ_SIZE, cx) {
                Poll::Ready(Ok(0) | Err(_)) => return this.fail(BodyError::Malformed),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => {
                    if reading.wait.poll_expired(cx) {
                        return this.fail(BodyError::Timeout);
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let ready: u64 = self
            .ready
            .iter()
            .filter_map(|frame| frame.data_ref())
            .map(|data| data.len() as u64)
            .sum();
        let rest = match &self.reading {
            Some(reading) => reading.decoder.size_hint(),
            None => SizeHint::with_exact(0),
        };
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ready);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ready);
        }
        hint
    }
}

/// The time a body has kept its reader waiting for the client.
#[derive(Debug)]
struct ClientWait {
    timeout: Duration,
    /// The waiting on the client before the current wait.
    waited: Duration,
    /// When the current wait began, if the last poll found nothing.
    waiting_since: Option<Instant>,
    /// When the body timeout runs out if the current wait goes on; made at
    /// the first wait.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl ClientWait {
    fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            waited: Duration::ZERO,
            waiting_since: None,
            deadline: None,
        }
    }

    /// The reader asks again: a wait under way ends here.
    fn resumed(&mut self) {
        if let Some(since) = self.waiting_since.take() {
            self.waited += since.elapsed();
        }
    }

    /// The client has nothing more yet: whether the waits have used up the
    /// timeout (registering to be woken when this one would).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(left) = self
            .timeout
            .checked_sub(self.waited)
            .filter(|left| !left.is_zero())
        else {
            return true;
        };
        let now = Instant::now();
        self.waiting_since = Some(now);
        let deadline = match &mut self.deadline {
            Some(deadline) => {
                deadline.as_mut().reset(now + left);
                deadline
            }
            None => self
                .deadline
                .insert(Box::pin(tokio::time::sleep_until(now + left))),
        };
        deadline.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::framing::BodyLength;

    /// A body of `length` over a loopback connection, and the client that
    /// sends it; the connection's end of the lending.
    async fn body(length: BodyLength, timeout: Duration) -> (TcpStream, RequestBody, Arc<Home>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let home = Arc::new(Home::default());
        let limits = BodyLimits {
            bytes: 100,
            timeout,
        };
        let report = Report {
            rejections: Arc::default(),
            client: client.local_addr().unwrap(),
        };
        let body = RequestBody::reading(
            Prefetched::default(),
            Arc::new(server),
            BytesMut::new(),
            Decoder::new(length),
            Arc::clone(&home),
            limits,
            report,
        );
        (client, body, home)
    }

    async fn next(body: &mut RequestBody) -> Option<Result<Bytes, BodyError>> {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await;
        frame.map(|frame| frame.map(|frame| frame.into_data().unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_the_reader_waiting_too_long_in_all_times_out() {
        let (mut client, mut body, _home) =
            body(BodyLength::Length(10), Duration::from_secs(1)).await;
        // Two waits of 600 ms each: 1.2 s of waiting in all.
        let feeder = tokio::spawn(async move {
            for chunk in ["a", "b"] {
                tokio::time::sleep(Duration::from_millis(600)).await;
                client.write_all(chunk.as_bytes()).await.unwrap();
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
        let (mut client, mut body, _home) =
            body(BodyLength::Length(3), Duration::from_secs(1)).await;
        // The client sends each part after the delay it is given.
        let (send, mut parts) = mpsc::unbounded_channel::<(u64, &'static str)>();
        tokio::spawn(async move {
            while let Some((delay, part)) = parts.recv().await {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                client.write_all(part.as_bytes()).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        // 100 ms of waiting on the client.
        send.send((100, "a")).unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "a");
        // The reader is then held up for 5 s (an upstream not reading),
        // while the client has long sent the next part.
        send.send((0, "b")).unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "b");
        // 800 ms more of waiting on the client: 900 ms in all, within the
        // timeout.
        send.send((800, "c")).unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "c");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_fails_while_it_streams_and_is_counted() {
        let (mut client, mut body, home) = body(BodyLength::Chunked, Duration::from_secs(10)).await;
        let rejections = Arc::clone(&body.reading.as_ref().unwrap().report.rejections);
        client
            .write_all(format!("64\r\n{}\r\n1\r\nx\r\n", "a".repeat(100)).as_bytes())
            .await
            .unwrap();
        assert_eq!(next(&mut body).await.unwrap().unwrap().len(), 100);
        assert_eq!(next(&mut body).await, Some(Err(BodyError::TooLarge)));
        let returned = home.take().expect("the buffer came back");
        assert!(!returned.complete);
        assert_eq!(rejections.count(Rejection::BodyTooLarge), 1);
    }

    #[tokio::test]
    async fn the_buffer_goes_back_at_the_end_with_what_followed_the_body() {
        let (mut client, mut body, home) =
            body(BodyLength::Length(5), Duration::from_secs(10)).await;
        client.write_all(b"helloGET / HTTP/1.1\r\n").await.unwrap();
        let mut data = Vec::new();
        while let Some(frame) = next(&mut body).await {
            data.extend_from_slice(&frame.unwrap());
        }
        assert_eq!(data, b"hello");
        assert!(body.is_end_stream());
        let returned = home.take().expect("given back at the end");
        assert!(returned.complete);
        assert!(returned.buf.starts_with(b"GET / HTTP/1.1"));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_malformed_and_not_complete() {
        let (mut client, mut body, home) =
            body(BodyLength::Length(5), Duration::from_secs(10)).await;
        client.write_all(b"he").await.unwrap();
        drop(client);
        assert_eq!(next(&mut body).await.unwrap().unwrap(), "he");
        assert_eq!(next(&mut body).await, Some(Err(BodyError::Malformed)));
        assert!(!home.take().unwrap().complete);
    }
}
