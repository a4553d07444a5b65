//! The spike load balancer: an HTTP/1 reverse proxy that spreads requests
//! over weighted upstreams with nginx's smooth weighted round-robin.
//!
//! [`balance`] picks the upstream, [`proxy`] forwards the request to it
//! over a connection from the upstream's [`pool`] ([`h1`] speaks HTTP/1.1
//! to it, [`headers`] rewrites what a proxy must, [`body`] streams the
//! bodies, [`error`] maps failures to replies), [`upstream`] keeps each upstream's state and [`metrics`] its
//! series, [`health`] decides who may take requests, [`reload`] applies
//! changes to the configuration while it runs, and [`admin`] serves
//! `/stats`, `/metrics` and runtime changes on a listener of its own.
//! [`Balancer`] ties them together.

pub mod admin;
pub mod balance;
pub mod body;
pub mod cli;
pub mod error;
pub mod h1;
pub mod headers;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod upstream;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use spike_config::server::{Rejections, Server};
use spike_config::{BalancerConfig, Source};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::balance::{Router, Routing};
use crate::headers::ClientAddr;
use crate::health::Checker;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::{Control, Triggers};

/// A balancer ready to serve: its routing table, health checks and watch
/// on its configuration are set up. Shared by the worker threads, each of
/// which serves the proxy on a listener of its own ([`workers`]).
#[derive(Debug)]
pub struct Balancer {
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    /// The proxy's listeners, one per worker, share its connection limit.
    proxy_server: Server,
    admin_server: Server,
}

impl Balancer {
    /// Sets up the balancer of `config`, read from `source`, until
    /// `shutdown`: from the moment this returns, changes to the file and
    /// SIGHUP are applied. Must run inside the runtime that is to run the
    /// health checks and the watch on the file (worker 0's).
    pub fn new(
        source: &Source,
        config: BalancerConfig,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let triggers = Triggers::new(source.path())?;
        let checker = Checker::new(shutdown.clone());
        let metrics = Arc::new(Metrics::new());
        let rejections = Arc::new(Rejections::with_hook({
            let metrics = Arc::clone(&metrics);
            move |reason| metrics.rejected(reason)
        }));
        let registry = upstream::Registry::new(Arc::clone(&metrics), Some(checker));
        let router = Arc::new(Router::new(Routing::from(&config), registry));
        let proxy_server = Server::new(
            config.server.clone(),
            Arc::clone(&rejections),
            shutdown.clone(),
        );
        let admin_server = Server::new(
            config.server.clone(),
            Arc::clone(&rejections),
            shutdown.clone(),
        );
        let access_log = config.log.access_log.is_some();
        let control = Arc::new(Control::new(
            Arc::clone(&router),
            source.path().to_owned(),
            config,
            source.text().to_owned(),
        ));
        tokio::spawn(reload::watch(
            Arc::clone(&control),
            triggers,
            shutdown.clone(),
        ));
        tokio::spawn(tidy(Arc::clone(&router), shutdown));
        Ok(Self {
            proxy: Arc::new(Proxy::new(router, rejections, access_log)),
            admin: Arc::new(Admin::new(control, Arc::clone(proxy_server.connections()))),
            proxy_server,
            admin_server,
        })
    }

    /// Serves the proxy on `listener` until shutdown, then lets requests in
    /// flight finish. Each worker runs one.
    pub async fn serve_proxy(&self, listener: TcpListener) {
        let proxy = Arc::clone(&self.proxy);
        self.proxy_server
            .serve(listener, move |client| {
                let proxy = Arc::clone(&proxy);
                let client = Arc::new(ClientAddr::new(client));
                service_fn(move |req| Arc::clone(&proxy).handle(req, Arc::clone(&client)))
            })
            .await;
    }

    /// Serves `/stats`, `/metrics` and runtime changes on `listener` until
    /// shutdown.
    pub async fn serve_admin(&self, listener: TcpListener) {
        let admin = Arc::clone(&self.admin);
        self.admin_server
            .serve(listener, move |_| {
                let admin = Arc::clone(&admin);
                service_fn(move |req| {
                    let admin = Arc::clone(&admin);
                    async move { admin.handle(req).await }
                })
            })
            .await;
    }
}

/// Until `shutdown`, closes pooled connections idle for longer than the idle
/// timeout, twice per period, and forgets the rate-limit buckets of clients
/// gone quiet.
async fn tidy(router: Arc<Router>, shutdown: CancellationToken) {
    loop {
        let idle_timeout = router.table().proxy.idle_timeout;
        tokio::select! {
            _ = tokio::time::sleep((idle_timeout / 2).max(Duration::from_millis(100))) => {}
            _ = shutdown.cancelled() => return,
        }
        let table = router.table();
        for peer in &table.peers {
            peer.upstream.pool.evict_expired();
        }
        if let Some(limit) = &table.rate_limit {
            limit.forget_idle();
        }
    }
}
