//! Forwarding one request to the upstream the router picks.
//!
//! Requests and responses stream through: bodies are handed on frame by
//! frame, never buffered whole. Each upstream has a pool of keep-alive
//! connections shared by every thread ([`crate::pool`]). Whatever the client
//! spoke (HTTP/1.0 or 1.1), the upstream is spoken to in HTTP/1.1 with
//! keep-alive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::balance::Router;
use crate::body::{RequestBody, UpstreamBody};
use crate::error::ProxyError;
use crate::headers::{self, ClientAddr};
use crate::upstream::Upstream;

/// A reply to the client: an upstream's streamed response, or the proxy's
/// own short reply.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// The reverse proxy shared by every client connection.
#[derive(Debug)]
pub struct Proxy {
    router: Arc<Router>,
    response_timeout: Duration,
}

impl Proxy {
    pub fn new(router: Arc<Router>, response_timeout: Duration) -> Self {
        Self {
            router,
            response_timeout,
        }
    }

    /// Proxies one request from `client`, answering with the upstream's
    /// response or with the failure's reply.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: &ClientAddr,
    ) -> Response<ResponseBody> {
        // What the access log needs of the request, copied only when it is on.
        let logged = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| {
            (
                req.method().clone(),
                req.uri().path().to_owned(),
                std::time::Instant::now(),
            )
        });
        let (response, upstream) = match self.forward(req, client).await {
            Ok((response, upstream)) => (response, Some(upstream)),
            Err(err) => {
                tracing::debug!(client = %client.addr, error = %err, "proxy failure");
                let upstream = err.upstream();
                (err.response().map(Either::Right), upstream)
            }
        };
        if let Some((method, path, started)) = logged {
            let upstream = upstream.map_or_else(|| "-".to_owned(), |addr| addr.to_string());
            tracing::info!(
                target: "access",
                client = %client.addr,
                %method,
                path,
                status = response.status().as_u16(),
                %upstream,
                duration_ms = started.elapsed().as_secs_f64() * 1e3,
            );
        }
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        client: &ClientAddr,
    ) -> Result<(Response<ResponseBody>, SocketAddr), ProxyError> {
        let upstream = self.router.pick().ok_or(ProxyError::NoUpstream)?;
        let addr = upstream.addr();
        let in_flight = upstream.start_request();
        let mut connection = match upstream.pool.checkout().await {
            Ok(sender) => sender,
            Err(source) => {
                upstream.stats.failures.inc();
                return Err(ProxyError::Connect {
                    upstream: addr,
                    source,
                });
            }
        };
        let req = upstream_request(req, &upstream, client);
        let sent = tokio::time::timeout(self.response_timeout, connection.send_request(req)).await;
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(source)) => {
                upstream.stats.failures.inc();
                return Err(ProxyError::Upstream {
                    upstream: addr,
                    source,
                });
            }
            Err(_) => {
                upstream.stats.failures.inc();
                return Err(ProxyError::Timeout {
                    upstream: addr,
                    timeout: self.response_timeout,
                });
            }
        };
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::add_via(&mut parts.headers, parts.version);
        let body = UpstreamBody::new(body, connection, in_flight);
        Ok((Response::from_parts(parts, Either::Left(body)), addr))
    }
}

/// The request as the upstream gets it: the same method, path, headers and
/// body, in HTTP/1.1 and origin form, without hop-by-hop headers, with `Via`
/// and `X-Forwarded-For` added, and a `Host` if the client sent none.
fn upstream_request(
    req: Request<Incoming>,
    upstream: &Upstream,
    client: &ClientAddr,
) -> Request<RequestBody> {
    let (mut parts, body) = req.into_parts();
    let received = parts.version;
    // A request in absolute form (`GET http://host/path`) keeps only its path.
    if parts.uri.scheme().is_some() {
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(path);
    }
    parts.version = Version::HTTP_11;
    headers::strip_hop_by_hop(&mut parts.headers);
    headers::append_forwarded_for(&mut parts.headers, client);
    headers::add_via(&mut parts.headers, received);
    parts
        .headers
        .entry(HOST)
        .or_insert_with(|| upstream.host().clone());
    Request::from_parts(parts, body)
}
