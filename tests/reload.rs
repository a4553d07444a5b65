//! Live reconfiguration under load, runtime changes on the admin listener,
//! and graceful shutdown. Load comes from ApacheBench; every count is taken
//! at the backends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::Method;
use nix::sys::signal::Signal;
use spike_tests::ab::{AbReport, ab};
use spike_tests::backend::{Answer, Backend};
use spike_tests::balancer::{Balancer, config};
use spike_tests::client::Client;
use spike_tests::wait_until_async;

/// Checks fast enough for an added upstream to come up within a second.
const FAST_CHECKS: &str = "[health]\ninterval = \"100ms\"\ntimeout = \"100ms\"\n";
/// How long a saved file may take to apply.
const APPLIED_WITHIN: Duration = Duration::from_secs(2);

async fn backends(count: usize) -> Vec<Backend> {
    let mut backends = Vec::new();
    for i in 0..count {
        let name = format!("{}", char::from(b'a' + i as u8));
        // `/slow` takes half a second, to have requests in flight.
        backends.push(
            Backend::start(move |req| {
                let reply = Answer::ok(name.clone());
                if req.uri.path() == "/slow" {
                    reply.delayed(Duration::from_millis(500))
                } else {
                    reply
                }
            })
            .await,
        );
    }
    backends
}

fn weighted(backends: &[Backend], weights: &[u32]) -> Vec<(SocketAddr, u32)> {
    backends
        .iter()
        .map(Backend::addr)
        .zip(weights.iter().copied())
        .collect()
}

fn hits(backends: &[Backend]) -> Vec<usize> {
    backends.iter().map(Backend::hits).collect()
}

async fn weights(balancer: &Balancer) -> Vec<u64> {
    balancer.stats().await["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["weight"].as_u64().unwrap())
        .collect()
}

/// Runs `ab -k` with `requests` at 8 concurrent clients, in the background.
fn load(balancer: &Balancer, requests: usize) -> tokio::task::JoinHandle<AbReport> {
    let url = balancer.url("/load");
    tokio::task::spawn_blocking(move || {
        ab(&["-q", "-k", "-n", &requests.to_string(), "-c", "8"], &url)
    })
}

async fn wait_for_hits(backends: &[Backend], at_least: usize) {
    wait_until_async(
        "the load to reach the backends",
        Duration::from_secs(20),
        || async { hits(backends).iter().sum::<usize>() >= at_least },
    )
    .await;
}

/// Sends `count` requests one after the other; returns how many each
/// backend got.
async fn split(balancer: &Balancer, backends: &[Backend], count: usize) -> Vec<usize> {
    let before = hits(backends);
    let client = Client::new();
    for _ in 0..count {
        assert_eq!(client.get(&balancer.url("/count")).await.status, 200);
    }
    hits(backends)
        .iter()
        .zip(before)
        .map(|(after, before)| after - before)
        .collect()
}

/// The header every change on the admin listener carries.
const JSON: &[(&str, &str)] = &[("content-type", "application/json")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_weights_apply_under_load_without_a_failed_request() {
    let backends = backends(4).await;
    let balancer = Balancer::start(&weighted(&backends, &[1, 2, 3, 4]), "");
    let running = load(&balancer, 20_000);
    wait_for_hits(&backends, 2_000).await;

    let saved = Instant::now();
    balancer.replace_config(&config(&weighted(&backends, &[4, 3, 2, 1]), ""));
    wait_until_async("the new weights", APPLIED_WITHIN, || async {
        weights(&balancer).await == [4, 3, 2, 1]
    })
    .await;
    let applied = saved.elapsed();

    let report = running.await.unwrap();
    assert_eq!(
        (report.complete, report.failed, report.non_2xx),
        (20_000, 0, 0),
        "after {applied:?}"
    );
    // The load kept running on the new weights; whatever point of their
    // cycle it stopped at, the next 1,000 requests follow them exactly.
    assert_eq!(
        split(&balancer, &backends, 1_000).await,
        [400, 300, 200, 100]
    );
    assert!(
        balancer.process.log().contains("configuration reloaded"),
        "{}",
        balancer.process.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_rejected_under_load_and_a_fixed_one_applies() {
    let backends = backends(4).await;
    let upstreams = weighted(&backends, &[1, 2, 3, 4]);
    let balancer = Balancer::start(&upstreams, "");
    let running = load(&balancer, 10_000);
    wait_for_hits(&backends, 1_000).await;

    // Line 6 is the first upstream's weight.
    let invalid = config(&upstreams, "").replacen("weight = 1", "weight = -1", 1);
    balancer.rewrite_config(&invalid);
    let path = balancer.config_path().display().to_string();
    wait_until_async("the rejection", APPLIED_WITHIN, || async {
        !balancer.stats().await["config"]["last_error"].is_null()
    })
    .await;
    let error = balancer.stats().await["config"]["last_error"].clone();
    let message = error["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("{path}:6:10: weight must be")),
        "{message}"
    );
    assert!(!error["at"].as_str().unwrap().is_empty());
    assert!(
        balancer.process.log().contains(&format!("{path}:6:10")),
        "{}",
        balancer.process.log()
    );

    let report = running.await.unwrap();
    assert_eq!(
        (report.complete, report.failed, report.non_2xx),
        (10_000, 0, 0)
    );
    assert_eq!(
        weights(&balancer).await,
        [1, 2, 3, 4],
        "the old weights stay"
    );
    assert_eq!(
        split(&balancer, &backends, 1_000).await,
        [100, 200, 300, 400]
    );

    balancer.replace_config(&config(&weighted(&backends, &[1, 1, 1, 1]), ""));
    wait_until_async("the fixed file", APPLIED_WITHIN, || async {
        weights(&balancer).await == [1, 1, 1, 1]
    })
    .await;
    assert!(balancer.stats().await["config"]["last_error"].is_null());
    assert_eq!(split(&balancer, &backends, 400).await, [100, 100, 100, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_added_and_removed_under_load_lose_nothing() {
    let backends = backends(4).await;
    let (a, b, c, d) = (&backends[0], &backends[1], &backends[2], &backends[3]);
    let balancer = Balancer::start(&[(a.addr(), 1), (b.addr(), 1), (c.addr(), 1)], FAST_CHECKS);
    let running = load(&balancer, 10_000);
    wait_for_hits(&backends, 1_000).await;

    // Slow requests in flight, at least one of them on c.
    let client = Client::new();
    let slow_on = |backend: &Backend| {
        backend
            .requests()
            .iter()
            .filter(|r| r.uri.path() == "/slow")
            .count()
    };
    let mut slow = Vec::new();
    while slow_on(c) == 0 {
        assert!(slow.len() < 30, "no slow request reached c");
        let (client, url) = (client.clone(), balancer.url("/slow"));
        slow.push(tokio::spawn(async move { client.get(&url).await }));
        let sent = slow.len();
        wait_until_async(
            "the slow request to arrive",
            Duration::from_secs(5),
            || async { backends.iter().map(slow_on).sum::<usize>() == sent },
        )
        .await;
    }

    // c goes, d comes.
    balancer.replace_config(&config(
        &[(a.addr(), 1), (b.addr(), 1), (d.addr(), 1)],
        FAST_CHECKS,
    ));
    wait_until_async(
        "d to be up",
        APPLIED_WITHIN + Duration::from_secs(1),
        || async {
            let stats = balancer.stats().await;
            let upstreams = stats["upstreams"].as_array().unwrap().clone();
            upstreams.len() == 3
                && upstreams[2]["addr"] == d.addr().to_string()
                && upstreams[2]["state"] == "up"
        },
    )
    .await;

    // What c had, it finished.
    for request in slow {
        let reply = request.await.unwrap();
        assert_eq!(reply.status, 200);
    }
    let report = running.await.unwrap();
    assert_eq!(
        (report.complete, report.failed, report.non_2xx),
        (10_000, 0, 0)
    );

    // c gets nothing new; d its share.
    let c_before = c.hits();
    let counts = split(&balancer, &backends, 300).await;
    assert_eq!(c.hits(), c_before);
    assert_eq!(counts, [100, 100, 0, 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_change_drain_and_restore_at_runtime_on_the_admin_listener() {
    let backends = backends(2).await;
    let a = &backends[0];
    let balancer = Balancer::start(&weighted(&backends, &[1, 1]), "");
    let client = Client::new();
    let admin = |path: &str| balancer.admin_url(&format!("/upstreams/{}/{path}", a.addr()));

    let req = Client::request(Method::PUT, &admin("weight"), JSON, br#"{"weight": 3}"#);
    let reply = client.send(req).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let entry = reply.json();
    assert_eq!(
        (entry["weight"].as_u64(), entry["file_weight"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(entry["overridden"], true);
    assert_eq!(balancer.stats().await["config"]["differs_from_file"], true);
    assert_eq!(split(&balancer, &backends, 400).await, [300, 100]);

    // Drain: requests in flight on a finish, new ones go to b.
    let in_flight = {
        let (client, url) = (client.clone(), balancer.url("/slow"));
        tokio::spawn(async move { client.get(&url).await })
    };
    wait_until_async("the slow request on a", Duration::from_secs(5), || async {
        a.requests().iter().any(|r| r.uri.path() == "/slow")
    })
    .await;
    let reply = client
        .send(Client::request(Method::POST, &admin("drain"), JSON, b""))
        .await
        .unwrap();
    assert_eq!(reply.json()["weight"], 0);
    assert_eq!(split(&balancer, &backends, 50).await, [0, 50]);
    assert_eq!(in_flight.await.unwrap().body, "a");

    let reply = client
        .send(Client::request(Method::POST, &admin("restore"), JSON, b""))
        .await
        .unwrap();
    assert_eq!(
        (
            reply.json()["weight"].as_u64(),
            reply.json()["overridden"].as_bool()
        ),
        (Some(1), Some(false))
    );
    assert_eq!(balancer.stats().await["config"]["differs_from_file"], false);
    assert_eq!(split(&balancer, &backends, 100).await, [50, 50]);

    // Refusals.
    let unknown = balancer.admin_url("/upstreams/127.0.0.1:1/drain");
    assert_eq!(
        client
            .send(Client::request(Method::POST, &unknown, JSON, b""))
            .await
            .unwrap()
            .status,
        404
    );
    let bad = client
        .send(Client::request(
            Method::PUT,
            &admin("weight"),
            JSON,
            br#"{"weight": -4}"#,
        ))
        .await
        .unwrap();
    assert_eq!(
        (bad.status.as_u16(), bad.json()["error"].as_str()),
        (400, Some("bad_weight"))
    );
    let wrong_method = client.get(&admin("drain")).await;
    assert_eq!(wrong_method.status, 405);
    // The proxy's listener has no admin: the path is proxied.
    let proxied = client
        .send(Client::request(
            Method::POST,
            &balancer.url(&format!("/upstreams/{}/drain", a.addr())),
            &[],
            b"",
        ))
        .await
        .unwrap();
    assert_eq!(proxied.status, 200);
    assert!(["a", "b"].contains(&proxied.text().as_str()));
    assert_eq!(weights(&balancer).await, [1, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_listen_address_is_reported_as_needing_a_restart() {
    let backends = backends(1).await;
    let mut balancer = Balancer::start(&weighted(&backends, &[1]), "");
    let moved = config(&weighted(&backends, &[2]), "").replacen("127.0.0.1:0", "127.0.0.1:1", 1);
    balancer.replace_config(&moved);
    wait_until_async("the reload", APPLIED_WITHIN, || async {
        weights(&balancer).await == [2]
    })
    .await;

    let config = balancer.stats().await["config"].clone();
    assert_eq!(config["restart_required"], serde_json::json!(["listen"]));
    assert!(
        balancer
            .process
            .log()
            .contains("applies only after a restart")
    );
    assert_eq!(
        Client::new().get(&balancer.url("/")).await.status,
        200,
        "still on the old address"
    );

    // SIGHUP re-reads the file (unchanged here) and does not stop the process.
    balancer.process.signal(Signal::SIGHUP);
    wait_until_async(
        "the SIGHUP to be handled",
        Duration::from_secs(5),
        || async { balancer.process.log().contains("SIGHUP: reloading") },
    )
    .await;
    assert_eq!(Client::new().get(&balancer.url("/")).await.status, 200);
    let status = balancer.process.terminate(Duration::from_secs(15));
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_accepted_request_finish_then_exits_0() {
    let backend =
        Backend::start(|_| Answer::ok(vec![b'x'; 100_000]).delayed(Duration::from_secs(1))).await;
    let mut balancer = Balancer::start(
        &[(backend.addr(), 1)],
        "[server]\nshutdown_grace = \"5s\"\n",
    );
    let client = Client::new();
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), balancer.url("/slow"));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    wait_until_async(
        "the burst to reach the backend",
        Duration::from_secs(5),
        || async { backend.hits() == 20 },
    )
    .await;

    let signalled = Instant::now();
    balancer.process.signal(Signal::SIGTERM);
    for request in burst {
        let reply = request.await.unwrap();
        assert_eq!((reply.status.as_u16(), reply.body.len()), (200, 100_000));
    }
    let status = balancer.process.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(balancer.proxy())
            .await
            .is_err(),
        "still accepting"
    );
}
