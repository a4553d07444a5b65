//! Keep-alive connections to one upstream.
//!
//! Each upstream has its own pool: a stack of idle HTTP/1 connections, most
//! recently used on top (warm in every cache), shared by all threads. A
//! request checks one out, or opens a new one; the connection comes back
//! when its response has ended. Owning the pool, rather than going through a
//! general-purpose client, gives the proxy what it needs to know:
//!
//! - whether a failure happened before anything was sent (connecting, or a
//!   pooled connection found closed), which is what makes a retry on
//!   another upstream safe;
//! - the upstream a connection belongs to, without hashing a key per
//!   request;
//! - no task per request: a connection returns to its pool from the
//!   response body that ends on it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use spike_config::balancer::ProxySettings;

use crate::body::RequestBody;
use crate::upstream::FailoverReason;

/// How a pool opens and keeps connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// Idle connections older than this are closed, not reused.
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

impl From<&ProxySettings> for PoolSettings {
    fn from(proxy: &ProxySettings) -> Self {
        Self {
            connect_timeout: proxy.connect_timeout,
            idle_timeout: proxy.idle_timeout,
            max_idle: proxy.max_idle_per_upstream,
        }
    }
}

/// Why no connection to the upstream could be had. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("handshake: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnectError {
    /// How a failover caused by this error is counted.
    pub fn failover_reason(&self) -> FailoverReason {
        match self {
            ConnectError::Timeout(_) => FailoverReason::ConnectTimeout,
            ConnectError::Io(_) | ConnectError::Handshake(_) => FailoverReason::Connect,
        }
    }
}

/// The idle connections of one upstream.
#[derive(Debug)]
pub struct ConnectionPool {
    addr: SocketAddr,
    /// From the configuration in force; a reload replaces them.
    settings: ArcSwap<PoolSettings>,
    /// Held only to push or pop; never across an `.await`.
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

impl ConnectionPool {
    pub fn new(addr: SocketAddr, settings: PoolSettings) -> Self {
        Self {
            addr,
            settings: ArcSwap::from_pointee(settings),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Applies the settings of a new configuration.
    pub fn configure(&self, settings: PoolSettings) {
        if **self.settings.load() != settings {
            self.settings.store(Arc::new(settings));
        }
    }

    /// A connection ready to send a request: the most recently used idle
    /// one that is still open, or a new one.
    pub async fn checkout(&self) -> Result<SendRequest<RequestBody>, ConnectError> {
        let settings = self.settings.load_full();
        while let Some(mut idle) = self.pop() {
            if idle.since.elapsed() > settings.idle_timeout || idle.sender.is_closed() {
                continue;
            }
            // A connection returned as its response ended may still be
            // finishing it; `ready` waits for that, and fails if the
            // upstream closed it meanwhile.
            if idle.sender.ready().await.is_ok() {
                return Ok(idle.sender);
            }
        }
        self.connect(settings.connect_timeout).await
    }

    /// Returns a connection whose exchange has ended.
    pub fn release(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let max_idle = self.settings.load().max_idle;
        let mut idle = self.idle.lock().expect("pool lock");
        if idle.len() < max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections that have been idle longer than the idle
    /// timeout, or that the upstream closed.
    pub fn evict_expired(&self) {
        let timeout = self.settings.load().idle_timeout;
        let mut idle = self.idle.lock().expect("pool lock");
        idle.retain(|conn| conn.since.elapsed() <= timeout && !conn.sender.is_closed());
    }

    /// Idle connections, for `/stats`.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    fn pop(&self) -> Option<Idle> {
        self.idle.lock().expect("pool lock").pop()
    }

    async fn connect(&self, timeout: Duration) -> Result<SendRequest<RequestBody>, ConnectError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ConnectError::Timeout(timeout))??;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(upstream = %addr, error = %err, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}
