//! Forwarding one request to the upstream the router picks.
//!
//! Requests and responses stream through: bodies are handed on frame by
//! frame, never buffered whole. Each upstream has a pool of keep-alive
//! connections per worker thread ([`crate::pool`]). Whatever the client
//! spoke (HTTP/1.0 or 1.1), the upstream is spoken to in HTTP/1.1 with
//! keep-alive ([`crate::h1`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use http_body_util::{Either, Full};
use spike_config::server::Rejections;
use spike_config::server::body::BodyFailure;

use crate::balance::{Peer, Router};
use crate::body::{RequestBody, UpstreamBody};
use crate::error::ProxyError;
use crate::h1::{ExchangeError, SendError};
use crate::headers::{self, ClientAddr};
use crate::upstream::{FailoverReason, InFlight};

/// A reply to the client: an upstream's streamed response, or the proxy's
/// own short reply.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// The reverse proxy shared by every client connection.
#[derive(Debug)]
pub struct Proxy {
    router: Arc<Router>,
    rejections: Arc<Rejections>,
    /// Whether to write the access log's line for each request. Decided
    /// once: asking `tracing` per request (`enabled!`) would cost a callsite
    /// check and, with per-layer filters, leave a filter state behind that
    /// hides the thread's next event from the other layers.
    access_log: bool,
}

impl Proxy {
    pub fn new(router: Arc<Router>, rejections: Arc<Rejections>, access_log: bool) -> Self {
        Self {
            router,
            rejections,
            access_log,
        }
    }

    /// Proxies one request from `client`, answering with the upstream's
    /// response or with the failure's reply: it never fails (the `Result`
    /// is a service's). The future owns what it uses, so that it is the
    /// service's future itself, not one more future around it, moved whole.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        client: Arc<ClientAddr>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        // What the access log needs of the request, copied only when it is on.
        let logged = self.access_log.then(|| {
            (
                req.method().clone(),
                req.uri().path().to_owned(),
                std::time::Instant::now(),
            )
        });
        let (response, upstream) = match self.forward(req, &client).await {
            Ok((response, upstream)) => (response, Some(upstream)),
            Err(err) => {
                match err.rejection() {
                    Some(reason) => self.rejections.reject(reason, client.addr, &err),
                    None => tracing::debug!(client = %client.addr, error = %err, "proxy failure"),
                }
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
        Ok(response)
    }

    /// Sends the request to the picked upstream and, as long as it could
    /// not be sent there, to the next one picked without it, at most
    /// `retries` more times.
    async fn forward(
        &self,
        req: Request<RequestBody>,
        client: &ClientAddr,
    ) -> Result<(Response<ResponseBody>, SocketAddr), ProxyError> {
        // `[proxy]` and `[rate_limit]` of the configuration in force.
        let (response_timeout, retries, trusted) = {
            let table = self.router.current();
            let trusted_proxies = &table.proxy.trusted_proxies;
            if let Some(limit) = &table.rate_limit {
                let origin =
                    headers::original_client(req.headers(), client.addr.ip(), trusted_proxies);
                if let Err(wait) = limit.check(origin) {
                    return Err(ProxyError::RateLimited { retry_after: wait });
                }
            }
            let trusted = trusted_proxies
                .iter()
                .any(|net| net.contains(&client.addr.ip()));
            (table.proxy.response_timeout, table.proxy.retries, trusted)
        };
        let failure = req.body().failure();
        // Boxed once, here: it is handed down to the exchange and, if it
        // could not be sent, back, without being copied at each step.
        let mut req = Box::new(req);
        rewrite_for_upstream(&mut req, client, trusted);
        // A request without Host (HTTP/1.0) gets its upstream's address.
        let lacks_host = !req.headers().contains_key(HOST);
        let mut tried: Vec<SocketAddr> = Vec::new();
        loop {
            let Some((peer, in_flight)) = self.router.pick(&tried) else {
                return Err(ProxyError::NoUpstream);
            };
            let addr = peer.upstream.addr();
            if lacks_host {
                req.headers_mut().insert(HOST, peer.upstream.host().clone());
            }
            match self
                .attempt(&peer, in_flight, req, response_timeout, &failure)
                .await
            {
                Ok(response) => return Ok((response, addr)),
                Err(Attempt::Failed(error)) => return Err(error),
                Err(Attempt::NotSent {
                    request,
                    reason,
                    error,
                }) => {
                    tried.push(addr);
                    if !self.may_retry(tried.len(), retries) {
                        return Err(error);
                    }
                    peer.upstream.failed_over(reason, &error);
                    self.router.registry().metrics().retries.inc();
                    req = request;
                }
            }
        }
    }

    /// Whether a request that could not be sent to `tried` upstreams may try
    /// one more.
    fn may_retry(&self, tried: usize, retries: Option<u32>) -> bool {
        let others = self.router.current().peers.len().saturating_sub(1);
        tried <= retries.map_or(others, |n| n as usize)
    }

    /// One attempt on one upstream, counted in flight there.
    async fn attempt(
        &self,
        peer: &Peer,
        in_flight: InFlight,
        req: Box<Request<RequestBody>>,
        response_timeout: Duration,
        failure: &BodyFailure,
    ) -> Result<Response<ResponseBody>, Attempt> {
        let upstream = &peer.upstream;
        let addr = upstream.addr();
        let connection = match upstream.pool.checkout().await {
            Ok(connection) => connection,
            Err(source) => {
                // Nothing was sent: connecting failed.
                upstream.failed(peer.weight);
                return Err(Attempt::NotSent {
                    request: req,
                    reason: source.failover_reason(),
                    error: ProxyError::Connect {
                        upstream: addr,
                        source,
                    },
                });
            }
        };
        // Boxed: the exchange's state is most of a request's future, which is
        // moved, whole, each time a caller's future is built around it.
        let response = match Box::pin(connection.send(req, response_timeout)).await {
            Ok(response) => response,
            Err(SendError::NotSent(request, source)) => {
                // The connection was found closed before the request went
                // out.
                return Err(Attempt::NotSent {
                    request,
                    reason: FailoverReason::Closed,
                    error: ProxyError::Upstream {
                        upstream: addr,
                        source,
                    },
                });
            }
            Err(SendError::Failed(source)) => {
                // The client's body failing is the client's fault, not the
                // upstream's: the exchange is cancelled and the client told.
                if let Some(body) = failure.get() {
                    return Err(Attempt::Failed(ProxyError::ClientBody(body)));
                }
                upstream.failed(peer.weight);
                return Err(Attempt::Failed(match source {
                    ExchangeError::TimedOut => ProxyError::Timeout {
                        upstream: addr,
                        timeout: response_timeout,
                    },
                    source => ProxyError::Upstream {
                        upstream: addr,
                        source,
                    },
                }));
            }
        };
        if response.status().is_server_error() {
            upstream.failed(peer.weight);
        } else {
            upstream.succeeded();
        }
        let (mut parts, body) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        headers::add_via(&mut parts.headers, parts.version);
        let body = UpstreamBody::new(body, in_flight);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

/// How an attempt on one upstream failed.
#[derive(Debug)]
enum Attempt {
    /// Nothing reached the upstream: the request, handed back, may go to
    /// another.
    NotSent {
        request: Box<Request<RequestBody>>,
        reason: FailoverReason,
        error: ProxyError,
    },
    /// The request may have reached the upstream: it is never sent again.
    Failed(ProxyError),
}

/// Makes the request what the upstream gets: the same method, path, headers
/// and body, in HTTP/1.1 and origin form, without hop-by-hop headers, with
/// `Via` and the `X-Forwarded-*` headers added (kept and appended to if the
/// client is a `trusted` proxy, replaced if not).
fn rewrite_for_upstream(req: &mut Request<RequestBody>, client: &ClientAddr, trusted: bool) {
    let received = req.version();
    // A request in absolute form (`GET http://host/path`) keeps only its path.
    if req.uri().scheme().is_some() {
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
    }
    *req.version_mut() = Version::HTTP_11;
    let headers = req.headers_mut();
    headers::strip_hop_by_hop(headers);
    headers::forwarded(headers, client, trusted);
    headers::add_via(headers, received);
}
