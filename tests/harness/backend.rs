//! HTTP backends for proxy tests: real hyper servers on ephemeral loopback
//! ports, inside the test process, that record every request they receive
//! (head and whole body) and answer as the test tells them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A request as the backend received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The `User-Agent` of the balancer's health checks.
pub const HEALTH_CHECK_AGENT: &str = "spike-balancer health check";

impl Recorded {
    pub fn is_health_check(&self) -> bool {
        self.headers
            .get("user-agent")
            .is_some_and(|agent| agent == HEALTH_CHECK_AGENT)
    }
}

/// What the backend answers.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    pub body: Bytes,
    /// Waits this long before answering.
    pub delay: Duration,
    /// Sends the body in this many chunks, without a length (so HTTP/1.1
    /// frames it with chunked encoding).
    pub chunks: Option<usize>,
}

impl Answer {
    pub fn ok(body: impl Into<Bytes>) -> Self {
        Self {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: body.into(),
            delay: Duration::ZERO,
            chunks: None,
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("status code"),
            ..Self::ok(Bytes::new())
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    pub fn chunked(mut self, chunks: usize) -> Self {
        self.chunks = Some(chunks);
        self
    }
}

/// A body sent in pieces, of unknown length.
#[derive(Debug)]
pub struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(
            self.get_mut()
                .0
                .pop_front()
                .map(|chunk| Ok(Frame::data(chunk))),
        )
    }
}

type Respond = dyn Fn(&Recorded) -> Answer + Send + Sync;

/// A running backend; stops on drop.
pub struct Backend {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Recorded>>>,
    open_connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// A backend on an ephemeral port that answers every request with
    /// `respond`.
    pub async fn start(respond: impl Fn(&Recorded) -> Answer + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a backend");
        Self::serve(listener, respond)
    }

    /// A backend on `listener`; see [`Backend::start`].
    pub fn serve(
        listener: TcpListener,
        respond: impl Fn(&Recorded) -> Answer + Send + Sync + 'static,
    ) -> Self {
        let addr = listener.local_addr().expect("backend address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let open_connections = Arc::new(AtomicUsize::new(0));
        let respond: Arc<Respond> = Arc::new(respond);
        let task = tokio::spawn({
            let (requests, open) = (Arc::clone(&requests), Arc::clone(&open_connections));
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (requests, respond, open) = (
                        Arc::clone(&requests),
                        Arc::clone(&respond),
                        Arc::clone(&open),
                    );
                    open.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            handle(req, Arc::clone(&requests), Arc::clone(&respond))
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            }
        });
        Self {
            addr,
            requests,
            open_connections,
            task,
        }
    }

    /// A backend that answers 200 with its name as the body and in an
    /// `x-backend` header.
    pub async fn named(name: &str) -> Self {
        let name = name.to_owned();
        Self::start(move |_| Answer::ok(name.clone()).header("x-backend", name.clone())).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests reached the backend, health checks aside.
    pub fn hits(&self) -> usize {
        self.requests().len()
    }

    /// Every request that reached the backend, in order of arrival, health
    /// checks aside.
    pub fn requests(&self) -> Vec<Recorded> {
        let requests = self.requests.lock().unwrap();
        requests
            .iter()
            .filter(|r| !r.is_health_check())
            .cloned()
            .collect()
    }

    /// How many health checks reached the backend.
    pub fn health_checks(&self) -> usize {
        let requests = self.requests.lock().unwrap();
        requests.iter().filter(|r| r.is_health_check()).count()
    }

    /// Client connections currently open to the backend.
    pub fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    respond: Arc<Respond>,
) -> Result<Response<Either<Full<Bytes>, Chunks>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body,
    };
    let reply = respond(&recorded);
    requests.lock().unwrap().push(recorded);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let body = match reply.chunks {
        None => Either::Left(Full::new(reply.body)),
        Some(count) => {
            let size = reply.body.len().div_ceil(count.max(1)).max(1);
            let chunks = (0..reply.body.len())
                .step_by(size)
                .map(|start| {
                    reply
                        .body
                        .slice(start..(start + size).min(reply.body.len()))
                })
                .collect();
            Either::Right(Chunks(chunks))
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    for (name, value) in reply.headers {
        response
            .headers_mut()
            .append(name, value.parse().expect("header value"));
    }
    Ok(response)
}
