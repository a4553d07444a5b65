//! Exchanges with scripted upstreams over real loopback sockets.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Request;
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
            Some(data) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(data.as_bytes()))))),
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

async fn connect(addr: SocketAddr) -> Connection {
    Connection::connect(addr, PATIENT).await.unwrap()
}

/// The body's data, or its error.
async fn read_all<B: Body<Data = Bytes> + Unpin>(
    body: &mut UpstreamBody<B>,
) -> Result<String, ExchangeError> {
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame?.into_data() {
            data.extend_from_slice(&chunk);
        }
    }
    Ok(String::from_utf8(data).unwrap())
}

fn get(path: &str) -> Box<crate::message::Request<Frames>> {
    Box::new(
        Request::get(path)
            .header("host", "backend")
            .header("x-test", "1")
            .body(Frames::new(&[], false))
            .unwrap()
            .into(),
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
    assert_eq!(response.headers().get("x-reply").unwrap(), "yes");
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
        .send(Box::new(req.into()), PATIENT)
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
            .send(Box::new(req.into()), PATIENT)
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
        .send(Box::new(req.into()), PATIENT)
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
    let (addr, _upstream) = scripted("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", 0, true).await;
    let mut response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
    let mut upstream = response.body_mut().into_reusable().unwrap();
    upstream.link.stream.readable().await.unwrap();
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
        .send(Box::new(req.into()), limit)
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
        .send(Box::new(req.into()), PATIENT)
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
        .send(Box::new(req.into()), PATIENT)
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
        .send(Box::new(req.into()), PATIENT)
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
            connect(addr)
                .await
                .send(Box::new(req.into()), PATIENT)
                .await,
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
    assert_eq!(response.reason(), Some(&b"Sold Out"[..]));
    let (addr, _upstream) = scripted(
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
        0,
        false,
    )
    .await;
    let response = connect(addr).await.send(get("/"), PATIENT).await.unwrap();
    assert!(response.reason().is_none());
}
