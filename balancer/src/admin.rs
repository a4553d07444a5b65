//! The admin listener, served on its own address and never on the proxy's:
//!
//! | request | reply |
//! |---|---|
//! | `GET /stats` | JSON: the configuration's state, retries, every upstream |
//! | `GET /metrics` | the same in the Prometheus (OpenMetrics) text format |
//! | `PUT /upstreams/IP:PORT/weight` with `{"weight": N}` | sets its weight |
//! | `POST /upstreams/IP:PORT/drain` | weight 0 while its requests in flight finish |
//! | `POST /upstreams/IP:PORT/restore` | back to its weight in the file |
//!
//! A change answers with the upstream's `/stats` entry.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use serde::{Deserialize, Serialize};

use spike_config::server::ConnectionCounts;

use crate::balance::Peer;
use crate::health::now_ms;
use crate::reload::{ChangeError, ConfigStatus, Control};

/// The largest request body the admin reads (a weight change is a few
/// bytes).
const MAX_BODY: usize = 1024;

/// The admin interface shared by every admin connection.
#[derive(Debug)]
pub struct Admin {
    control: Arc<Control>,
    /// The proxy listener's client connections.
    connections: Arc<ConnectionCounts>,
}

/// `/stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub config: ConfigStatus,
    /// Attempts on another upstream after a request could not be sent.
    pub retries: u64,
    pub client_connections: ClientConnections,
    pub upstreams: Vec<UpstreamStats>,
}

/// The proxy listener's client connections in `/stats`.
#[derive(Debug, Serialize)]
pub struct ClientConnections {
    pub open: u64,
    /// Idle ones whose HTTP state is freed until their next request.
    pub parked: u64,
}

/// One upstream in `/stats`, in the order of the routing table.
#[derive(Debug, Serialize)]
pub struct UpstreamStats {
    pub addr: SocketAddr,
    /// The weight in force.
    pub weight: u32,
    /// The weight the file gives it, and whether a runtime change
    /// overrides it.
    pub file_weight: u32,
    pub overridden: bool,
    pub backup: bool,
    /// `up`, `ramping`, `down` or `unknown`, from the active checks.
    pub state: &'static str,
    /// Whether the round-robin may pick it now (up and not resting after
    /// failures of live traffic).
    pub healthy: bool,
    /// Consecutive good and failed active checks (one of them is 0).
    pub check_successes: u32,
    pub check_failures: u32,
    pub last_error: Option<String>,
    pub seconds_since_state_change: f64,
    /// Failures of live traffic counted against it (nginx's `fails`).
    pub passive_fails: u32,
    pub requests: u64,
    pub failures: u64,
    /// Requests that could not be sent to it and went to another upstream.
    pub failovers: u64,
    pub in_flight: i64,
    /// Keep-alive connections to the upstream waiting in its pool.
    pub idle_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightChange {
    weight: i64,
}

impl Admin {
    pub fn new(control: Arc<Control>, connections: Arc<ConnectionCounts>) -> Self {
        Self {
            control,
            connections,
        }
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
    where
        B: Body,
        B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let reply = match (req.method(), path.as_str()) {
            (&Method::GET | &Method::HEAD, "/stats") => json(StatusCode::OK, &self.stats()),
            (&Method::GET | &Method::HEAD, "/metrics") => self.metrics(),
            (_, "/stats" | "/metrics") => method_not_allowed("GET, HEAD"),
            (_, path) if path.starts_with("/upstreams/") => self.change(req).await,
            _ => error(StatusCode::NOT_FOUND, "not_found", None),
        };
        Ok(reply)
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let router = self.control.router();
        for peer in &router.table().peers {
            peer.upstream.refresh_metrics();
        }
        let metrics = router.registry().metrics();
        metrics.set_client_connections(&self.connections);
        reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode().into(),
        )
    }

    /// `/upstreams/IP:PORT/ACTION`.
    async fn change<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body,
        B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().trim_start_matches("/upstreams/");
        let Some((addr, action)) = path.rsplit_once('/') else {
            return error(StatusCode::NOT_FOUND, "not_found", None);
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return error(StatusCode::BAD_REQUEST, "bad_address", Some(addr));
        };
        let (method, action) = (req.method().clone(), action.to_owned());
        let result = match (method, action.as_str()) {
            (Method::PUT, "weight") => match read_json::<WeightChange, B>(req).await {
                Ok(change) => self.control.set_weight(addr, change.weight),
                Err(detail) => return error(StatusCode::BAD_REQUEST, "bad_body", Some(&detail)),
            },
            (Method::POST, "drain") => self.control.drain(addr),
            (Method::POST, "restore") => self.control.restore(addr),
            (_, "weight") => return method_not_allowed("PUT"),
            (_, "drain" | "restore") => return method_not_allowed("POST"),
            _ => return error(StatusCode::NOT_FOUND, "not_found", None),
        };
        match result {
            Ok(()) => {
                tracing::info!(upstream = %addr, action, "runtime change");
                let table = self.control.router().table();
                match table.peer(addr) {
                    Some(peer) => json(StatusCode::OK, &self.upstream_stats(peer, now_ms())),
                    None => error(StatusCode::NOT_FOUND, "unknown_upstream", None),
                }
            }
            Err(err @ ChangeError::UnknownUpstream(_)) => error(
                StatusCode::NOT_FOUND,
                "unknown_upstream",
                Some(&err.to_string()),
            ),
            Err(err @ ChangeError::BadWeight(_)) => error(
                StatusCode::BAD_REQUEST,
                "bad_weight",
                Some(&err.to_string()),
            ),
        }
    }

    pub fn stats(&self) -> Stats {
        let router = self.control.router();
        let table = router.table();
        let now = now_ms();
        Stats {
            config: self.control.status(),
            retries: router.registry().metrics().retries.get(),
            client_connections: ClientConnections {
                open: self.connections.open(),
                parked: self.connections.parked(),
            },
            upstreams: table
                .peers
                .iter()
                .map(|peer| self.upstream_stats(peer, now))
                .collect(),
        }
    }

    fn upstream_stats(&self, peer: &Peer, now: u64) -> UpstreamStats {
        let upstream = &peer.upstream;
        let (stats, health) = (&upstream.stats, &upstream.health);
        let settings = upstream.health_settings();
        let checks = health.checks();
        let (file_weight, overridden) = self
            .control
            .file_weight(upstream.addr())
            .unwrap_or((peer.weight, false));
        UpstreamStats {
            addr: upstream.addr(),
            weight: peer.weight,
            file_weight,
            overridden,
            backup: peer.backup,
            state: upstream.state_name(&settings, now),
            healthy: health.available(&settings, now),
            check_successes: checks.successes,
            check_failures: checks.failures,
            last_error: checks.last_error,
            seconds_since_state_change: now.saturating_sub(checks.changed_at) as f64 / 1e3,
            passive_fails: health.passive_fails(),
            requests: stats.requests.get(),
            failures: stats.failures.get(),
            failovers: stats.failovers_total(),
            in_flight: stats.in_flight.get(),
            idle_connections: upstream.pool.idle_count(),
        }
    }
}

/// Reads a small JSON body.
async fn read_json<T, B>(req: Request<B>) -> Result<T, String>
where
    T: for<'de> Deserialize<'de>,
    B: Body,
    B::Error: std::fmt::Display + Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|err| format!("cannot read the body: {err}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|err| format!("expected {{\"weight\": N}}: {err}"))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(value).expect("admin replies serialize");
    body.push(b'\n');
    reply(status, "application/json", body.into())
}

fn error(status: StatusCode, code: &str, detail: Option<&str>) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({ "error": code, "detail": detail }),
    )
}

fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut reply = error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None);
    reply
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    reply
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}
