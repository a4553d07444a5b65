//! The spike load balancer: an HTTP/1 reverse proxy that spreads requests
//! over weighted upstreams with nginx's smooth weighted round-robin.
//!
//! [`balance`] picks the upstream, [`proxy`] forwards the request to it
//! over a connection from the upstream's [`pool`] ([`headers`] rewrites what
//! a proxy must, [`body`] streams the bodies, [`error`] maps failures to
//! replies), [`upstream`] keeps each upstream's state and [`metrics`] its
//! series, and [`admin`] serves `/stats` and `/metrics` on a listener of its
//! own. [`run`] ties them together.

pub mod admin;
pub mod balance;
pub mod body;
pub mod error;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod upstream;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use spike_config::BalancerConfig;
use spike_config::server::serve;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::balance::Router;
use crate::headers::ClientAddr;
use crate::health::Checker;
use crate::metrics::Metrics;
use crate::pool::PoolSettings;
use crate::proxy::Proxy;

/// The balancer's two listeners, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// Where clients send requests to proxy.
    pub proxy: TcpListener,
    /// `/stats` and `/metrics`.
    pub admin: TcpListener,
}

/// Serves the proxy and the admin interface until `shutdown` is cancelled,
/// then lets requests in flight finish.
pub async fn run(listeners: Listeners, config: &BalancerConfig, shutdown: CancellationToken) {
    let pool = PoolSettings {
        connect_timeout: config.proxy.connect_timeout,
        idle_timeout: config.proxy.idle_timeout,
        max_idle: config.proxy.max_idle_per_upstream,
    };
    let checker = Checker::new(shutdown.clone());
    let registry = upstream::Registry::new(Arc::new(Metrics::new()), pool, Some(checker));
    let router = Arc::new(Router::new(&config.upstreams, registry));
    let proxy = Arc::new(Proxy::new(Arc::clone(&router), &config.proxy));
    tokio::spawn(evict_idle_connections(
        Arc::clone(&router),
        pool.idle_timeout,
        shutdown.clone(),
    ));
    let admin = Arc::new(Admin::new(router));

    let proxying = serve(
        listeners.proxy,
        &config.server,
        shutdown.clone(),
        |client| {
            let proxy = Arc::clone(&proxy);
            let client = Arc::new(ClientAddr::new(client));
            service_fn(move |req| {
                let (proxy, client) = (Arc::clone(&proxy), Arc::clone(&client));
                async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, &client).await) }
            })
        },
    );
    let administering = serve(listeners.admin, &config.server, shutdown, |_| {
        let admin = Arc::clone(&admin);
        service_fn(move |req| {
            let admin = Arc::clone(&admin);
            async move { admin.handle(req).await }
        })
    });
    tokio::join!(proxying, administering);
}

/// Closes pooled connections idle for longer than `idle_timeout`, checking
/// twice per period, until `shutdown`.
async fn evict_idle_connections(
    router: Arc<Router>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval((idle_timeout / 2).max(Duration::from_millis(100)));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for peer in &router.table().peers {
            peer.upstream.pool.evict_expired();
        }
    }
}
