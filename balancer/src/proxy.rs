//! Forwarding one request to the upstream the router picks, in the order it
//! runs: [`Proxy::handle`] (the rate limit, the rewrite of the request),
//! [`Proxy::forward`] (a pick, and another while the request could not be
//! sent), [`Proxy::attempt`] (a pooled connection, the exchange, the
//! accounting of its outcome), then the response streamed back through a
//! [`ProxiedBody`].
//!
//! Requests and responses stream through: bodies are handed on frame by
//! frame, never buffered whole. Each upstream has a pool of keep-alive
//! connections per worker thread ([`crate::pool`]). Whatever the client
//! spoke (HTTP/1.0 or 1.1), the upstream is spoken to in HTTP/1.1 with
//! keep-alive (`spike_http1::client`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use spike_http1::client::{ConnectError, ExchangeError, Pipeline, SendError, UpstreamBody};
use spike_http1::fields::Known;
use spike_http1::message::{Request, Response};
use spike_http1::reply::ReplyBody;
use spike_http1::server::{BodyFailure, Handler, Rejections, RequestBody};

use crate::balance::Router;
use crate::error::{FailoverReason, ProxyError, UpstreamFailure};
use crate::headers::{self, ClientAddr};
use crate::pool::PoolSettings;
use crate::upstream::{InFlight, Upstream};

/// A reply to the client: an upstream's streamed response, or the proxy's
/// own short reply. The upstream's body is boxed: a response is moved
/// several times on its way out of the proxy's future, and its body (the
/// upstream connection and its buffers) is most of its size.
pub type ProxyReply = Either<Box<ProxiedBody>, ReplyBody>;

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

/// The proxy as one client connection's handler: the proxy, and the
/// client's address.
#[derive(Debug)]
pub struct ProxyHandler {
    pub proxy: Arc<Proxy>,
    pub client: ClientAddr,
}

impl Handler for ProxyHandler {
    type Body = ProxyReply;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<ProxyReply>> + Send {
        self.proxy.handle(req, &self.client)
    }
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
    /// response or with the failure's reply.
    ///
    /// An async block, not an async fn, here and below: an async fn keeps
    /// its arguments twice in its state, and the more of its state a
    /// request touches, the more it finds gone from the CPU's caches when a
    /// thousand connections take turns (callgrind counts 69 L2 misses per
    /// request there, 80 with the async fns).
    #[expect(clippy::manual_async_fn, reason = "arguments kept once")]
    pub fn handle(
        &self,
        req: Request<RequestBody>,
        client: &ClientAddr,
    ) -> impl Future<Output = Response<ProxyReply>> + Send {
        async move {
            // What the access log needs of the request, copied only when it is on.
            let logged = self.access_log.then(|| {
                (
                    req.method().clone(),
                    req.uri().path().to_owned(),
                    std::time::Instant::now(),
                )
            });
            let (response, upstream) = match self.forward(req, client).await {
                Ok((response, upstream)) => (response, Some(upstream)),
                Err(err) => {
                    match err {
                        ProxyError::RateLimited { .. } => self.rejections.reject(
                            spike_http1::server::Rejection::RateLimited,
                            client.addr,
                            &err,
                        ),
                        // The body counted its own failure.
                        ProxyError::ClientBody(_) => {}
                        _ => tracing::debug!(client = %client.addr, error = %err, "proxy failure"),
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
            response
        }
    }

    /// Sends the request to the picked upstream and, as long as it could
    /// not be sent there, to the next one picked without it, at most
    /// `retries` more times.
    #[expect(clippy::manual_async_fn, reason = "arguments kept once")]
    fn forward(
        &self,
        req: Request<RequestBody>,
        client: &ClientAddr,
    ) -> impl Future<Output = Result<(Response<ProxyReply>, SocketAddr), ProxyError>> + Send {
        async move {
            // `[proxy]` and `[rate_limit]` of the configuration in force.
            let (response_timeout, retries, trusted, pool) = {
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
                (
                    table.proxy.response_timeout,
                    table.proxy.retries,
                    trusted,
                    table.pool,
                )
            };
            let failure = req.body().failure();
            // Boxed once, here: it is handed down to the exchange and, if it
            // could not be sent, back, without being copied at each step.
            let mut req = Box::new(req);
            rewrite_for_upstream(&mut req, client, trusted);
            // A request without Host (HTTP/1.0) gets its upstream's address.
            let lacks_host = !req.headers().contains_key(Known::HOST);
            let mut tried: Vec<SocketAddr> = Vec::new();
            loop {
                let Some(in_flight) = self.router.pick(&tried) else {
                    return Err(ProxyError::NoUpstream);
                };
                let addr = in_flight.upstream().addr();
                if lacks_host {
                    req.headers_mut()
                        .insert(HOST, in_flight.upstream().host().clone());
                }
                let exchange = Exchange {
                    in_flight,
                    pool: &pool,
                    response_timeout,
                    failure: &failure,
                };
                match exchange.attempt(req).await {
                    Ok(response) => return Ok((response, addr)),
                    Err(Attempt::Failed(error)) => return Err(error),
                    Err(Attempt::NotSent {
                        request,
                        upstream,
                        reason,
                        error,
                    }) => {
                        tried.push(addr);
                        if !self.may_retry(tried.len(), retries) {
                            return Err(error);
                        }
                        upstream.failed_over(reason, &error);
                        self.router.registry().metrics().retries.inc();
                        req = request;
                    }
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
}

/// One attempt on one upstream, counted in flight there.
struct Exchange<'a> {
    in_flight: InFlight,
    pool: &'a PoolSettings,
    response_timeout: Duration,
    /// The client's body's failure, if it fails: the client's fault, not
    /// the upstream's.
    failure: &'a BodyFailure,
}

impl Exchange<'_> {
    #[expect(clippy::manual_async_fn, reason = "arguments kept once")]
    fn attempt(
        self,
        req: Box<Request<RequestBody>>,
    ) -> impl Future<Output = Result<Response<ProxyReply>, Attempt>> + Send {
        async move {
            let peer = self.in_flight.peer();
            let upstream = &peer.upstream;
            let addr = upstream.addr();
            let now = self.in_flight.started();
            let pipelined = self.pool.pipeline_depth > 1 && Pipeline::takes(&req);
            let sent = if pipelined {
                match upstream.pool.pipeline(self.pool, now).await {
                    // Boxed: the exchange's state is most of a request's
                    // future, which is moved, whole, each time a caller's
                    // future is built around it.
                    Ok(pipeline) => Box::pin(pipeline.send(req, self.response_timeout)).await,
                    Err(source) => return Err(self.not_connected(req, source)),
                }
            } else {
                match upstream.pool.checkout(self.pool, now).await {
                    Ok(connection) => Box::pin(connection.send(req, self.response_timeout)).await,
                    Err(source) => return Err(self.not_connected(req, source)),
                }
            };
            let mut response = match sent {
                Ok(response) => response,
                Err(SendError::NotSent(request, source)) => {
                    // The connection was found closed before the request went
                    // out.
                    return Err(Attempt::NotSent {
                        request,
                        upstream: Arc::clone(upstream),
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
                    if let Some(body) = self.failure.get() {
                        return Err(Attempt::Failed(ProxyError::ClientBody(body)));
                    }
                    let error = match source {
                        ExchangeError::TimedOut => ProxyError::Timeout {
                            upstream: addr,
                            timeout: self.response_timeout,
                        },
                        source => ProxyError::Upstream {
                            upstream: addr,
                            source,
                        },
                    };
                    self.count(&error);
                    return Err(Attempt::Failed(error));
                }
            };
            let status = response.status().as_u16();
            if UpstreamFailure::Status(status).counts(&peer.health.fail_on) {
                peer.failed(UpstreamFailure::Status(status));
            } else {
                upstream.succeeded();
            }
            let version = response.version();
            response.headers_mut().remove_hop_by_hop();
            headers::add_via(response.headers_mut(), version);
            let (in_flight, max_idle) = (self.in_flight, self.pool.max_idle);
            Ok(response
                .map(|body| Either::Left(Box::new(ProxiedBody::new(body, in_flight, max_idle)))))
        }
    }

    /// No connection could be had: nothing was sent.
    fn not_connected(&self, req: Box<Request<RequestBody>>, source: ConnectError) -> Attempt {
        let upstream = &self.in_flight.peer().upstream;
        let reason = FailoverReason::of_connect(&source);
        let error = ProxyError::Connect {
            upstream: upstream.addr(),
            source,
        };
        self.count(&error);
        Attempt::NotSent {
            request: req,
            upstream: Arc::clone(upstream),
            reason,
            error,
        }
    }

    /// Counts a failed exchange against the upstream, as its checks say.
    fn count(&self, error: &ProxyError) {
        if let Some(failure) = error.failure() {
            self.in_flight.peer().failed(failure);
        }
    }
}

/// How an attempt on one upstream failed.
#[derive(Debug)]
enum Attempt {
    /// Nothing reached the upstream: the request, handed back, may go to
    /// another.
    NotSent {
        request: Box<Request<RequestBody>>,
        /// Where it was not sent.
        upstream: Arc<Upstream>,
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
    // A request in absolute form (`GET http://host/path`) keeps only its
    // path; its host is already its `Host`.
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
    headers.remove_hop_by_hop();
    headers::forwarded(headers, client, trusted);
    headers::add_via(headers, received);
}

/// An upstream's response body on its way to the client.
///
/// The request counts as in flight on its upstream until this is dropped.
/// When the body has ended, the connection it came on goes back to the
/// upstream's pool if it may carry another exchange; if the client goes
/// away first, the connection is dropped with it (it is in the middle of a
/// response and cannot be reused).
#[derive(Debug)]
pub struct ProxiedBody {
    inner: UpstreamBody<RequestBody>,
    in_flight: InFlight,
    /// The most idle connections the upstream's pool keeps.
    max_idle: usize,
}

impl ProxiedBody {
    fn new(inner: UpstreamBody<RequestBody>, in_flight: InFlight, max_idle: usize) -> Self {
        let mut body = Self {
            inner,
            in_flight,
            max_idle,
        };
        // A response without a body (HEAD, 204, 304, length 0) has ended
        // already.
        if body.inner.is_end_stream() {
            body.release();
        }
        body
    }

    /// The response has ended: the request's time is taken, and the
    /// connection goes back to the pool if it may carry another exchange
    /// (both at one reading of the clock). Once: the end of the body may
    /// be seen twice, at its last data and when it is polled again.
    fn release(&mut self) {
        if self.in_flight.ended() {
            return;
        }
        let now = Instant::now();
        self.in_flight.end(now);
        if let Some(connection) = self.inner.into_reusable() {
            self.in_flight
                .upstream()
                .pool
                .release(connection, self.max_idle, now);
        }
    }
}

impl Body for ProxiedBody {
    type Data = Bytes;
    type Error = ExchangeError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
