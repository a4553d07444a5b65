//! The admin listener: `/stats` (JSON) and `/metrics` (Prometheus). It is
//! served on its own address and never on the proxy's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;

use crate::balance::Router;
use crate::health::now_ms;

/// The admin interface shared by every admin connection.
#[derive(Debug)]
pub struct Admin {
    router: Arc<Router>,
}

/// `/stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    /// Attempts on another upstream after a request could not be sent.
    pub retries: u64,
    pub upstreams: Vec<UpstreamStats>,
}

/// One upstream in `/stats`, in the order of the routing table.
#[derive(Debug, Serialize)]
pub struct UpstreamStats {
    pub addr: SocketAddr,
    pub weight: u32,
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

impl Admin {
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        let reply = match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/stats") => {
                let body = serde_json::to_vec(&self.stats()).expect("stats serialize");
                reply(StatusCode::OK, "application/json", body.into())
            }
            (&Method::GET | &Method::HEAD, "/metrics") => {
                for peer in &self.router.table().peers {
                    peer.upstream.refresh_metrics();
                }
                reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.router.registry().metrics().encode().into(),
                )
            }
            (_, "/stats" | "/metrics") => {
                let mut reply = reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "application/json",
                    Bytes::from_static(b"{\"error\":\"method_not_allowed\"}\n"),
                );
                reply
                    .headers_mut()
                    .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
                reply
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                Bytes::from_static(b"{\"error\":\"not_found\"}\n"),
            ),
        };
        Ok(reply)
    }

    pub fn stats(&self) -> Stats {
        let table = self.router.table();
        let now = now_ms();
        let upstreams = table
            .peers
            .iter()
            .map(|peer| {
                let upstream = &peer.upstream;
                let (stats, health) = (&upstream.stats, &upstream.health);
                let settings = upstream.health_settings();
                let checks = health.checks();
                UpstreamStats {
                    addr: upstream.addr(),
                    weight: peer.weight,
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
            })
            .collect();
        Stats {
            retries: self.router.registry().metrics().retries.get(),
            upstreams,
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut reply = Response::new(Full::new(body));
    *reply.status_mut() = status;
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}
