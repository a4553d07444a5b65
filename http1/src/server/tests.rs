//! The server over real loopback sockets, as a client on the wire sees it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::*;
use crate::message::{Request, Response};

/// What `/wait` waits for.
static GO_ON: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The length of `/big`'s reply body: two of them, queued, pass
/// [`connection::HOLD_MAX`]; one does not; three written at once go in
/// one loopback segment (the kernel cuts a write into segments of about
/// 32 KiB).
const BIG: usize = connection::HOLD_MAX * 9 / 16;

/// Answers "ok" to everything but `/echo` (its body back, read whole),
/// `/stream` (two chunks, no length), `/big` ([`BIG`] bytes) and `/wait`
/// ("ok" once [`GO_ON`] is notified).
async fn handle(req: Request<RequestBody>) -> Response<Either<Full<Bytes>, Chunks>> {
    if req.uri().path() == "/wait" {
        GO_ON.notified().await;
    }
    match req.uri().path() {
        // A body that failed is answered as a handler would; the server
        // closes the connection after it.
        "/echo" => match req.into_body().collect().await {
            Ok(body) => Response::new(StatusCode::OK, Either::Left(Full::new(body.to_bytes()))),
            Err(err) => crate::reply::Failure::new(err.status(), "body")
                .reply()
                .map(Either::Left),
        },
        "/big" => Response::new(
            StatusCode::OK,
            Either::Left(Full::new(Bytes::from(vec![b'b'; BIG]))),
        ),
        "/stream" => Response::new(
            StatusCode::OK,
            Either::Right(Chunks(vec!["hello ", "world"])),
        ),
        _ => Response::new(
            StatusCode::OK,
            Either::Left(Full::new(Bytes::from_static(b"ok"))),
        ),
    }
}

/// A body of these chunks, of no announced length.
#[derive(Debug)]
struct Chunks(Vec<&'static str>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let next = (!self.0.is_empty()).then(|| self.0.remove(0));
        Poll::Ready(next.map(|chunk| Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))))
    }
}

/// A server with `settings` on a loopback port, and a client connected to
/// it.
async fn serve(settings: ServerSettings) -> (Arc<ConnectionCounts>, Arc<Rejections>, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(settings, Arc::default(), CancellationToken::new());
    let counts = Arc::clone(server.connections());
    let rejections = Arc::clone(server.rejections());
    tokio::spawn(async move {
        server.serve(listener, |_| FnHandler(handle)).await;
    });
    (counts, rejections, TcpStream::connect(addr).await.unwrap())
}

/// Reads one reply: its head, and a body of `Content-Length`, chunked (as
/// it came, undecoded) or until the close. What follows it stays unread.
async fn reply(client: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    // A byte at a time: what follows the reply stays in the socket.
    while !buf.ends_with(b"\r\n\r\n") {
        let mut one = [0; 1];
        let n = client.read(&mut one).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.push(one[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .map(|n| n.parse::<usize>().unwrap());
    let mut body = Vec::new();
    match length {
        Some(length) => {
            body.resize(length, 0);
            client.read_exact(&mut body).await.unwrap();
        }
        None if head.contains("transfer-encoding: chunked") => {
            while !body.ends_with(b"0\r\n\r\n") {
                let mut one = [0; 1];
                assert_eq!(client.read(&mut one).await.unwrap(), 1);
                body.push(one[0]);
            }
        }
        None => {
            client.read_to_end(&mut body).await.unwrap();
        }
    }
    (head, String::from_utf8(body).unwrap())
}

async fn get(client: &mut TcpStream) -> (String, String) {
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    reply(client).await
}

async fn closed(client: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(client.read_to_end(&mut rest).await, Ok(_) | Err(_))
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_is_parked_then_serves_its_next_request() {
    let (counts, _, mut client) = serve(ServerSettings::default()).await;
    assert!(get(&mut client).await.0.starts_with("HTTP/1.1 200 OK\r\n"));
    while counts.parked() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((counts.open(), counts.parked()), (1, 1));
    assert!(get(&mut client).await.0.starts_with("HTTP/1.1 200 OK\r\n"));
    assert_eq!(counts.parked(), 0, "served again, no longer parked");
}

#[tokio::test(start_paused = true)]
async fn a_parked_connection_still_ends_at_the_idle_timeout() {
    let settings = ServerSettings {
        idle_timeout: Duration::from_secs(5),
        ..ServerSettings::default()
    };
    let (counts, _, mut client) = serve(settings).await;
    get(&mut client).await;
    let served = Instant::now();
    assert!(closed(&mut client).await);
    let idle = served.elapsed();
    assert!(
        idle >= Duration::from_secs(5) && idle < Duration::from_secs(6),
        "{idle:?}"
    );
    while counts.open() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_head_that_starts_after_an_idle_spell_has_the_header_timeout() {
    let settings = ServerSettings {
        header_timeout: Duration::from_secs(2),
        ..ServerSettings::default()
    };
    let (_, rejections, mut client) = serve(settings).await;
    get(&mut client).await;
    // Parked, then half a head, which never ends.
    tokio::time::sleep(Duration::from_secs(1)).await;
    client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let started = Instant::now();
    assert!(closed(&mut client).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(rejections.count(Rejection::HeaderTimeout), 1);
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfirstPOST /echo HTTP/1.1\r\n\
              Host: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nsecond\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(reply(&mut client).await.1, "first");
    assert_eq!(reply(&mut client).await.1, "second");
    assert_eq!(reply(&mut client).await.1, "ok");
}

#[tokio::test]
async fn replies_to_requests_sent_together_go_out_together() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /3 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(reply(&mut client).await.1, "ok");
    assert_eq!(
        reply(&mut client).await.1,
        "6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    );
    assert_eq!(reply(&mut client).await.1, "ok");
    assert_eq!(
        crate::testing::data_segments_in(&client),
        1,
        "the three replies went out in one write"
    );
}

#[tokio::test]
async fn a_reply_held_for_the_next_goes_out_once_the_next_has_to_wait() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), reply(&mut client)).await;
    assert_eq!(first.expect("the first reply waits for the second").1, "ok");
    GO_ON.notify_one();
    assert_eq!(reply(&mut client).await.1, "ok");
}

#[tokio::test]
async fn replies_held_for_the_next_go_out_once_they_pass_the_hold_limit() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(&b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(reply(&mut client).await.1, "b".repeat(BIG));
    }
    assert_eq!(
        crate::testing::data_segments_in(&client),
        2,
        "the first two replies went out once they passed the limit, the third after them"
    );
}

#[tokio::test]
async fn a_reply_held_for_a_next_request_that_is_not_whole_goes_out_all_the_same() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    // What follows the request looks like the end of a head, and is not
    // one: blank lines before a request are passed over.
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\n")
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), reply(&mut client)).await;
    assert_eq!(first.expect("the reply waits for a request").1, "ok");
    // And the client's end of input does not lose it either.
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\r\n\r\nGET /")
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let mut rest = String::new();
    client.read_to_string(&mut rest).await.unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
}

#[tokio::test]
async fn nothing_pipelined_behind_a_reply_that_closes_is_processed() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n\
              POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nsent",
        )
        .await
        .unwrap();
    let (head, body) = reply(&mut client).await;
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert_eq!(body, "ok");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn a_reply_of_unknown_length_goes_chunked_to_http_1_1_and_until_the_close_to_http_1_0() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = reply(&mut client).await;
    assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
    assert_eq!(body, "6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n");

    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = reply(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert_eq!(body, "hello world");
}

#[tokio::test]
async fn an_http_1_0_client_asking_for_keep_alive_is_told_so() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    for _ in 0..2 {
        client
            .write_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = reply(&mut client).await;
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
        assert!(head.contains("content-length: 2\r\n"), "{head}");
        assert_eq!(body, "ok");
    }
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let (head, _) = reply(&mut client).await;
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert!(closed(&mut client).await);
}

#[tokio::test]
async fn a_head_reply_has_the_length_of_the_get_and_no_body() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut all = Vec::new();
    while all.windows(4).filter(|w| w == b"\r\n\r\n").count() < 2 || !all.ends_with(b"ok") {
        let mut chunk = [0; 4096];
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        all.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8(all).unwrap();
    let (head, get) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("content-length: 2"), "{head}");
    assert!(
        get.starts_with("HTTP/1.1 200 OK\r\n"),
        "no body after HEAD's head: {get}"
    );
}

#[tokio::test]
async fn a_client_expecting_100_continue_gets_it_before_sending_its_body() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut interim = [0; 25];
    client.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"body").await.unwrap();
    assert_eq!(reply(&mut client).await.1, "body");
}

#[tokio::test]
async fn a_body_the_handler_does_not_read_closes_the_connection_after_the_reply() {
    let (_, _, mut client) = serve(ServerSettings::default()).await;
    client
        .write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nGET /smug")
        .await
        .unwrap();
    let (head, body) = reply(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(
        head.contains("connection: close\r\n"),
        "and says so: {head}"
    );
    assert_eq!(body, "ok");
    assert!(
        closed(&mut client).await,
        "the rest of the body is no request"
    );
}

#[tokio::test]
async fn malformed_oversized_and_unimplemented_heads_are_refused_and_counted() {
    let settings = ServerSettings {
        max_header_bytes: 512,
        ..ServerSettings::default()
    };
    for (request, status, reason) in [
        (
            "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n".to_owned(),
            "400",
            Rejection::BadRequest,
        ),
        (
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(600)),
            "431",
            Rejection::HeadersTooLarge,
        ),
        (
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n".to_owned(),
            "501",
            Rejection::NotImplemented,
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
                .to_owned(),
            "400",
            Rejection::BadRequest,
        ),
    ] {
        let (_, rejections, mut client) = serve(settings.clone()).await;
        client.write_all(request.as_bytes()).await.unwrap();
        let (head, body) = reply(&mut client).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?}: {head}"
        );
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(body.starts_with("{\"error\":"), "{body}");
        assert!(closed(&mut client).await);
        assert_eq!(rejections.count(reason), 1, "{request:?}");
    }
}

#[tokio::test]
async fn a_refusal_is_answered_before_anything_is_read_of_the_body() {
    let settings = ServerSettings {
        max_body_bytes: 10,
        ..ServerSettings::default()
    };
    let (_, rejections, mut client) = serve(settings).await;
    client
        .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = reply(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    assert_eq!(rejections.count(Rejection::BodyTooLarge), 1);
}

#[tokio::test]
async fn a_reply_finished_after_shutdown_closes_its_connection() {
    // The handler answers once the test lets it, after shutdown began.
    let (started, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(tokio::sync::Notify::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let server = Server::new(ServerSettings::default(), Arc::default(), shutdown.clone());
    let held = Arc::clone(&release);
    let serving = tokio::spawn(async move {
        server
            .serve(listener, move |_| {
                let (started, held) = (started.clone(), Arc::clone(&held));
                FnHandler(move |_req: Request<RequestBody>| {
                    let (started, held) = (started.clone(), Arc::clone(&held));
                    async move {
                        let _ = started.send(());
                        held.notified().await;
                        Response::new(StatusCode::OK, Full::new(Bytes::from_static(b"ok")))
                    }
                })
            })
            .await;
    });
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    started_rx.recv().await.unwrap();
    shutdown.cancel();
    // Let the accept loop see the shutdown before the reply is decided.
    tokio::task::yield_now().await;
    release.notify_one();
    let (head, body) = reply(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("connection: close\r\n"), "{head}");
    assert_eq!(body, "ok");
    assert!(closed(&mut client).await);
    drop(client);
    serving.await.unwrap();
}
