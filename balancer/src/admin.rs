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

/// The admin interface shared by every admin connection.
#[derive(Debug)]
pub struct Admin {
    router: Arc<Router>,
}

/// `/stats`.
#[derive(Debug, Serialize)]
pub struct Stats {
    pub upstreams: Vec<UpstreamStats>,
}

/// One upstream in `/stats`, in the order of the routing table.
#[derive(Debug, Serialize)]
pub struct UpstreamStats {
    pub addr: SocketAddr,
    pub weight: u32,
    pub healthy: bool,
    pub requests: u64,
    pub failures: u64,
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
            (&Method::GET | &Method::HEAD, "/metrics") => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.router.registry().metrics().encode().into(),
            ),
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
        let upstreams = table
            .peers
            .iter()
            .map(|peer| {
                let stats = &peer.upstream.stats;
                UpstreamStats {
                    addr: peer.upstream.addr(),
                    weight: peer.weight,
                    healthy: true,
                    requests: stats.requests.get(),
                    failures: stats.failures.get(),
                    in_flight: stats.in_flight.get(),
                    idle_connections: peer.upstream.pool.idle_count(),
                }
            })
            .collect();
        Stats { upstreams }
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
