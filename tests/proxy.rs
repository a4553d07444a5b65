//! The balancer as a transparent reverse proxy: what reaches the backend,
//! what comes back, how messages are framed, and what the client gets when
//! an upstream fails.

use std::time::Duration;

use http::Method;
use spike_tests::ab::ab;
use spike_tests::backend::{Answer, Backend};
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;
use spike_tests::raw::RawConnection;
use spike_tests::redis::free_port;
use spike_tests::wait_until_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

async fn upstream_stats(balancer: &Balancer) -> serde_json::Value {
    balancer.stats().await["upstreams"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_go_and_forwarding_headers_come() {
    let backend = Backend::start(|_| {
        Answer::ok("done")
            .header("connection", "x-upstream-secret")
            .header("x-upstream-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-kept", "yes")
            .header("via", "1.1 backend")
    })
    .await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], "");

    let req = Client::request(
        Method::GET,
        &balancer.url("/buy/ticket?user=alice"),
        &[
            ("connection", "x-client-secret"),
            ("x-client-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-custom", "kept"),
        ],
        b"",
    );
    let reply = Client::new().send(req).await.unwrap();

    let seen = &backend.requests()[0];
    assert_eq!(seen.uri, "/buy/ticket?user=alice");
    for gone in [
        "connection",
        "x-client-secret",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "transfer-encoding",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the backend"
        );
    }
    assert_eq!(seen.headers["x-custom"], "kept");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen.headers["via"], "1.1 spike");
    assert_eq!(
        seen.headers["host"],
        balancer.proxy().to_string(),
        "Host passes through"
    );

    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "done");
    for gone in ["x-upstream-secret", "keep-alive", "proxy-authenticate"] {
        assert!(
            !reply.headers.contains_key(gone),
            "{gone} reached the client"
        );
    }
    assert_eq!(reply.headers["x-kept"], "yes");
    let via: Vec<_> = reply.headers.get_all("via").iter().collect();
    assert_eq!(via, ["1.1 backend", "1.1 spike"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through_intact_both_ways() {
    // The backend answers with the body it received.
    let backend = Backend::start(|req| Answer::ok(req.body.clone())).await;
    let balancer = Balancer::start(
        &[(backend.addr(), 1)],
        "[server]\nmax_body_bytes = 16777216\n",
    );
    let body: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();

    let req = Client::request(Method::POST, &balancer.url("/upload"), &[], &body);
    let reply = Client::new().send(req).await.unwrap();

    assert_eq!(reply.status, 200);
    assert_eq!(backend.requests()[0].body.len(), body.len());
    assert!(
        backend.requests()[0].body == body,
        "the backend got the body intact"
    );
    assert!(reply.body == body, "the client got the body intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_reframed_intact_both_ways() {
    let backend = Backend::start(|req| Answer::ok(req.body.clone()).chunked(3)).await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], "");

    let mut conn = RawConnection::connect(balancer.proxy()).await;
    conn.send(
        b"POST /chunked HTTP/1.1\r\nHost: spike\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n",
    )
    .await;
    let response = conn.response(false).await.unwrap();

    let seen = &backend.requests()[0];
    assert_eq!(seen.body, "hello, world");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.body, b"hello, world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_204_and_304_are_framed_without_a_body() {
    let backend = Backend::start(|req| match req.uri.path() {
        "/no-content" => Answer::status(204),
        "/not-modified" => Answer::status(304).header("etag", "\"v1\""),
        _ => Answer::ok("hello"),
    })
    .await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], "");

    // One keep-alive connection: a body sent where none belongs would be
    // read as the start of the next response.
    let mut conn = RawConnection::connect(balancer.proxy()).await;
    conn.send(b"HEAD /page HTTP/1.1\r\nHost: spike\r\n\r\n")
        .await;
    let head = conn.response(true).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("5"));

    conn.send(b"GET /no-content HTTP/1.1\r\nHost: spike\r\n\r\n")
        .await;
    assert_eq!(conn.response(false).await.unwrap().status, 204);

    conn.send(b"GET /not-modified HTTP/1.1\r\nHost: spike\r\n\r\n")
        .await;
    let not_modified = conn.response(false).await.unwrap();
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("etag"), Some("\"v1\""));

    conn.send(b"GET /page HTTP/1.1\r\nHost: spike\r\n\r\n")
        .await;
    let page = conn.response(false).await.unwrap();
    assert_eq!((page.status, page.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(backend.hits(), 4);
    assert_eq!(backend.requests()[0].method, Method::HEAD);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_1_0_clients_are_served_and_upstreams_get_keep_alive() {
    let backend = Backend::named("a").await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], "");

    let mut conn = RawConnection::connect(balancer.proxy()).await;
    conn.send(b"GET /buy/ticket HTTP/1.0\r\n\r\n").await;
    let response = conn.response(false).await.unwrap();
    assert_eq!(
        (response.status, response.body.as_slice()),
        (200, &b"a"[..])
    );
    assert!(conn.is_closed().await, "HTTP/1.0 without keep-alive closes");

    let seen = &backend.requests()[0];
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.headers["via"], "1.0 spike");
    assert!(
        seen.headers.contains_key("host"),
        "the upstream request has a Host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_with_and_without_keep_alive() {
    let backend = Backend::named("a").await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], "[server]\nworkers = 2\n");
    let url = balancer.url("/buy/ticket");

    let report = tokio::task::spawn_blocking(move || {
        let plain = ab(&["-q", "-n", "300", "-c", "10"], &url);
        let keep_alive = ab(&["-q", "-k", "-n", "300", "-c", "10"], &url);
        (plain, keep_alive)
    })
    .await
    .unwrap();

    for report in [report.0, report.1] {
        assert_eq!(
            (report.complete, report.failed, report.non_2xx),
            (300, 0, 0)
        );
    }
    assert_eq!(backend.hits(), 600);
    // 600 requests from ab reused a handful of upstream connections: each
    // of the two workers keeps its own, at most one per request it had in
    // flight at once.
    assert!(
        backend.open_connections() <= 2 * 10,
        "{}",
        backend.open_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gets_502() {
    let dead = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let balancer = Balancer::start(&[(dead, 1)], "");

    let reply = Client::new().get(&balancer.url("/buy/ticket")).await;

    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "upstream_unreachable");
    let stats = upstream_stats(&balancer).await;
    assert_eq!(
        (stats["requests"].as_u64(), stats["failures"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(stats["in_flight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_gets_504_and_leaves_nothing_behind() {
    let backend = Backend::start(|_| Answer::ok("late").delayed(Duration::from_secs(30))).await;
    let balancer = Balancer::start(
        &[(backend.addr(), 1)],
        "[proxy]\nresponse_timeout = \"300ms\"\n",
    );

    let started = std::time::Instant::now();
    let reply = Client::new().get(&balancer.url("/slow")).await;

    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(backend.hits(), 1);
    // The balancer dropped the exchange: its connection to the backend is
    // closed and nothing counts as in flight.
    wait_until_async(
        "the upstream connection to close",
        Duration::from_secs(5),
        || async { backend.open_connections() == 0 },
    )
    .await;
    let stats = upstream_stats(&balancer).await;
    assert_eq!(
        (stats["failures"].as_u64(), stats["in_flight"].as_i64()),
        (Some(1), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_stats_and_metrics_and_the_proxy_does_not() {
    let backend = Backend::named("a").await;
    let balancer = Balancer::start(&[(backend.addr(), 3)], "");
    let client = Client::new();
    for _ in 0..5 {
        client.get(&balancer.url("/")).await;
    }

    let stats = upstream_stats(&balancer).await;
    assert_eq!(stats["addr"], backend.addr().to_string());
    assert_eq!(stats["weight"], 3);
    assert_eq!(stats["healthy"], true);
    assert_eq!(stats["requests"], 5);

    let metrics = client.get(&balancer.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    let upstream = format!("upstream=\"{}\"", backend.addr());
    assert!(
        text.contains(&format!(
            "spike_balancer_upstream_requests_total{{{upstream}}} 5"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("spike_balancer_upstream_weight{{{upstream}}} 3")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "spike_balancer_upstream_request_duration_seconds_count{{{upstream}}} 5"
        )),
        "{text}"
    );

    // On the proxy's port, /stats and /metrics are ordinary paths, proxied.
    let proxied = client.get(&balancer.url("/metrics")).await;
    assert_eq!(proxied.body, "a");
    assert_eq!(backend.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request() {
    let backend = Backend::named("a").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let mut balancer = Balancer::start(
        &[(backend.addr(), 1)],
        &format!("[log]\naccess_log = \"{}\"\n", log.display()),
    );
    let client = Client::new();
    client.get(&balancer.url("/buy/ticket?user=x")).await;
    client.get(&balancer.url("/health")).await;

    let status = balancer.process.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let upstream = format!("upstream={}", backend.addr());
    for (line, path) in lines.iter().zip(["/buy/ticket", "/health"]) {
        assert!(line.contains("method=GET"), "{line}");
        assert!(line.contains(&format!("path=\"{path}\"")), "{line}");
        assert!(line.contains("status=200"), "{line}");
        assert!(line.contains(&upstream), "{line}");
        assert!(line.contains("duration_ms="), "{line}");
    }
}

/// Reads from `stream` until what was read contains `pattern`; all of it.
async fn read_until(stream: &mut TcpStream, read: &mut Vec<u8>, pattern: &str) {
    let mut chunk = [0; 4096];
    while !String::from_utf8_lossy(read).contains(pattern) {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                let read = String::from_utf8_lossy(read);
                panic!("no {pattern:?} within 10 s in {read:?}")
            })
            .unwrap();
        assert!(
            n > 0,
            "closed before {pattern:?}: {:?}",
            String::from_utf8_lossy(read)
        );
        read.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_its_idle_connections_costs_no_request() {
    // Each connection answers one request, without saying it will close,
    // then closes: as an upstream does when its keep-alive timeout ends.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed, mut closes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let closed = closed.clone();
            tokio::spawn(async move {
                read_until(&mut stream, &mut Vec::new(), "\r\n\r\n").await;
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                drop(stream);
                closed.send(()).unwrap();
            });
        }
    });
    let balancer = Balancer::start(
        &[(addr, 1)],
        "[server]\nworkers = 1\n[health]\nenabled = false\n",
    );

    for _ in 0..5 {
        let reply = Client::new().get(&balancer.url("/")).await;
        assert_eq!(
            (reply.status.as_u16(), reply.body.as_ref()),
            (200, &b"ok"[..])
        );
        // The next request comes once the upstream has closed this one's
        // connection, pooled by then.
        closes.recv().await.unwrap();
    }
    let stats = upstream_stats(&balancer).await;
    assert_eq!(
        (stats["requests"].as_u64(), stats["failures"].as_u64()),
        (Some(5), Some(0))
    );
}

/// A backend that answers each request with its path, after `delay`.
async fn echoing_paths(delay: Duration) -> Backend {
    Backend::start(move |req| Answer::ok(req.uri.path().to_owned()).delayed(delay)).await
}

/// `GET /0` to `GET /{n - 1}` through `balancer`, all at once; each must
/// get 200 and its own path back.
async fn each_gets_its_path(balancer: &Balancer, n: usize) {
    let client = Client::new();
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, url) = (client.clone(), balancer.url(&format!("/{i}")));
        requests.spawn(async move { (i, client.get(&url).await) });
    }
    while let Some(done) = requests.join_next().await {
        let (i, reply) = done.unwrap();
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, format!("/{i}"))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_together_share_pipelined_connections_and_get_their_own_replies() {
    // Each answer waits, so that every request is in flight at once.
    let backend = echoing_paths(Duration::from_millis(100)).await;
    let balancer = Balancer::start(
        &[(backend.addr(), 1)],
        "[server]\nworkers = 2\n[proxy]\npipeline_depth = 8\n[health]\nenabled = false\n",
    );
    each_gets_its_path(&balancer, 32).await;
    assert_eq!(backend.hits(), 32);
    // Each worker's share of the 32 in as few connections of 8 as carry
    // it: at most 5 in all (4 and 1 more for a share not a multiple of 8),
    // where one request per connection would take 32.
    let connections = backend.open_connections();
    assert!((4..=5).contains(&connections), "{connections} connections");
    let stats = upstream_stats(&balancer).await;
    assert_eq!(
        (stats["requests"].as_u64(), stats["failures"].as_u64()),
        (Some(32), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_pipelined_behind_a_response_that_closes_go_elsewhere_and_only_they() {
    // Every connection to this upstream answers its first request, saying
    // it closes, and processes nothing more of it (the rest read and
    // dropped until the balancer closes its side), as a server shutting
    // down does.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closing = listener.local_addr().unwrap();
    let (answered, mut answers) = mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut read = Vec::new();
                read_until(&mut stream, &mut read, "\r\n\r\n").await;
                let text = String::from_utf8_lossy(&read).into_owned();
                let path = text.split(' ').nth(1).unwrap().to_owned();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{path}",
                    path.len()
                );
                stream.write_all(reply.as_bytes()).await.unwrap();
                answered.send(path).unwrap();
                stream.shutdown().await.unwrap();
                let _ = stream.read_to_end(&mut read).await;
            });
        }
    });
    let backend = echoing_paths(Duration::from_millis(50)).await;
    let balancer = Balancer::start(
        &[(closing, 1), (backend.addr(), 1)],
        "[server]\nworkers = 1\n[proxy]\npipeline_depth = 16\n[health]\nenabled = false\n",
    );
    each_gets_its_path(&balancer, 20).await;
    drop(balancer);
    let mut by_closing = std::collections::HashSet::new();
    while let Ok(path) = answers.try_recv() {
        by_closing.insert(path);
    }
    let by_backend: std::collections::HashSet<String> = backend
        .requests()
        .iter()
        .map(|req| req.uri.path().to_owned())
        .collect();
    assert_eq!(
        by_closing.len() + by_backend.len(),
        20,
        "each request answered once"
    );
    assert!(
        by_closing.is_disjoint(&by_backend),
        "a request the closing upstream processed went elsewhere too"
    );
    assert!(
        by_backend.len() > 10,
        "the requests behind a close went to the other upstream: {by_backend:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_may_answer_while_the_request_body_still_streams() {
    // An echo that answers at once and sends back what it reads as it
    // reads it, until the request body's last chunk.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut read = Vec::new();
        read_until(&mut stream, &mut read, "\r\n\r\n").await;
        let head_end = read.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut pending = read.split_off(head_end);
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0; 4096];
        loop {
            if !pending.is_empty() {
                let echo = format!("{:x}\r\n", pending.len());
                stream.write_all(echo.as_bytes()).await.unwrap();
                stream.write_all(&pending).await.unwrap();
                stream.write_all(b"\r\n").await.unwrap();
                seen.append(&mut pending);
            }
            if seen.ends_with(b"0\r\n\r\n") {
                stream.write_all(b"0\r\n\r\n").await.unwrap();
                break;
            }
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the request body was cut short");
            pending.extend_from_slice(&chunk[..n]);
        }
    });
    let balancer = Balancer::start(&[(addr, 1)], "[health]\nenabled = false\n");
    let proxy = balancer
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();

    let mut client = TcpStream::connect(proxy).await.unwrap();
    client
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        )
        .await
        .unwrap();
    let mut reply = Vec::new();
    // The first chunk's echo comes back before the body has ended.
    read_until(&mut client, &mut reply, "first").await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 200 OK\r\n"));
    client.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await.unwrap();
    read_until(&mut client, &mut reply, "second").await;
    read_until(&mut client, &mut reply, "\r\n0\r\n\r\n").await;
}

/// An upstream that answers each connection's first request with `reply`,
/// then closes it, or if `hold`, keeps it open until the other side closes.
async fn replying(reply: &'static str, hold: bool) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                read_until(&mut stream, &mut Vec::new(), "\r\n\r\n").await;
                stream.write_all(reply.as_bytes()).await.unwrap();
                if hold {
                    while stream.read(&mut [0; 1024]).await.is_ok_and(|n| n > 0) {}
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_framings_reaches_the_client_by_its_chunks() {
    let addr = replying(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
    )
    .await;
    let balancer = Balancer::start(&[(addr, 1)], "[health]\nenabled = false\n");
    let mut client = RawConnection::connect(balancer.proxy()).await;
    client.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let response = client.response(false).await.expect("a response");
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello");
    assert_ne!(response.header("content-length"), Some("3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_coding_other_than_chunked_is_refused() {
    let addr = replying(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        false,
    )
    .await;
    let balancer = Balancer::start(&[(addr, 1)], "[health]\nenabled = false\n");
    let reply = Client::new().get(&balancer.url("/")).await;
    assert_eq!(reply.status.as_u16(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_the_upstream_s_delay() {
    let backend = Backend::start(|_| Answer::ok("bought")).await;
    let balancer = Balancer::start(
        &[(backend.addr(), 1)],
        "[proxy]\nresponse_timeout = \"1s\"\n[server]\nbody_timeout = \"5s\"\n[health]\nenabled = false\n",
    );
    let mut client = RawConnection::connect(balancer.proxy()).await;
    client
        .send(b"POST /buy HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\n")
        .await;
    // The body takes twice the response timeout, well within the body
    // timeout.
    for byte in [b"a", b"b", b"c"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        client.send(byte).await;
    }
    let response = client.response(false).await.expect("a response");
    assert_eq!(
        (response.status, response.body.as_slice()),
        (200, &b"bought"[..])
    );
    assert_eq!(
        upstream_stats(&balancer).await["failures"].as_u64(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_stalling_mid_body_is_cut_off_after_the_response_timeout() {
    let addr = replying("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", true).await;
    let balancer = Balancer::start(
        &[(addr, 1)],
        "[proxy]\nresponse_timeout = \"1s\"\n[health]\nenabled = false\n",
    );
    let mut client = RawConnection::connect(balancer.proxy()).await;
    client.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
    // The client sees the connection end with the body incomplete (the
    // harness's reads give up after 10 s).
    let started = std::time::Instant::now();
    let received = client.read_to_close().await;
    assert!(started.elapsed() < Duration::from_secs(8), "not cut off");
    assert!(String::from_utf8_lossy(&received).ends_with("\r\n\r\nabc"));
    let stats = upstream_stats(&balancer).await;
    assert_eq!(stats["in_flight"].as_i64(), Some(0));
}
