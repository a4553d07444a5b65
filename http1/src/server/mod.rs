//! The client-facing HTTP/1.1 server of the node and of the balancer, where
//! every limit on client input lives, once for both binaries.
//!
//! HTTP/1.0 and HTTP/1.1 clients are both served, with keep-alive when they
//! ask for it (`ab -k` sends `Connection: keep-alive` over HTTP/1.0). A
//! request reaches its [`Handler`] only once its head was read whole and
//! passed every check; what a hostile client can do is bounded here:
//!
//! - [`accept`]: the connection limit;
//! - [`connection`]: one connection's life: its head read within the
//!   header timeout (a slowloris is cut there), its reply written within
//!   the send timeout, and between requests idle, then parked ([`park`]),
//!   its task and buffers freed, until its next request, or closed at the
//!   idle timeout; the deadlines of each [`phase`];
//! - [`service`]: the checks of a request's head before any handler sees
//!   it (its target, `Host`, the framing of its body, the body limit);
//! - [`body`]: the body, read by the handler straight off the connection,
//!   must not keep the server waiting longer than the body timeout in all,
//!   and stays within the size limit while it streams;
//! - [`counters`]: every refusal is counted by reason and logged at most
//!   once a second per reason; open and parked connections are counted.
//!
//! Malformed heads are refused with 400, oversized ones with 431, as the
//! framing rules of [`crate::framing`] and the parser of
//! [`crate::decode`] find them.

mod accept;
pub mod body;
mod connection;
pub mod counters;
mod park;
pub mod phase;
mod service;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::message::{Request, Response};
use bytes::Bytes;
use http_body::Body;
use spike_config::server::ServerSettings;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

pub use body::{BodyError, BodyFailure, RequestBody};
pub use counters::{ConnectionCounts, Rejection, Rejections};

/// What a server serves: one request at a time of its connection, to a
/// reply. A handler is made per connection ([`Server::serve`]), and its
/// future may borrow it.
pub trait Handler: Send + Sync + 'static {
    /// The body of its replies.
    type Body: Body<Data = Bytes, Error: std::fmt::Display> + Send + Unpin + 'static;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<Self::Body>> + Send;
}

/// A handler shared by every connection.
impl<H: Handler> Handler for Arc<H> {
    type Body = H::Body;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<Self::Body>> + Send {
        (**self).call(req)
    }
}

/// A handler made of a function.
#[derive(Debug, Clone)]
pub struct FnHandler<F>(pub F);

impl<F, Fut, B> Handler for FnHandler<F>
where
    F: Fn(Request<RequestBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send,
    B: Body<Data = Bytes, Error: std::fmt::Display> + Send + Unpin + 'static,
{
    type Body = B;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<B>> + Send {
        (self.0)(req)
    }
}

/// A client-facing HTTP/1.1 server: its settings, its connection limit (one
/// for all its listeners), its refusals, and its shutdown. Shared by every
/// worker that serves a listener.
#[derive(Debug)]
pub struct Server {
    /// Shared with every connection's task.
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    settings: ServerSettings,
    permits: Arc<Semaphore>,
    connections: Arc<ConnectionCounts>,
    rejections: Arc<Rejections>,
    shutdown: CancellationToken,
    /// Set by the accept loops once they have seen the shutdown, and then
    /// announced on `stop`: read after every reply and by every wait for a
    /// next request, where asking the token itself would take its lock,
    /// shared by every worker. A reply decided before they have seen it
    /// keeps its connection, which closes as it waits for its next head.
    stopping: AtomicBool,
    stop: Notify,
}

impl Server {
    pub fn new(
        settings: ServerSettings,
        rejections: Arc<Rejections>,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Shared {
            permits: Arc::new(Semaphore::new(settings.max_connections)),
            connections: Arc::default(),
            settings,
            rejections,
            shutdown,
            stopping: AtomicBool::new(false),
            stop: Notify::new(),
        };
        Self {
            shared: Arc::new(shared),
        }
    }

    pub fn settings(&self) -> &ServerSettings {
        &self.shared.settings
    }

    /// The client connections open now, and how many of them are parked.
    pub fn connections(&self) -> &Arc<ConnectionCounts> {
        &self.shared.connections
    }

    pub fn rejections(&self) -> &Arc<Rejections> {
        &self.shared.rejections
    }

    pub fn shutdown(&self) -> &CancellationToken {
        &self.shared.shutdown
    }
}
