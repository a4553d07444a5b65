//! `[server]`: the client-facing HTTP/1.1 listener of the node and of the
//! balancer, its limits and timeouts. The server itself is the crate
//! `spike-http1`; this is what a file may say of it.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::source::{self, Validator};

/// From the first byte of a request to the end of its head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request in progress (nginx's
/// `keepalive_timeout`). Longer than the balancer's pool keeps an idle
/// connection to a node ([`crate::balancer::DEFAULT_UPSTREAM_IDLE_TIMEOUT`]):
/// a node never closes a connection the balancer may be reusing at that
/// very moment, which would fail the request sent on it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// From the end of a request's head to the end of its body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a reply may wait for a client that does not read it (nginx's
/// `send_timeout`).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// The request line and headers together (nginx: 4 buffers of 8 KiB;
/// HAProxy: 16 KiB).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Header fields in a request head: as many as the parser holds on its
/// stack (hyper's default too).
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// nginx's `client_max_body_size`.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;
/// Open client connections; past it, new ones wait in the accept backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// How long requests in flight may take to finish once shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The validated `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
    pub send_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// Worker threads; `None` (the default) means one per core, like
    /// nginx's `worker_processes auto`.
    pub workers: Option<usize>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            workers: None,
        }
    }
}

/// The `[server]` section as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
    header_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    body_timeout: Option<Spanned<String>>,
    send_timeout: Option<Spanned<String>>,
    max_header_bytes: Option<Spanned<u64>>,
    max_headers: Option<Spanned<u64>>,
    max_body_bytes: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    shutdown_grace: Option<Spanned<String>>,
    workers: Option<Spanned<u64>>,
}

impl ServerSettings {
    pub(crate) fn validate(raw: Option<RawServer>, v: &mut Validator<'_>) -> Self {
        let raw = raw.unwrap_or_default();
        let d = Self::default();
        let count = |min: u64| {
            move |n: u64| source::at_least(min)(n).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        };
        Self {
            header_timeout: v.field(raw.header_timeout, d.header_timeout, source::duration),
            idle_timeout: v.field(raw.idle_timeout, d.idle_timeout, source::duration),
            body_timeout: v.field(raw.body_timeout, d.body_timeout, source::duration),
            send_timeout: v.field(raw.send_timeout, d.send_timeout, source::duration),
            // A request line and a Host need some room.
            max_header_bytes: v.field(raw.max_header_bytes, d.max_header_bytes, count(256)),
            max_headers: v.field(raw.max_headers, d.max_headers, count(1)),
            max_body_bytes: v.field(raw.max_body_bytes, d.max_body_bytes, Ok),
            max_connections: v.field(raw.max_connections, d.max_connections, count(1)),
            shutdown_grace: v.field(raw.shutdown_grace, d.shutdown_grace, source::duration),
            workers: v.field(raw.workers, d.workers, |n| count(1)(n).map(Some)),
        }
    }
}
