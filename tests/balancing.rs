//! The traffic split: nginx's smooth weighted round-robin, counted at the
//! backends.

use std::sync::Arc;

use spike_tests::backend::Backend;
use spike_tests::balancer::Balancer;
use spike_tests::client::Client;

async fn backends(names: &[&str]) -> Vec<Backend> {
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::named(name).await);
    }
    backends
}

fn weighted(backends: &[Backend], weights: &[u32]) -> Vec<(std::net::SocketAddr, u32)> {
    backends
        .iter()
        .map(Backend::addr)
        .zip(weights.iter().copied())
        .collect()
}

/// Sends `count` GETs from `concurrency` clients; returns the bodies.
async fn get_many(url: &str, count: usize, concurrency: usize) -> Vec<String> {
    let client = Client::new();
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(count));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, url, left) = (client.clone(), url.to_owned(), Arc::clone(&left));
        workers.spawn(async move {
            let mut bodies = Vec::new();
            while left
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok()
            {
                let reply = client.get(&url).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                bodies.push(reply.text());
            }
            bodies
        });
    }
    workers.join_all().await.into_iter().flatten().collect()
}

async fn admin_requests(balancer: &Balancer) -> Vec<u64> {
    balancer.stats().await["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["requests"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_1_to_4_split_1000_requests_exactly() {
    let backends = backends(&["a", "b", "c", "d"]).await;
    let balancer = Balancer::start(&weighted(&backends, &[1, 2, 3, 4]), "");

    let bodies = get_many(&balancer.url("/buy/ticket"), 1_000, 1).await;

    let hits: Vec<_> = backends.iter().map(Backend::hits).collect();
    assert_eq!(hits, [100, 200, 300, 400]);
    // Each window of 10 consecutive picks holds every weight exactly.
    for window in bodies.chunks(10) {
        let count = |name: &str| window.iter().filter(|b| *b == name).count();
        assert_eq!(
            [count("a"), count("b"), count("c"), count("d")],
            [1, 2, 3, 4]
        );
    }
    assert_eq!(admin_requests(&balancer).await, [100, 200, 300, 400]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_1_to_4_hold_under_concurrent_load() {
    let backends = backends(&["a", "b", "c", "d"]).await;
    let balancer = Balancer::start(&weighted(&backends, &[1, 2, 3, 4]), "");

    let bodies = get_many(&balancer.url("/"), 1_000, 50).await;

    assert_eq!(bodies.len(), 1_000);
    let hits: Vec<_> = backends.iter().map(Backend::hits).collect();
    assert_eq!(hits, [100, 200, 300, 400]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_5_1_1_follow_nginxs_order() {
    let backends = backends(&["a", "b", "c"]).await;
    let balancer = Balancer::start(&weighted(&backends, &[5, 1, 1]), "");

    let order: String = get_many(&balancer.url("/"), 14, 1).await.concat();
    assert_eq!(order, "aabacaaaabacaa");

    // And the counts hold under concurrency.
    get_many(&balancer.url("/"), 700, 32).await;
    let hits: Vec<_> = backends.iter().map(Backend::hits).collect();
    assert_eq!(hits, [10 + 500, 2 + 100, 2 + 100]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_weight_drains_an_upstream() {
    let backends = backends(&["a", "b", "c"]).await;
    let balancer = Balancer::start(&weighted(&backends, &[2, 0, 1]), "");

    get_many(&balancer.url("/"), 300, 8).await;
    let hits: Vec<_> = backends.iter().map(Backend::hits).collect();
    assert_eq!(hits, [200, 0, 100]);
}
