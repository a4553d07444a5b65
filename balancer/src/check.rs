//! Active checks: a task per upstream that probes it with `GET path` every
//! `interval`, through the same HTTP/1.1 client as the traffic it stands
//! for (`spike_http1::client`): an upstream that answers its probes answers
//! proxied requests too. What a probe's result means is
//! [`crate::health`]'s to say; this module only runs the probes.
//!
//! A checker reads its upstream's settings from the routing table in
//! force, so a reload changes them with everything else. It holds its
//! upstream weakly, and stops once the upstream is dropped; while an
//! upstream is out of the table in force (removed, with requests still on
//! it), it is not probed.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HOST, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Empty};
use spike_config::health::{DEFAULT_INTERVAL, HealthSettings};
use spike_http1::client::{Connection, ExchangeError, SendError};
use spike_http1::message::Request;
use spike_http1::task;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::health::{Transition, now_ms};
use crate::table::Table;
use crate::upstream::Upstream;

/// The `User-Agent` of a probe.
pub const USER_AGENT_VALUE: &str = "spike-balancer health check";

/// Starts the checks of each new upstream.
#[derive(Debug, Clone)]
pub struct Checker {
    /// The routing table in force, where each upstream's checks are set.
    tables: Arc<ArcSwap<Table>>,
    /// Told when a new table is in force: the checks take its settings at
    /// once, not after the interval of the old ones.
    changes: Arc<watch::Sender<()>>,
    shutdown: CancellationToken,
}

impl Checker {
    pub fn new(tables: Arc<ArcSwap<Table>>, shutdown: CancellationToken) -> Self {
        Self {
            tables,
            changes: Arc::new(watch::Sender::new(())),
            shutdown,
        }
    }

    /// A new routing table is in force.
    pub fn reconfigured(&self) {
        self.changes.send_replace(());
    }

    /// Starts probing `upstream` until it is dropped or shutdown; a check
    /// task that fails is logged and started again.
    pub fn watch(&self, upstream: &Arc<Upstream>) {
        let (upstream, tables, changes, shutdown) = (
            Arc::downgrade(upstream),
            Arc::clone(&self.tables),
            Arc::clone(&self.changes),
            self.shutdown.clone(),
        );
        task::supervise("health check", self.shutdown.clone(), move || {
            check_loop(
                upstream.clone(),
                Arc::clone(&tables),
                changes.subscribe(),
                shutdown.clone(),
            )
        });
    }
}

/// Probes `upstream` on its interval until it is dropped or `shutdown`;
/// at once when a new table changes its settings.
async fn check_loop(
    upstream: Weak<Upstream>,
    tables: Arc<ArcSwap<Table>>,
    mut changes: watch::Receiver<()>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(current) = upstream.upgrade() else {
            return;
        };
        changes.borrow_and_update();
        let settings = {
            let table = tables.load();
            table
                .peer(current.addr())
                .map(|peer| Arc::clone(&peer.health))
        };
        let interval = match settings {
            Some(settings) => {
                if settings.enabled {
                    let started = std::time::Instant::now();
                    let result = probe(current.addr(), &settings).await;
                    let now = now_ms();
                    current
                        .health
                        .note_probe(result.is_ok(), started.elapsed(), now);
                    let transition = current.health.record_probe(result, &settings, now);
                    if let Some(transition) = transition {
                        log_transition(&current, transition);
                    }
                } else {
                    current.health.assume_up(now_ms());
                }
                current.refresh_metrics(&settings);
                settings.interval
            }
            None => DEFAULT_INTERVAL,
        };
        drop(current);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

fn log_transition(upstream: &Upstream, transition: Transition) {
    let addr = upstream.addr();
    match transition {
        Transition::WentUp => tracing::info!(upstream = %addr, "upstream is up"),
        Transition::Recovered => tracing::info!(
            upstream = %addr,
            "upstream passed its checks since its last failure; its rest is over"
        ),
        Transition::WentDown => tracing::warn!(
            upstream = %addr,
            error = upstream.health.checks().last_error.as_deref().unwrap_or("-"),
            "upstream is down"
        ),
    }
}

/// One active check: `GET path` on a new connection, its whole response
/// read, within the timeout; a status outside 2xx fails it.
pub async fn probe(addr: SocketAddr, settings: &HealthSettings) -> Result<(), String> {
    let path = PathAndQuery::try_from(settings.path.as_str())
        .map_err(|err| format!("the path cannot be sent: {err}"))?;
    let mut request = Request::new(Method::GET, Uri::from(path), Empty::<Bytes>::new());
    let headers = request.headers_mut();
    if let Ok(host) = HeaderValue::try_from(addr.to_string()) {
        headers.insert(HOST, host);
    }
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    let attempt = async {
        let connection = Connection::connect(addr, settings.timeout)
            .await
            .map_err(|err| err.to_string())?;
        let response = connection
            .send(Box::new(request), settings.timeout)
            .await
            .map_err(|err| match err {
                SendError::NotSent(_, ExchangeError::TimedOut)
                | SendError::Failed(ExchangeError::TimedOut) => timed_out(settings),
                SendError::NotSent(_, err) | SendError::Failed(err) => format!("request: {err}"),
            })?;
        let status = response.status();
        response
            .into_body()
            .collect()
            .await
            .map_err(|err| format!("response: {err}"))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    };
    match tokio::time::timeout(settings.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(settings)),
    }
}

fn timed_out(settings: &HealthSettings) -> String {
    format!("timed out after {:?}", settings.timeout)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spike_config::balancer::{ProxySettings, RateLimitSettings, UpstreamConfig};
    use spike_http1::server::{FnHandler, Rejections, Server};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::health::State;
    use crate::metrics::Metrics;
    use crate::registry::Registry;
    use crate::table::Routing;

    /// A table of one upstream at `addr` with these checks.
    fn table(registry: &Registry, addr: SocketAddr, health: HealthSettings) -> Table {
        let upstreams = [UpstreamConfig {
            addr,
            weight: 1,
            backup: false,
            health,
        }];
        let (proxy, rate_limit) = (ProxySettings::default(), RateLimitSettings::default());
        let routing = Routing {
            upstreams: &upstreams,
            proxy: &proxy,
            rate_limit: &rate_limit,
        };
        Table::build(routing, None, registry, |_| State::Up).0
    }

    /// One upstream under a checker, and what a test changes of it.
    struct Watched {
        upstream: Arc<Upstream>,
        registry: Registry,
        tables: Arc<ArcSwap<Table>>,
        checker: Checker,
        shutdown: CancellationToken,
    }

    /// A table of one upstream at `addr` with these checks, and a checker
    /// watching it.
    fn checked(addr: SocketAddr, health: HealthSettings) -> Watched {
        let registry = Registry::new(Arc::new(Metrics::new()));
        let table = table(&registry, addr, health);
        let upstream = Arc::clone(&table.peers[0].upstream);
        let shutdown = CancellationToken::new();
        let tables = Arc::new(ArcSwap::from_pointee(table));
        let checker = Checker::new(Arc::clone(&tables), shutdown.clone());
        checker.watch(&upstream);
        Watched {
            upstream,
            registry,
            tables,
            checker,
            shutdown,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_table_s_checks_apply_at_once_not_after_the_old_interval() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let slow = HealthSettings {
            interval: Duration::from_secs(3600),
            fall: 1,
            ..HealthSettings::default()
        };
        let Watched {
            upstream,
            registry,
            tables,
            checker,
            shutdown,
        } = checked(addr, slow);
        // The first probe finds nothing listening.
        while upstream.health.state() != State::Down {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Checks turned off: the upstream is up at once, not in an hour.
        let off = HealthSettings {
            enabled: false,
            ..HealthSettings::default()
        };
        tables.store(Arc::new(table(&registry, addr, off)));
        checker.reconfigured();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(upstream.health.state(), State::Up);
        shutdown.cancel();
    }

    /// The node's kind of server, answering 200 to everything.
    fn serve_ok(listener: tokio::net::TcpListener) -> CancellationToken {
        let shutdown = CancellationToken::new();
        let server = Server::new(
            Default::default(),
            Arc::new(Rejections::default()),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            server
                .serve(listener, |_| {
                    FnHandler(|_| async {
                        spike_http1::reply::json(http::StatusCode::OK, Bytes::from_static(b"{}\n"))
                    })
                })
                .await;
        });
        shutdown
    }

    #[tokio::test(start_paused = true)]
    async fn the_checker_probes_on_its_interval_down_after_fall_up_after_rise() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let health = HealthSettings {
            interval: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            ..HealthSettings::default()
        };
        let Watched {
            upstream, shutdown, ..
        } = checked(addr, health);

        // Probes at 0s, 1s and 2s find nothing listening.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(upstream.health.state(), State::Up);
        assert_eq!(upstream.health.checks().failures, 2);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(upstream.health.state(), State::Down);
        let error = upstream.health.checks().last_error.unwrap();
        assert!(error.starts_with("connect"), "{error}");

        // A server appears; probes at 3s and 4s bring the upstream back.
        let server = serve_ok(tokio::net::TcpListener::bind(addr).await.unwrap());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(upstream.health.state(), State::Down);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(upstream.health.state(), State::Up);
        assert_eq!(upstream.health.checks().successes, 2);

        shutdown.cancel();
        server.cancel();
    }

    /// An upstream whose every answer is a head no HTTP client would take
    /// for a response, with a 200 status line in front.
    async fn garbled() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0; 1024];
                    let _ = stream.read(&mut request).await;
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_probe_fails_where_proxied_requests_would() {
        let settings = HealthSettings::default();
        let error = probe(garbled().await, &settings).await.unwrap_err();
        assert!(error.contains("transfer coding"), "{error}");
    }
}
