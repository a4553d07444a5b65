//! Pipelined exchanges with scripted upstreams over real loopback sockets.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

/// A response timeout no test here reaches.
const PATIENT: Duration = Duration::from_secs(10);

/// How long a test may take before it is taken to hang.
const HANG: Duration = Duration::from_secs(5);

type Exchange = Result<Response<UpstreamBody<Empty<Bytes>>>, SendError<Empty<Bytes>>>;

/// An upstream that takes one connection, reads until `requests` request
/// heads have come, and answers `reply` (in one write); then, if `close`,
/// closes. Yields the number of TCP segments the heads came in, and the
/// heads' request lines.
async fn pipelining(
    requests: usize,
    reply: &'static str,
    close: bool,
) -> (SocketAddr, JoinHandle<(u32, Vec<String>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let received = read_heads(&mut stream, requests).await;
        let segments = crate::testing::data_segments_in(&stream);
        stream.write_all(reply.as_bytes()).await.unwrap();
        if !close {
            // Holds the connection open until the client closes it.
            let _ = stream.read(&mut [0; 64]).await;
        }
        let lines = received
            .split("\r\n\r\n")
            .filter(|head| !head.is_empty())
            .map(|head| head.lines().next().unwrap().to_owned())
            .collect();
        (segments, lines)
    });
    (addr, task)
}

async fn read_heads(stream: &mut TcpStream, requests: usize) -> String {
    let mut received = Vec::new();
    let mut chunk = [0; 4096];
    while received.windows(4).filter(|w| w == b"\r\n\r\n").count() < requests {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "request heads cut short");
        received.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(received).unwrap()
}

fn get(path: &str) -> Box<Request<Empty<Bytes>>> {
    Box::new(
        http::Request::get(path)
            .header("host", "backend")
            .body(Empty::new())
            .unwrap()
            .into(),
    )
}

/// Starts an exchange of `GET path` on `pipeline`, in a task of its own.
fn send(pipeline: &Pipeline, path: &str) -> JoinHandle<Exchange> {
    let (pipeline, req) = (pipeline.clone(), get(path));
    tokio::spawn(pipeline.send(req, PATIENT))
}

/// A pipeline to [`pipelining`]`(requests, reply, close)`, with `GET /1`
/// to `GET /{requests}` started on it.
async fn exchanges<const N: usize>(
    reply: &'static str,
    close: bool,
) -> (
    Pipeline,
    [JoinHandle<Exchange>; N],
    JoinHandle<(u32, Vec<String>)>,
) {
    let (addr, upstream) = pipelining(N, reply, close).await;
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    let exchanges = std::array::from_fn(|i| send(&pipeline, &format!("/{}", i + 1)));
    (pipeline, exchanges, upstream)
}

/// Asserts that `exchange` failed as one whose request was written on a
/// connection that broke.
async fn assert_failed(exchange: JoinHandle<Exchange>) {
    let outcome = outcome(exchange).await;
    assert!(
        matches!(outcome, Err(SendError::Failed(ExchangeError::Closed))),
        "{outcome:?}"
    );
}

async fn body(exchange: JoinHandle<Exchange>) -> String {
    let mut response = tokio::time::timeout(HANG, exchange)
        .await
        .expect("the exchange hangs")
        .unwrap()
        .unwrap_or_else(|err| panic!("{err:?}"));
    let body = response.body_mut().collect().await.unwrap().to_bytes();
    assert!(response.body_mut().into_reusable().is_none());
    String::from_utf8(body.to_vec()).unwrap()
}

async fn outcome(exchange: JoinHandle<Exchange>) -> Exchange {
    tokio::time::timeout(HANG, exchange)
        .await
        .expect("the exchange hangs")
        .unwrap()
}

#[tokio::test]
async fn requests_go_out_together_before_any_response_and_each_gets_its_own() {
    let (pipeline, [first, second, third], upstream) = exchanges(
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none\
         HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthree",
        false,
    )
    .await;
    assert_eq!(body(first).await, "one");
    assert_eq!(body(second).await, "two");
    assert_eq!(body(third).await, "three");
    assert_eq!(pipeline.in_flight(), 0);
    assert_eq!(pipeline.room(3), Some(true), "the connection goes on");
    drop(pipeline);
    let (segments, lines) = upstream.await.unwrap();
    assert_eq!(
        lines,
        ["GET /1 HTTP/1.1", "GET /2 HTTP/1.1", "GET /3 HTTP/1.1"]
    );
    assert_eq!(segments, 1, "the three requests went out in one write");
}

#[tokio::test]
async fn the_answer_to_a_head_request_has_no_body_and_the_next_one_is_found() {
    let (addr, upstream) = pipelining(
        2,
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nafter",
        false,
    )
    .await;
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    let head: Box<Request<Empty<Bytes>>> = Box::new(
        http::Request::head("/1")
            .header("host", "backend")
            .body(Empty::new())
            .unwrap()
            .into(),
    );
    let first = tokio::spawn(pipeline.clone().send(head, PATIENT));
    let second = send(&pipeline, "/2");
    assert_eq!(body(first).await, "", "a HEAD response has no body");
    assert_eq!(body(second).await, "after");
    drop(pipeline);
    let (_, lines) = upstream.await.unwrap();
    assert_eq!(lines, ["HEAD /1 HTTP/1.1", "GET /2 HTTP/1.1"]);
}

#[tokio::test]
async fn a_pipeline_counts_what_it_carries_against_its_depth() {
    let (addr, _upstream) = pipelining(2, "", false).await;
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    assert_eq!(pipeline.room(2), Some(true));
    let _first = send(&pipeline, "/1");
    let _second = send(&pipeline, "/2");
    tokio::task::yield_now().await;
    assert_eq!(pipeline.in_flight(), 2);
    assert_eq!(pipeline.room(2), Some(false));
    assert_eq!(pipeline.room(3), Some(true));
}

#[tokio::test]
async fn requests_behind_a_response_that_closes_are_handed_back() {
    let (pipeline, [first, second, third], _upstream) = exchanges(
        "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
        true,
    )
    .await;
    assert_eq!(body(first).await, "ok");
    for (exchange, path) in [(second, "/2"), (third, "/3")] {
        match outcome(exchange).await {
            Err(SendError::NotSent(req, _)) => assert_eq!(req.uri().path(), path),
            other => panic!("{path}: {other:?}"),
        }
    }
    assert_eq!(pipeline.room(8), None);
}

#[tokio::test]
async fn requests_written_to_an_upstream_that_went_away_fail() {
    // Answers the first of three requests and closes without a word.
    let (pipeline, [first, second, third], _upstream) =
        exchanges("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
    assert_eq!(body(first).await, "ok");
    assert_failed(second).await;
    assert_failed(third).await;
    assert_eq!(pipeline.room(8), None);
}

/// An upstream that takes one connection, reads until `requests` request
/// heads have come, answers `first`, and `rest` once told to (or once the
/// sender is dropped); then it reads until the client closes. Yields all
/// it received.
async fn staged(
    requests: usize,
    first: String,
    rest: String,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_on, told) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut received = read_heads(&mut stream, requests).await;
        stream.write_all(first.as_bytes()).await.unwrap();
        let _ = told.await;
        stream.write_all(rest.as_bytes()).await.unwrap();
        stream.read_to_string(&mut received).await.unwrap();
        received
    });
    (addr, go_on, task)
}

#[tokio::test]
async fn a_body_let_go_before_its_end_is_passed_over_by_the_next_exchange() {
    // All of it there: passed over at once.
    let (_pipeline, [first, second], _upstream) = exchanges(
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst\
         HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond",
        false,
    )
    .await;
    drop(outcome(first).await.unwrap());
    assert_eq!(body(second).await, "second");

    // Its rest still to come: the next exchange reads it first.
    let (addr, go_on, _upstream) = staged(
        2,
        "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nfirst".to_owned(),
        "-restHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond".to_owned(),
    )
    .await;
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    let [first, second] = [send(&pipeline, "/1"), send(&pipeline, "/2")];
    drop(outcome(first).await.unwrap());
    go_on.send(()).unwrap();
    assert_eq!(body(second).await, "second");
    assert_eq!(pipeline.room(2), Some(true), "the connection goes on");

    // More of it than is worth reading: the connection breaks.
    let large = usize::try_from(SKIP_MAX).unwrap() + 1;
    let (addr, go_on, _upstream) = staged(
        2,
        format!("HTTP/1.1 200 OK\r\ncontent-length: {large}\r\n\r\n"),
        format!(
            "{}HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            "x".repeat(large)
        ),
    )
    .await;
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    let [first, second] = [send(&pipeline, "/1"), send(&pipeline, "/2")];
    drop(outcome(first).await.unwrap());
    go_on.send(()).unwrap();
    assert_failed(second).await;
    assert_eq!(pipeline.room(2), None);
}

#[tokio::test]
async fn requests_behind_a_response_framed_two_ways_fail_and_are_not_handed_back() {
    // The upstream did not say it would close: it may have processed them.
    let (pipeline, [first, second], _upstream) = exchanges(
        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n\
         2\r\nok\r\n0\r\n\r\n",
        false,
    )
    .await;
    assert_eq!(body(first).await, "ok");
    assert_failed(second).await;
    assert_eq!(pipeline.room(2), None);
}

#[tokio::test]
async fn an_exchange_given_up_before_its_turn_fails_those_written_after_it() {
    let (pipeline, [first, second, third], _upstream) = exchanges(
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none\
         HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo\
         HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthree",
        false,
    )
    .await;
    // Given up once all three requests went out.
    while pipeline.in_flight() < 3 || !pipeline.shared.lock().link.out.is_empty() {
        tokio::task::yield_now().await;
    }
    second.abort();
    assert_eq!(body(first).await, "one");
    assert_failed(third).await;
    assert_eq!(pipeline.room(8), None);
}

#[tokio::test]
async fn requests_behind_one_given_up_before_they_went_out_are_handed_back_unsent() {
    // An upstream that reads nothing until told to: the first request, too
    // large for the sockets' buffers, holds the others back.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_on, told) = oneshot::channel::<()>();
    let upstream = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let _ = told.await;
        let mut received = Vec::new();
        let mut chunk = vec![0; 1 << 16];
        while !received.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the first request cut short");
            received.extend_from_slice(&chunk[..n]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none")
            .await
            .unwrap();
        stream.read_to_end(&mut received).await.unwrap();
        received
    });
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    let mut large = get("/1");
    large.headers_mut().insert(
        http::HeaderName::from_static("x-pad"),
        http::HeaderValue::from_str(&"a".repeat(8 << 20)).unwrap(),
    );
    let first = tokio::spawn(pipeline.clone().send(large, PATIENT));
    let second = send(&pipeline, "/2");
    let third = send(&pipeline, "/3");
    while pipeline.in_flight() < 3 {
        tokio::task::yield_now().await;
    }
    tokio::task::yield_now().await;
    assert!(
        !pipeline.shared.lock().link.out.is_empty(),
        "the socket is full"
    );
    second.abort();
    match outcome(third).await {
        Err(SendError::NotSent(req, _)) => assert_eq!(req.uri().path(), "/3"),
        other => panic!("{other:?}"),
    }
    go_on.send(()).unwrap();
    assert_eq!(body(first).await, "one");
    drop(pipeline);
    let received = upstream.await.unwrap();
    assert!(received.starts_with(b"GET /1 "));
    assert!(
        received.ends_with(b"\r\n\r\n")
            && received
                .windows(7)
                .all(|w| w != b"GET /2 " && w != b"GET /3 "),
        "a request handed back went out all the same"
    );
}

#[tokio::test]
async fn a_silent_upstream_times_out_the_exchange_it_keeps_waiting_and_those_behind() {
    let limit = Duration::from_millis(200);
    let (addr, _upstream) = pipelining(2, "", false).await;
    let pipeline = Pipeline::connect(addr, PATIENT).await.unwrap();
    let first = tokio::spawn(pipeline.clone().send(get("/1"), limit));
    let second = tokio::spawn(pipeline.clone().send(get("/2"), limit));
    assert!(matches!(
        outcome(first).await,
        Err(SendError::Failed(ExchangeError::TimedOut))
    ));
    assert_failed(second).await;
}

#[tokio::test]
async fn only_bodiless_get_and_head_go_on_a_pipeline() {
    assert!(Pipeline::takes(&get("/")));
    let head: Request<Empty<Bytes>> = http::Request::head("/").body(Empty::new()).unwrap().into();
    assert!(Pipeline::takes(&head));
    let post: Request<Empty<Bytes>> = http::Request::post("/").body(Empty::new()).unwrap().into();
    assert!(!Pipeline::takes(&post));
    let with_body: Request<http_body_util::Full<Bytes>> = http::Request::get("/")
        .body(http_body_util::Full::new(Bytes::from_static(b"x")))
        .unwrap()
        .into();
    assert!(!Pipeline::takes(&with_body));
}
