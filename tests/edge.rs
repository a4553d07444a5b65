//! The balancer at the edge: one test per row of the hostile-input table
//! (shared/design/HTTP_EDGE.md). Each sends raw bytes, checks the status,
//! checks what reached the backend (a backend that records the exact bytes
//! it gets), then checks that a fresh, legitimate request still succeeds.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use spike_tests::ab::ab;
use spike_tests::backend::{Answer, Backend, Recorded};
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;
use spike_tests::raw::{RawBackend, RawConnection, RawResponse};
use spike_tests::wait_until_async;

/// Short timeouts and small limits, so the tests can reach them quickly.
/// Active health checks are off: these tests are about the client's side,
/// and a probe timing out on a loaded machine would take the backend out.
const EDGE: &str = "[health]\nenabled = false\n[server]\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\nmax_body_bytes = 1000\n\
                    max_header_bytes = 2048\nmax_headers = 20\n";

async fn setup(extra: &str) -> (RawBackend, Balancer) {
    let backend = RawBackend::start().await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], &format!("{EDGE}{extra}"));
    (backend, balancer)
}

/// Sends `bytes` on a new connection and reads one response.
async fn exchange(balancer: &Balancer, bytes: &[u8]) -> Option<RawResponse> {
    let mut conn = RawConnection::connect(balancer.proxy()).await;
    conn.send(bytes).await;
    conn.response(false).await
}

/// A fresh, legitimate request succeeds, and reaches the backend whole.
async fn still_serves(balancer: &Balancer, backend: &RawBackend) {
    let before = backend.requests().len();
    let reply = Client::new().get(&balancer.url("/after")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let requests = backend.requests();
    assert_eq!(requests.len(), before + 1);
    assert!(
        requests
            .last()
            .unwrap()
            .starts_with("GET /after HTTP/1.1\r\n")
    );
}

async fn rejections(balancer: &Balancer, reason: &str) -> u64 {
    let metrics = Client::new()
        .get(&balancer.admin_url("/metrics"))
        .await
        .text();
    let line = format!("spike_balancer_rejections_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in\n{metrics}"))
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_smuggled_behind_chunked_and_length_never_reaches_the_backend() {
    let (backend, balancer) = setup("").await;
    let mut conn = RawConnection::connect(balancer.proxy()).await;
    conn.send(
        b"POST /pay HTTP/1.1\r\nHost: shop\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: shop\r\n\r\n",
    )
    .await;
    let response = conn.response(false).await.unwrap();
    assert_eq!(response.status, 200);
    // The backend saw one request, framed by its chunked coding alone.
    let seen = String::from_utf8(response.body.clone()).unwrap();
    assert!(seen.starts_with("POST /pay HTTP/1.1\r\n"), "{seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("content-length: 6"),
        "{seen}"
    );
    assert!(!seen.contains("/smuggled"), "{seen}");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        conn.is_closed().await,
        "the connection is closed after the response"
    );
    assert_eq!(backend.requests().len(), 1);
    still_serves(&balancer, &backend).await;
    assert!(!backend.requests().iter().any(|r| r.contains("/smuggled")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_malformed_framing_gets_400_and_reaches_nothing() {
    let (backend, balancer) = setup("").await;
    let requests: [&[u8]; 12] = [
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0x5\r\n\r\nhello",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\nhello",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\nhello",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: \"chunked\"\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    ];
    for request in requests {
        let response = exchange(&balancer, request).await;
        let status = response.map(|r| r.status);
        assert_eq!(status, Some(400), "{}", String::from_utf8_lossy(request));
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
    assert_eq!(backend.incomplete(), 0);
    assert!(rejections(&balancer, "bad_request").await >= 12);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_nginx_and_rfc_9112_refuse_is_refused_before_any_upstream() {
    let (backend, balancer) = setup("").await;
    let bad_request: [&[u8]; 9] = [
        // Host twice, a Host holding a list, a Host that is no host, none.
        b"GET /a HTTP/1.1\r\nHost: good.example\r\nHost: evil.example\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: good.example, evil.example\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: a/b@c\r\n\r\n",
        b"GET /a HTTP/1.1\r\nX-A: 1\r\n\r\n",
        // A bare LF ending the trailer section, which a proxy in front
        // might read as the end of the body, with a request behind it.
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        // A target in neither origin nor absolute form.
        b"GET localhost:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        // Two identical lengths.
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
    ];
    for request in bad_request {
        let status = exchange(&balancer, request).await.map(|r| r.status);
        assert_eq!(status, Some(400), "{}", String::from_utf8_lossy(request));
    }
    // A transfer coding beside chunked: the coding would be lost on the way.
    let not_implemented: [&[u8]; 2] = [
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    for request in not_implemented {
        let response = exchange(&balancer, request).await.unwrap();
        assert_eq!(response.status, 501, "{}", String::from_utf8_lossy(request));
        assert_eq!(
            String::from_utf8_lossy(&response.body),
            "{\"error\":\"not_implemented\",\"detail\":\"a transfer coding other than chunked\"}\n"
        );
    }
    // Nothing of any of them reached the backend, whole or in part.
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
    assert_eq!(backend.incomplete(), 0);
    assert_eq!(rejections(&balancer, "bad_request").await, 9);
    assert_eq!(rejections(&balancer, "not_implemented").await, 2);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_absolute_form_goes_to_the_host_its_target_names() {
    let (backend, balancer) = setup("").await;
    let response = exchange(
        &balancer,
        b"GET http://shop.example:8080/a?b=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    let seen = backend.requests()[0].to_ascii_lowercase();
    assert!(seen.starts_with("get /a?b=1 http/1.1\r\n"), "{seen}");
    assert!(seen.contains("\r\nhost: shop.example:8080\r\n"), "{seen}");
    assert!(!seen.contains("other.example"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_with_an_underscore_is_never_forwarded() {
    let (backend, balancer) = setup("").await;
    let response = exchange(
        &balancer,
        b"GET /a HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nX_User: eve\r\nX-User: ann\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    let seen = backend.requests()[0].to_ascii_lowercase();
    assert!(
        !seen.contains("transfer_encoding") && !seen.contains("x_user"),
        "{seen}"
    );
    assert!(seen.contains("x-user: ann"), "{seen}");
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_chunk_framing_gets_400_and_the_backend_never_gets_a_body() {
    let (backend, balancer) = setup("").await;
    let requests: [&[u8]; 4] = [
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
    ];
    for request in requests {
        let status = exchange(&balancer, request).await.map(|r| r.status);
        assert!(
            matches!(status, None | Some(400)),
            "{status:?} for {}",
            String::from_utf8_lossy(request)
        );
    }
    // What the backend got of them, if anything, never ended: no request to
    // act on.
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_block_over_the_limit_or_too_many_headers_get_431() {
    let (backend, balancer) = setup("").await;
    let big = format!(
        "GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4096)
    );
    assert_eq!(
        exchange(&balancer, big.as_bytes()).await.map(|r| r.status),
        Some(431)
    );
    let many: String = (0..40).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let many = format!("GET /a HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert_eq!(
        exchange(&balancer, many.as_bytes()).await.map(|r| r.status),
        Some(431)
    );
    assert!(backend.requests().is_empty());
    assert_eq!(rejections(&balancer, "headers_too_large").await, 2);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413_and_nothing_is_forwarded() {
    let (backend, balancer) = setup("").await;
    let announced = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n{}",
        "a".repeat(1001)
    );
    assert_eq!(
        exchange(&balancer, announced.as_bytes())
            .await
            .map(|r| r.status),
        Some(413)
    );
    // Chunked, so only counting while it streams can catch it.
    let chunks: String = (0..11)
        .map(|_| format!("64\r\n{}\r\n", "b".repeat(100)))
        .collect();
    let streamed = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}0\r\n\r\n"
    );
    assert_eq!(
        exchange(&balancer, streamed.as_bytes())
            .await
            .map(|r| r.status),
        Some(413)
    );
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
    assert_eq!(rejections(&balancer, "body_too_large").await, 2);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_is_cut_at_the_header_timeout_while_ab_keeps_succeeding() {
    let (backend, balancer) = setup("").await;
    let url = balancer.url("/ab");
    let load =
        tokio::task::spawn_blocking(move || ab(&["-q", "-k", "-n", "3000", "-c", "4"], &url));

    // Ten slow clients, one header byte every 200 ms.
    let slow: Vec<_> = (0..10)
        .map(|_| {
            let proxy = balancer.proxy();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut conn = RawConnection::connect(proxy).await;
                let head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
                for byte in head {
                    if conn.try_send(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let closed = conn.read_to_close().await;
                (started.elapsed(), closed)
            })
        })
        .collect();
    for client in slow {
        let (took, answer) = client.await.unwrap();
        assert!(
            answer.is_empty(),
            "a slow head got {:?}",
            String::from_utf8_lossy(&answer)
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "cut after {took:?}"
        );
    }
    let report = load.await.unwrap();
    assert_eq!(
        (report.complete, report.failed, report.non_2xx),
        (3_000, 0, 0)
    );
    assert!(!backend.requests().iter().any(|r| r.contains("/slow")));
    assert_eq!(rejections(&balancer, "header_timeout").await, 10);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_the_upstream_request_is_cancelled() {
    let (backend, balancer) = setup("").await;
    let stream = TcpStream::connect(balancer.proxy()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(b"POST /buy/ticket HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // One byte every 200 ms, until the balancer answers.
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if writer.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut byte));
        assert_eq!(
            read.await.expect("an answer").unwrap(),
            1,
            "closed unanswered"
        );
        head.push(byte[0]);
    }
    trickle.abort();
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The backend saw the head and some bytes, never the whole request.
    wait_until_async(
        "the upstream exchange to be cut",
        Duration::from_secs(5),
        || async { backend.incomplete() == 1 },
    )
    .await;
    assert!(backend.requests().is_empty());
    assert_eq!(rejections(&balancer, "body_timeout").await, 1);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_go_and_the_forwarding_headers_are_set() {
    let (backend, balancer) = setup("").await;
    let response = exchange(
        &balancer,
        b"GET /a HTTP/1.1\r\nHost: shop\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\n\
          TE: trailers\r\nUpgrade: h2c\r\nProxy-Authorization: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200);
    let seen = backend.requests()[0].to_ascii_lowercase();
    for gone in [
        "\r\nconnection:",
        "x-hop",
        "keep-alive:",
        "\r\nte:",
        "upgrade:",
        "proxy-authorization",
    ] {
        assert!(!seen.contains(gone), "{gone} in {seen}");
    }
    // From the loopback, a trusted proxy by default: the chain is kept.
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1\r\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: shop\r\n"), "{seen}");
    assert!(seen.contains("via: 1.1 spike\r\n"), "{seen}");
    assert_eq!(response.header("via"), Some("1.1 spike"));
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_client_cannot_forge_forwarded_headers() {
    let (backend, balancer) = setup("\n[proxy]\ntrusted_proxies = []\n").await;
    exchange(
        &balancer,
        b"GET /a HTTP/1.1\r\nHost: shop\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n\r\n",
    )
    .await
    .unwrap();
    let seen = backend.requests()[0].to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\r\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen}");
    assert!(!seen.contains("203.0.113.9"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_new_connections_wait_and_old_ones_work() {
    let (backend, balancer) = setup("max_connections = 20\n").await;
    let rss_before = rss_kib(balancer.process.pid());
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut conn = RawConnection::connect(balancer.proxy()).await;
        conn.send(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(conn.response(false).await.unwrap().status, 200);
        held.push(conn);
    }
    // A thousand more connect (the kernel's backlog takes them) but are not
    // served while the twenty stay open.
    let mut waiting = Vec::new();
    for _ in 0..1_000 {
        waiting.push(RawConnection::connect(balancer.proxy()).await);
    }
    let mut last = waiting.pop().unwrap();
    last.send(b"GET /waiting HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let early = tokio::time::timeout(Duration::from_millis(500), last.response(false)).await;
    assert!(early.is_err(), "served past the limit");
    // The connections within the limit keep working.
    for conn in held.iter_mut().take(5) {
        conn.send(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert_eq!(conn.response(false).await.unwrap().status, 200);
    }
    let rss_after = rss_kib(balancer.process.pid());
    assert!(
        rss_after < rss_before + 16 * 1024,
        "{rss_before} KiB, then {rss_after} KiB"
    );
    assert!(rejections(&balancer, "connection_limit").await >= 1);

    // Room again: the waiting connection is served.
    drop(held);
    drop(waiting);
    let response = tokio::time::timeout(Duration::from_secs(10), last.response(false))
        .await
        .expect("served once room was made");
    assert_eq!(response.unwrap().status, 200);
    still_serves(&balancer, &backend).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let (backend, balancer) = setup("\n[rate_limit]\nper_second = 2\nburst = 5\n").await;
    let client = Client::new();
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let reply = client.get(&balancer.url("/buy/ticket")).await;
        if reply.status == 429 {
            let wait: u64 = reply.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&wait), "{wait}");
            assert_eq!(reply.json()["error"], "rate_limited");
        }
        statuses.push(reply.status.as_u16());
    }
    let allowed = statuses.iter().filter(|&&s| s == 200).count();
    assert!((5..=6).contains(&allowed), "{statuses:?}");
    assert_eq!(backend.requests().len(), allowed);
    assert_eq!(
        rejections(&balancer, "rate_limited").await,
        (20 - allowed) as u64
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_at_its_request_limit_is_passed_over_then_503() {
    let respond = |request: &Recorded| {
        let reply = Answer::ok(request.uri.path().to_owned());
        if request.uri.path() == "/slow" {
            reply.delayed(Duration::from_secs(3))
        } else {
            reply
        }
    };
    let (a, b) = (Backend::start(respond).await, Backend::start(respond).await);
    let balancer = Balancer::start(
        &[(a.addr(), 1), (b.addr(), 1)],
        "[proxy]\nmax_requests_per_upstream = 1\n",
    );
    let client = Client::new();
    let slow = |client: &Client| {
        let (client, url) = (client.clone(), balancer.url("/slow"));
        tokio::spawn(async move { client.get(&url).await })
    };
    let first = slow(&client);
    wait_until_async(
        "the slow request to be in flight",
        Duration::from_secs(5),
        || async { a.hits() + b.hits() == 1 },
    )
    .await;
    let busy = if a.hits() == 1 { &a } else { &b };
    let free = if a.hits() == 1 { &b } else { &a };
    // Every request goes to the upstream that is not at its limit.
    for _ in 0..4 {
        assert_eq!(client.get(&balancer.url("/fast")).await.status, 200);
    }
    assert_eq!((busy.hits(), free.hits()), (1, 4));

    // Both at their limit: 503 at once.
    let second = slow(&client);
    wait_until_async(
        "the second slow request to be in flight",
        Duration::from_secs(5),
        || async { free.hits() == 5 },
    )
    .await;
    let refused = client.get(&balancer.url("/fast")).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "no_upstream");
    assert_eq!(a.hits() + b.hits(), 6);

    for slow in [first, second] {
        assert_eq!(slow.await.unwrap().status, 200);
    }
    assert_eq!(client.get(&balancer.url("/fast")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_parked_small_and_serve_again() {
    let (backend, balancer) = setup("").await;
    let parked = || async {
        let stats = balancer.stats().await;
        let connections = &stats["client_connections"];
        (
            connections["open"].as_u64().unwrap(),
            connections["parked"].as_u64().unwrap(),
        )
    };
    let rss_before = rss_kib(balancer.process.pid());
    // In batches, as a crowd arrives: each answered, then left idle.
    let mut held = Vec::new();
    for _ in 0..20 {
        for _ in 0..100 {
            let mut conn = RawConnection::connect(balancer.proxy()).await;
            conn.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert_eq!(conn.response(false).await.unwrap().status, 200);
            held.push(conn);
        }
        let count = held.len() as u64;
        wait_until_async(
            "the idle connections to be parked",
            Duration::from_secs(5),
            || async { parked().await == (count, count) },
        )
        .await;
    }
    // Parked, a connection holds its socket and little else: far less than
    // hyper's two 8 KiB buffers each.
    let grown = rss_kib(balancer.process.pid()).saturating_sub(rss_before);
    assert!(
        grown < 2_000 * 8,
        "{grown} KiB more for 2,000 idle connections"
    );

    // Each serves its next request as if it had never been parked.
    for conn in held.iter_mut() {
        conn.send(b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let response = conn.response(false).await.unwrap();
        assert_eq!(response.status, 200);
        assert!(String::from_utf8_lossy(&response.body).starts_with("GET /second HTTP/1.1\r\n"));
    }
    let seen = backend.requests();
    assert_eq!(
        seen.iter()
            .filter(|r| r.starts_with("GET /second "))
            .count(),
        2_000
    );
}

/// A body of `len` bytes that shows where any byte of it came from.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Reads one response with a `Content-Length` body off `stream`: at full
/// speed, but over the last `slow_tail` bytes of the body with a pause of
/// 150 ms after every 256 KiB. Returns the head and the body.
async fn read_reply(stream: &mut TcpStream, slow_tail: usize) -> (String, Vec<u8>) {
    let mut got = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    let (head, length) = loop {
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&chunk[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let length = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap())
                .expect("a content length");
            got.drain(..end + 4);
            break (head, length);
        }
    };
    let mut since_pause = 0;
    while got.len() < length {
        if length - got.len() <= slow_tail && since_pause >= 256 * 1024 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            since_pause = 0;
        }
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk));
        let n = read
            .await
            .unwrap_or_else(|_| panic!("stalled at {} of {length} body bytes", got.len()))
            .expect("read");
        assert!(n > 0, "closed at {} of {length} body bytes", got.len());
        got.extend_from_slice(&chunk[..n]);
        since_pause += n;
    }
    (head, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_gets_its_whole_reply_and_the_next_one_intact() {
    const LEN: usize = 8 << 20;
    let backend = Backend::start(|request| {
        let len = if request.uri.path() == "/big" {
            LEN
        } else {
            10
        };
        Answer::ok(pattern(len))
    })
    .await;
    let balancer = Balancer::start(&[(backend.addr(), 1)], EDGE);
    let mut stream = TcpStream::connect(balancer.proxy()).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The last 5 MiB slowly: more than the kernel's buffers hold, so that
    // the end of the reply waits in the balancer, unflushed, for far longer
    // than an idle connection waits before it is parked.
    let (head, body) = read_reply(&mut stream, 5 << 20).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body.len(), LEN);
    assert!(
        body == pattern(LEN),
        "the body differs from what the backend sent"
    );

    stream
        .write_all(b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, body) = read_reply(&mut stream, 0).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, pattern(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_the_send_timeout() {
    let backend = Backend::start(|_| Answer::ok(pattern(32 << 20))).await;
    let balancer = Balancer::start(
        &[(backend.addr(), 1)],
        &format!("{EDGE}send_timeout = \"1s\"\n"),
    );
    let mut stream = TcpStream::connect(balancer.proxy()).await.unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let upstream_busy = || async {
        let stats = balancer.stats().await;
        (
            stats["upstreams"][0]["in_flight"].as_u64().unwrap(),
            stats["client_connections"]["open"].as_u64().unwrap(),
        )
    };
    wait_until_async(
        "the reply to be under way",
        Duration::from_secs(5),
        || async { upstream_busy().await == (1, 1) },
    )
    .await;
    // The client never reads: past the send timeout the connection and the
    // upstream request are let go.
    let started = Instant::now();
    wait_until_async(
        "the stalled reply to be dropped",
        Duration::from_secs(10),
        || async { upstream_busy().await == (0, 0) },
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    still_serves_any(&balancer).await;
}

async fn still_serves_any(balancer: &Balancer) {
    let reply = Client::new().get(&balancer.url("/after")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_reaches_a_client_that_is_still_sending_its_body() {
    let (backend, balancer) = setup("").await;
    let stream = TcpStream::connect(balancer.proxy()).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // Announced far over the limit, and sent regardless.
    let sending = tokio::spawn(async move {
        let _ = writer
            .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000\r\n\r\n")
            .await;
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..122 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
        writer
    });
    let mut reply = Vec::new();
    let mut chunk = vec![0; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), reader.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => reply.extend_from_slice(&chunk[..n]),
            Ok(Err(err)) => panic!("{err} after {:?}", String::from_utf8_lossy(&reply)),
            Err(_) => panic!("no end after {:?}", String::from_utf8_lossy(&reply)),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");
    drop(sending.await.unwrap());
    assert!(backend.requests().is_empty());
    still_serves(&balancer, &backend).await;
}
