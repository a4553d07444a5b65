//! The spike load balancer: an HTTP/1.1 reverse proxy that spreads requests
//! over weighted upstreams with nginx's smooth weighted round-robin.
//!
//! A proxied request, in the order it runs: the server of `spike-http1`
//! reads and checks it and hands it to [`proxy`], which applies the rate
//! limit ([`limit`]), rewrites its headers ([`headers`]), asks [`balance`]
//! for an upstream from the routing [`table`] in force, checks a
//! connection out of that upstream's [`pool`], speaks HTTP/1.1 to it
//! (`spike_http1::client`), and streams the response back; a failure is
//! mapped to its reply in [`error`]. What the balancer knows of each
//! [`upstream`] outlives any one table ([`registry`]): its [`health`],
//! probed by [`check`], and its counters, exported by [`metrics`].
//! [`reload`] applies changes to the configuration while it runs, and
//! [`admin`] serves `/stats`, `/metrics` and runtime changes on a listener
//! of its own. [`Balancer`] ties them together; [`workers`] runs a thread
//! per core.

pub mod admin;
pub mod balance;
pub mod check;
pub mod cli;
pub mod error;
pub mod headers;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod shards;
pub mod table;
pub mod upstream;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use spike_config::{BalancerConfig, Source};
use spike_http1::server::{Rejections, Server};
use spike_http1::task;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, Guard};
use crate::balance::Router;
use crate::headers::ClientAddr;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyHandler};
use crate::registry::Registry;
use crate::reload::{Control, Triggers};
use crate::table::Routing;

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
        let metrics = Arc::new(Metrics::new());
        let rejections = Arc::new(Rejections::with_hook({
            let metrics = Arc::clone(&metrics);
            move |reason| metrics.rejected(reason)
        }));
        let registry = Registry::new(Arc::clone(&metrics));
        let router = Arc::new(Router::new(
            Routing::from(&config),
            registry,
            Some(shutdown.clone()),
        ));
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
        let admin_token = config.admin_token.clone();
        if admin_token.is_none() && !config.admin.ip().is_loopback() {
            tracing::warn!(
                admin = %config.admin,
                "the admin address is reachable from other machines and no admin_token is set: \
                 anyone who reaches it can change the weights"
            );
        }
        let rejections_for_admin = Arc::clone(&rejections);
        let control = Arc::new(Control::new(
            Arc::clone(&router),
            source.path().to_owned(),
            config,
            source.text().to_owned(),
        ));
        let mut first = Some(triggers);
        let path = source.path().to_owned();
        task::supervise("configuration watch", shutdown.clone(), {
            let (control, shutdown) = (Arc::clone(&control), shutdown.clone());
            move || {
                let (control, shutdown) = (Arc::clone(&control), shutdown.clone());
                // Watched anew if the task is started again.
                let triggers = first.take().map_or_else(|| Triggers::new(&path), Ok);
                async move {
                    match triggers {
                        Ok(triggers) => reload::watch(control, triggers, shutdown).await,
                        Err(err) => tracing::error!(error = %err, "cannot watch the configuration"),
                    }
                }
            }
        });
        task::supervise("tidy", shutdown.clone(), {
            let (router, shutdown) = (Arc::clone(&router), shutdown);
            move || tidy(Arc::clone(&router), shutdown.clone())
        });
        Ok(Self {
            proxy: Arc::new(Proxy::new(router, rejections, access_log)),
            admin: Arc::new(Admin::new(
                control,
                Arc::clone(proxy_server.connections()),
                rejections_for_admin,
                Guard::new(admin_token),
            )),
            proxy_server,
            admin_server,
        })
    }

    /// Serves the proxy on `listener` until shutdown, then lets requests in
    /// flight finish. Each worker runs one.
    pub async fn serve_proxy(&self, listener: TcpListener) {
        let proxy = Arc::clone(&self.proxy);
        self.proxy_server
            .serve(listener, move |client| ProxyHandler {
                proxy: Arc::clone(&proxy),
                client: ClientAddr::new(client),
            })
            .await;
    }

    /// Serves `/stats`, `/metrics` and runtime changes on `listener` until
    /// shutdown.
    pub async fn serve_admin(&self, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            self.admin.bound(addr);
        }
        let admin = Arc::clone(&self.admin);
        self.admin_server
            .serve(listener, move |_| Arc::clone(&admin))
            .await;
    }
}

/// Until `shutdown`, closes pooled connections idle for longer than the idle
/// timeout, twice per period, and forgets the rate-limit buckets of clients
/// gone quiet.
async fn tidy(router: Arc<Router>, shutdown: CancellationToken) {
    loop {
        let idle_timeout = router.current().pool.idle_timeout;
        tokio::select! {
            _ = tokio::time::sleep((idle_timeout / 2).max(Duration::from_millis(100))) => {}
            _ = shutdown.cancelled() => return,
        }
        let table = router.table();
        for peer in &table.peers {
            peer.upstream.pool.evict_expired(table.pool.idle_timeout);
        }
        if let Some(limit) = &table.rate_limit {
            limit.forget_idle();
        }
    }
}
