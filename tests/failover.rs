//! Health checks, failover and safe retries: what a dead, hanging or sick
//! upstream costs the clients, counted at the client and at the backends.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use spike_tests::backend::{Answer, Backend};
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;
use spike_tests::process::Process;
use spike_tests::redis::free_port;
use spike_tests::traffic::{Load, backend_process};
use spike_tests::wait_until_async;

/// Fast checks so that the tests run in a second or two.
const FAST_CHECKS: &str =
    "[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 3\n";
const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(100);

/// The `/stats` entry of the upstream at `addr`.
async fn upstream(balancer: &Balancer, addr: SocketAddr) -> serde_json::Value {
    let stats = balancer.stats().await;
    stats["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["addr"] == addr.to_string())
        .unwrap_or_else(|| panic!("{addr} not in {stats}"))
        .clone()
}

async fn wait_for_state(balancer: &Balancer, addr: SocketAddr, state: &str, within: Duration) {
    wait_until_async(&format!("{addr} to be {state}"), within, || async {
        upstream(balancer, addr).await["state"] == state
    })
    .await;
}

/// What a backend process saw, health checks aside.
async fn seen(backend: &Process) -> Vec<String> {
    let reply = Client::new().get(&backend.url("/seen")).await;
    serde_json::from_slice(&reply.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_costs_only_its_requests_in_flight_and_comes_back() {
    let mut a = backend_process("a", "127.0.0.1:0");
    let b = backend_process("b", "127.0.0.1:0");
    let c = backend_process("c", "127.0.0.1:0");
    let a_addr = a.addr();
    let balancer = Balancer::start(&[(a_addr, 1), (b.addr(), 1), (c.addr(), 1)], FAST_CHECKS);

    // Steady load: 12 clients, each request taking 200 ms at its backend.
    let load = Load::start(balancer.url("/delay/200"), 12);
    wait_until_async("the load to be steady", Duration::from_secs(10), || async {
        load.ok() >= 60
    })
    .await;
    assert_eq!(load.failed(), 0);

    // What the kill can cost: the requests in flight on a, and at most one
    // more per idle connection to a (a request may go out on one before
    // the balancer has read that a closed it).
    let exposed = |stats: serde_json::Value| {
        stats["in_flight"].as_u64().unwrap() + stats["idle_connections"].as_u64().unwrap()
    };
    let exposed_before = exposed(upstream(&balancer, a_addr).await);
    let failed_before = load.failed();
    a.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let exposed_after = exposed(upstream(&balancer, a_addr).await);
    a.wait(Duration::from_secs(5));

    // Marked down within fall x interval plus one timeout (plus the time
    // these polls take on a busy machine).
    wait_for_state(&balancer, a_addr, "down", Duration::from_secs(5)).await;
    let took = killed.elapsed();
    assert!(
        took <= 3 * INTERVAL + TIMEOUT + Duration::from_millis(300),
        "marked down after {took:?}"
    );

    // Let the rest of the load run on without it.
    let ok_at_down = load.ok();
    wait_until_async(
        "more requests to succeed",
        Duration::from_secs(10),
        || async { load.ok() >= ok_at_down + 60 },
    )
    .await;
    let failed = load.failed() - failed_before;
    let bound = exposed_before.max(exposed_after) as usize;
    assert!(
        failed <= bound,
        "{failed} client-visible failures; {bound} requests in flight or idle connections on the killed backend"
    );
    let stats = upstream(&balancer, a_addr).await;
    assert!(
        stats["last_error"].as_str().unwrap().contains("connect"),
        "{stats}"
    );

    // Restarted on the same address: up again after `rise` good probes.
    let a = backend_process("a", &a_addr.to_string());
    wait_for_state(&balancer, a_addr, "up", Duration::from_secs(5)).await;
    let stats = upstream(&balancer, a_addr).await;
    assert!(stats["check_successes"].as_u64().unwrap() >= 2, "{stats}");
    let (_, failed_total) = load.stop().await;
    assert_eq!(
        failed_total - failed_before,
        failed,
        "no failure after the first ones"
    );

    // And it gets its share back: a third of 300 requests.
    let client = Client::new();
    for _ in 0..300 {
        assert_eq!(client.get(&balancer.url("/share")).await.status, 200);
    }
    let share = seen(&a)
        .await
        .iter()
        .filter(|path| *path == "/share")
        .count();
    assert!(
        (99..=101).contains(&share),
        "the restarted backend got {share} of 300"
    );
}

/// A node killed under load and restarted at once: its failed requests
/// rest it (shown as `resting`, with the time left), but it is back as
/// soon as it has passed `rise` probes, not after its 10 s rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restarted_at_once_is_back_after_rise_probes_not_its_rest() {
    const INTERVAL: Duration = Duration::from_millis(500);
    let mut a = backend_process("a", "127.0.0.1:0");
    let b = backend_process("b", "127.0.0.1:0");
    let a_addr = a.addr();
    let balancer = Balancer::start(
        &[(a_addr, 1), (b.addr(), 1)],
        "[health]\ninterval = \"500ms\"\ntimeout = \"400ms\"\nrise = 2\nfall = 30\n\
         max_fails = 3\nfail_timeout = \"10s\"\n",
    );
    let load = Load::start(balancer.url("/load"), 8);
    wait_until_async("the load to be steady", Duration::from_secs(10), || async {
        load.ok() >= 50
    })
    .await;

    a.signal(Signal::SIGKILL);
    a.wait(Duration::from_secs(5));
    wait_for_state(&balancer, a_addr, "resting", Duration::from_secs(5)).await;
    let stats = upstream(&balancer, a_addr).await;
    let left = stats["rest_seconds_left"].as_f64().unwrap();
    assert!(left > 5.0 && left <= 10.0, "{stats}");
    assert!(!stats["healthy"].as_bool().unwrap(), "{stats}");

    let a = backend_process("a", &a_addr.to_string());
    let restarted = Instant::now();
    wait_until_async(
        "requests to reach the restarted node",
        Duration::from_secs(10),
        || async { seen(&a).await.iter().any(|path| path == "/load") },
    )
    .await;
    let back_after = restarted.elapsed();
    // rise x interval, plus the wait for the first probe, plus this
    // machine's slack: well short of the 10 s rest.
    assert!(
        back_after < 2 * INTERVAL + INTERVAL + Duration::from_millis(1_500),
        "back after {back_after:?}"
    );
    assert_eq!(upstream(&balancer, a_addr).await["state"], "up");
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_answers_is_timed_out_and_taken_out() {
    // Accepts connections, reads nothing, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let good = Backend::named("good").await;
    let balancer = Balancer::start(
        &[(silent_addr, 1), (good.addr(), 1)],
        &format!("{FAST_CHECKS}\n[proxy]\nresponse_timeout = \"300ms\"\n"),
    );

    // Until the checks take it out, a request sent to it gets 504 in time.
    let client = Client::new();
    let mut timed_out = 0;
    let started = Instant::now();
    while upstream(&balancer, silent_addr).await["state"] != "down" {
        let sent = Instant::now();
        let reply = client.get(&balancer.url("/")).await;
        match reply.status.as_u16() {
            200 => {}
            504 => {
                assert!(
                    sent.elapsed() < Duration::from_secs(2),
                    "a 504 took {:?}",
                    sent.elapsed()
                );
                timed_out += 1;
            }
            status => panic!("unexpected {status}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never marked down"
        );
    }
    assert!(timed_out >= 1, "the silent backend was never tried");
    let stats = upstream(&balancer, silent_addr).await;
    assert!(
        stats["last_error"].as_str().unwrap().contains("timed out"),
        "{stats}"
    );

    // Once down it gets nothing: every request succeeds at once.
    for _ in 0..20 {
        assert_eq!(client.get(&balancer.url("/")).await.status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_fails_its_health_checks_is_taken_out() {
    let sick = Backend::start(|req| {
        if req.uri.path() == "/health" {
            Answer::status(500)
        } else {
            Answer::ok("sick")
        }
    })
    .await;
    let well = Backend::named("well").await;
    let balancer = Balancer::start(&[(sick.addr(), 1), (well.addr(), 1)], FAST_CHECKS);

    wait_for_state(&balancer, sick.addr(), "down", Duration::from_secs(5)).await;
    let stats = upstream(&balancer, sick.addr()).await;
    assert_eq!(stats["last_error"], "status 500");
    assert!(stats["check_failures"].as_u64().unwrap() >= 3, "{stats}");
    assert_eq!(stats["healthy"], false);

    let before = sick.hits();
    let client = Client::new();
    for _ in 0..50 {
        assert_eq!(client.get(&balancer.url("/")).await.body, "well");
    }
    assert_eq!(sick.hits(), before, "a down upstream takes no requests");
    assert!(sick.health_checks() >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_that_reached_a_dying_node_is_not_retried_elsewhere() {
    let mut a = backend_process("a", "127.0.0.1:0");
    let b = backend_process("b", "127.0.0.1:0");
    // Equal weights: the first pick is the first upstream.
    let balancer = Balancer::start(&[(a.addr(), 1), (b.addr(), 1)], FAST_CHECKS);

    let purchase = "/delay/5000/buy/ticket?user=only-once";
    let request = tokio::spawn({
        let url = balancer.url(purchase);
        async move { Client::new().get(&url).await }
    });
    wait_until_async(
        "the purchase to reach a",
        Duration::from_secs(5),
        || async { seen(&a).await.iter().any(|path| path == purchase) },
    )
    .await;
    a.kill();

    let reply = request.await.unwrap();
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "upstream_failed");
    assert!(seen(&b).await.is_empty(), "b saw {:?}", seen(&b).await);
    assert_eq!(upstream(&balancer, a.addr()).await["failovers"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_goes_to_another_upstream() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let alive = Backend::named("alive").await;
    // Checks off: only the request itself finds the dead upstream.
    let balancer = Balancer::start(
        &[(dead, 1), (alive.addr(), 1)],
        "[health]\nenabled = false\nmax_fails = 0\n",
    );

    let client = Client::new();
    for _ in 0..10 {
        let reply = client.get(&balancer.url("/buy/ticket")).await;
        assert_eq!(
            (reply.status.as_u16(), reply.text()),
            (200, "alive".to_owned())
        );
    }
    assert_eq!(alive.hits(), 10);
    let stats = upstream(&balancer, dead).await;
    assert_eq!(
        stats["failovers"], 5,
        "every other pick was the dead upstream: {stats}"
    );
    let all = balancer.stats().await;
    assert_eq!(all["retries"], 5);
    let metrics = client.get(&balancer.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains(&format!(
            "spike_balancer_upstream_failovers_total{{upstream=\"{dead}\",kind=\"connect_failed\"}} 5"
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_upstream_down_clients_get_503_at_once_or_the_backup() {
    let sick = |name: &'static str| {
        Backend::start(move |req| {
            if req.uri.path() == "/health" {
                Answer::status(503)
            } else {
                Answer::ok(name)
            }
        })
    };
    let (p1, p2) = (sick("p1").await, sick("p2").await);
    let backup = Backend::named("backup").await;
    let upstreams = [(p1.addr(), 1), (p2.addr(), 1)];
    let config = spike_tests::balancer::config(&upstreams, FAST_CHECKS)
        + &format!(
            "\n[[upstream]]\naddr = \"{}\"\nbackup = true\n",
            backup.addr()
        );
    let with_backup = Balancer::with_config(&config);
    let without_backup = Balancer::start(&upstreams, FAST_CHECKS);

    // While the primaries are up, the backup gets nothing.
    let client = Client::new();
    for _ in 0..10 {
        client.get(&with_backup.url("/")).await;
    }
    assert_eq!(backup.hits(), 0);

    for balancer in [&with_backup, &without_backup] {
        for addr in [p1.addr(), p2.addr()] {
            wait_for_state(balancer, addr, "down", Duration::from_secs(5)).await;
        }
    }
    for _ in 0..10 {
        assert_eq!(client.get(&with_backup.url("/")).await.body, "backup");
    }

    let started = Instant::now();
    let reply = client.get(&without_backup.url("/buy/ticket")).await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(reply.json()["error"], "no_upstream");
}
