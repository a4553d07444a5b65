//! The admin listener, served on its own address and never on the proxy's:
//!
//! | request | reply |
//! |---|---|
//! | `GET /` (and `/status.js`, `/status.css`) | the status page ([`page`]) |
//! | `GET /stats` | JSON: the configuration's state, traffic, refusals, every upstream |
//! | `GET /metrics` | the same in the Prometheus (OpenMetrics) text format |
//! | `PUT /upstreams/IP:PORT/weight` with `{"weight": N}` | sets its weight |
//! | `POST /upstreams/IP:PORT/drain` | weight 0 while its requests in flight finish |
//! | `POST /upstreams/IP:PORT/restore` | back to its weight in the file |
//!
//! A change answers with the upstream's `/stats` entry. Who may ask what is
//! [`guard`]'s: a change only from the admin address's own page (or none)
//! and as JSON, and everything but the page and `/metrics` with the token
//! if one is set.

mod guard;
mod page;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use spike_http1::message::{Request, Response};
use spike_http1::reply::{self, Failure, ReplyBody};
use spike_http1::server::{ConnectionCounts, Handler, Rejection, Rejections, RequestBody};

pub use self::guard::Guard;
use crate::error::FailoverReason;
use crate::health::now_ms;
use crate::reload::{ChangeError, ConfigStatus, Control};
use crate::table::Peer;

/// The largest request body the admin reads (a weight change is a few
/// bytes).
const MAX_BODY: usize = 1024;

/// The admin interface shared by every admin connection.
#[derive(Debug)]
pub struct Admin {
    control: Arc<Control>,
    /// The proxy listener's client connections.
    connections: Arc<ConnectionCounts>,
    rejections: Arc<Rejections>,
    guard: Guard,
    started: Instant,
}

/// `/stats`.
#[derive(Debug, Serialize)]
pub struct BalancerStats {
    pub version: &'static str,
    pub uptime_seconds: f64,
    pub config: ConfigStatus,
    /// Requests routed to an upstream, over all of them.
    pub requests: u64,
    /// Client input refused by the proxy and the admin listeners, by reason.
    pub rejections: BTreeMap<&'static str, u64>,
    /// Attempts on another upstream after a request could not be sent.
    pub retries: u64,
    pub client_connections: ClientConnections,
    /// Requests sent to a resting upstream because none was available.
    pub picks_despite_rest: u64,
    pub upstreams: Vec<UpstreamReport>,
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
pub struct UpstreamReport {
    pub addr: SocketAddr,
    /// The weight in force.
    pub weight: u32,
    /// The weight the file gives it, and whether a runtime change
    /// overrides it.
    pub file_weight: u32,
    pub overridden: bool,
    pub backup: bool,
    /// `up`, `ramping`, `down` or `unknown`, from the active checks, or
    /// `resting` after failures of live traffic.
    pub state: &'static str,
    /// While it rests, the seconds until a request may try it again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rest_seconds_left: Option<f64>,
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
    /// The same, by reason.
    pub failovers_by_reason: BTreeMap<&'static str, u64>,
    /// The last active check, if any ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_check: Option<LastCheck>,
    pub in_flight: i64,
    /// Keep-alive connections to the upstream waiting in its pool.
    pub idle_connections: usize,
}

/// An upstream's last active check in `/stats`.
#[derive(Debug, Serialize)]
pub struct LastCheck {
    pub passed: bool,
    pub latency_ms: f64,
    pub seconds_ago: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightChange {
    weight: i64,
}

impl Admin {
    pub fn new(
        control: Arc<Control>,
        connections: Arc<ConnectionCounts>,
        rejections: Arc<Rejections>,
        guard: Guard,
    ) -> Self {
        Self {
            control,
            connections,
            rejections,
            guard,
            started: Instant::now(),
        }
    }

    /// Notes the address the admin listener was bound to: the origin of
    /// its own page.
    pub fn bound(&self, addr: SocketAddr) {
        self.guard.bound(addr);
    }

    pub async fn handle(&self, req: Request<RequestBody>) -> Response<ReplyBody> {
        let mut reply = self.route(req).await;
        reply.headers_mut().insert(
            http::header::X_CONTENT_TYPE_OPTIONS,
            http::HeaderValue::from_static("nosniff"),
        );
        reply
    }

    async fn route(&self, req: Request<RequestBody>) -> Response<ReplyBody> {
        if let Some(refused) = self.guard.foreign_host(req.headers()) {
            return refused;
        }
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        // What anyone may have: the page (it asks for the token itself),
        // and the metrics a scraper reads.
        if matches!(method, Method::GET | Method::HEAD) {
            if let Some(file) = page::file(&path) {
                return file;
            }
            if path == "/metrics" {
                return self.metrics();
            }
        }
        if let Some(refused) = self.guard.unauthorized(req.headers()) {
            return refused;
        }
        match (&method, path.as_str()) {
            (&Method::GET | &Method::HEAD, "/stats") => json(StatusCode::OK, &self.stats()),
            (_, "/stats" | "/metrics" | "/" | "/status.js" | "/status.css") => {
                reply::method_not_allowed("GET, HEAD")
            }
            (_, path) if path.starts_with("/upstreams/") => {
                if let Some(refused) = self.guard.refuse_change(&method, req.headers()) {
                    return refused;
                }
                self.change(req).await
            }
            _ => Failure::new(StatusCode::NOT_FOUND, "not_found").reply(),
        }
    }

    fn metrics(&self) -> Response<ReplyBody> {
        let router = self.control.router();
        for peer in &router.table().peers {
            peer.refresh_metrics();
        }
        let metrics = router.registry().metrics();
        metrics.set_client_connections(&self.connections);
        reply::typed(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode().into(),
        )
    }

    /// `/upstreams/IP:PORT/ACTION`.
    async fn change(&self, req: Request<RequestBody>) -> Response<ReplyBody> {
        let path = req.uri().path().trim_start_matches("/upstreams/");
        let Some((addr, action)) = path.rsplit_once('/') else {
            return Failure::new(StatusCode::NOT_FOUND, "not_found").reply();
        };
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return Failure::new(StatusCode::BAD_REQUEST, "bad_address")
                .detail(addr)
                .reply();
        };
        let (method, action) = (req.method().clone(), action.to_owned());
        let result = match (method, action.as_str()) {
            (Method::PUT, "weight") => match read_json::<WeightChange>(req).await {
                Ok(change) => self.control.set_weight(addr, change.weight),
                Err(detail) => {
                    return Failure::new(StatusCode::BAD_REQUEST, "bad_body")
                        .detail(&detail)
                        .reply();
                }
            },
            (Method::POST, "drain") => self.control.drain(addr),
            (Method::POST, "restore") => self.control.restore(addr),
            (_, "weight") => return reply::method_not_allowed("PUT"),
            (_, "drain" | "restore") => return reply::method_not_allowed("POST"),
            _ => return Failure::new(StatusCode::NOT_FOUND, "not_found").reply(),
        };
        match result {
            Ok(()) => {
                tracing::info!(upstream = %addr, action, "runtime change");
                let table = self.control.router().table();
                match table.peer(addr) {
                    Some(peer) => json(StatusCode::OK, &self.upstream_report(peer, now_ms())),
                    None => Failure::new(StatusCode::NOT_FOUND, "unknown_upstream").reply(),
                }
            }
            Err(err) => {
                let (status, code) = match err {
                    ChangeError::UnknownUpstream(_) => (StatusCode::NOT_FOUND, "unknown_upstream"),
                    ChangeError::BadWeight(_) => (StatusCode::BAD_REQUEST, "bad_weight"),
                };
                Failure::new(status, code).detail(&err.to_string()).reply()
            }
        }
    }

    pub fn stats(&self) -> BalancerStats {
        let router = self.control.router();
        let table = router.table();
        let now = now_ms();
        let metrics = router.registry().metrics();
        let upstreams: Vec<UpstreamReport> = table
            .peers
            .iter()
            .map(|peer| self.upstream_report(peer, now))
            .collect();
        BalancerStats {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            config: self.control.status(),
            requests: upstreams.iter().map(|u| u.requests).sum(),
            rejections: Rejection::ALL
                .into_iter()
                .map(|reason| (reason.as_str(), self.rejections.count(reason)))
                .collect(),
            retries: metrics.retries.get(),
            client_connections: ClientConnections {
                open: self.connections.open(),
                parked: self.connections.parked(),
            },
            picks_despite_rest: metrics.picks_despite_rest.get(),
            upstreams,
        }
    }

    fn upstream_report(&self, peer: &Peer, now: u64) -> UpstreamReport {
        let upstream = &peer.upstream;
        let (counters, health) = (&upstream.counters, &upstream.health);
        let settings = &peer.health;
        let checks = health.checks();
        let (file_weight, overridden) = self
            .control
            .file_weight(upstream.addr())
            .unwrap_or((peer.weight, false));
        UpstreamReport {
            addr: upstream.addr(),
            weight: peer.weight,
            file_weight,
            overridden,
            backup: peer.backup,
            state: health.state_name(settings, now),
            rest_seconds_left: health
                .rest_left(settings, now)
                .filter(|_| health.state_name(settings, now) == "resting")
                .map(|left| left as f64 / 1e3),
            healthy: health.available(settings, now),
            check_successes: checks.successes,
            check_failures: checks.failures,
            last_error: checks.last_error,
            seconds_since_state_change: now.saturating_sub(checks.changed_at) as f64 / 1e3,
            passive_fails: health.passive_fails(),
            requests: counters.requests.get(),
            failures: counters.failures.get(),
            failovers: counters.failovers_total(),
            failovers_by_reason: FailoverReason::ALL
                .into_iter()
                .zip(&counters.failovers)
                .map(|(reason, counter)| (reason.as_str(), counter.get()))
                .collect(),
            last_check: checks.last.map(|probe| LastCheck {
                passed: probe.passed,
                latency_ms: probe.latency_ms,
                seconds_ago: now.saturating_sub(probe.at) as f64 / 1e3,
            }),
            in_flight: counters.in_flight.get(),
            idle_connections: upstream.pool.idle_count(),
        }
    }
}

impl Handler for Admin {
    type Body = ReplyBody;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<ReplyBody>> + Send {
        self.handle(req)
    }
}

/// Reads a small JSON body.
async fn read_json<T>(req: Request<RequestBody>) -> Result<T, String>
where
    T: for<'de> Deserialize<'de>,
{
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|err| format!("cannot read the body: {err}"))?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|err| format!("expected {{\"weight\": N}}: {err}"))
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ReplyBody> {
    reply::json(status, reply::json_bytes(value))
}
