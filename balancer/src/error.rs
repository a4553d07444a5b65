//! Why a request could not be proxied, what each reason counts as, and the
//! reply each gets.
//!
//! Every failure of the proxy is one [`ProxyError`]: [`ProxyError::status`]
//! is the one place that maps a failure to a status code,
//! [`ProxyError::failure`] the one place that says whether it is the
//! upstream's failure (for the passive checks), and what kind.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use spike_config::health::FailOn;
use spike_http1::client::{ConnectError, ExchangeError};
use spike_http1::message::Response;
use spike_http1::reply::{self, Failure, ReplyBody};
use spike_http1::server::BodyError;

/// A request the proxy could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No upstream may take the request (every weight is 0, or every one
    /// is down or at its request limit).
    #[error("no upstream is available")]
    NoUpstream,
    /// The upstream could not be reached; nothing was sent to it.
    #[error("cannot connect to {upstream}: {source}")]
    Connect {
        upstream: SocketAddr,
        source: ConnectError,
    },
    /// The upstream did not send its response head in time.
    #[error("{upstream} did not answer within {timeout:?}")]
    Timeout {
        upstream: SocketAddr,
        timeout: Duration,
    },
    /// The exchange with the upstream broke after the request was sent.
    #[error("{upstream} failed: {source}")]
    Upstream {
        upstream: SocketAddr,
        source: ExchangeError,
    },
    /// The client's request body failed: too large, too slow, malformed.
    #[error("{0}")]
    ClientBody(BodyError),
    /// The client's address is over its rate.
    #[error("over the rate limit; retry in {retry_after:?}")]
    RateLimited { retry_after: Duration },
}

/// What a failure of live traffic was, as `fail_on` names it (nginx's
/// `proxy_next_upstream` conditions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No connection could be made, or it broke.
    Error,
    /// Connecting, or the response, took too long.
    Timeout,
    /// The response could not be read as HTTP.
    InvalidHeader,
    /// The upstream answered with this status.
    Status(u16),
}

impl UpstreamFailure {
    /// Whether `fail_on` counts it against the upstream.
    pub fn counts(self, fail_on: &FailOn) -> bool {
        match self {
            UpstreamFailure::Error => fail_on.error,
            UpstreamFailure::Timeout => fail_on.timeout,
            UpstreamFailure::InvalidHeader => fail_on.invalid_header,
            UpstreamFailure::Status(status) => fail_on.status(status),
        }
    }
}

/// Why a request could not be sent to an upstream: each is a failover to
/// another, since nothing reached this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverReason {
    /// Connecting failed (refused, reset, unreachable).
    Connect,
    /// Connecting took longer than the connect timeout.
    ConnectTimeout,
    /// The connection was found closed before the request was written.
    Closed,
}

impl FailoverReason {
    pub const ALL: [FailoverReason; 3] = [
        FailoverReason::Connect,
        FailoverReason::ConnectTimeout,
        FailoverReason::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailoverReason::Connect => "connect_failed",
            FailoverReason::ConnectTimeout => "connect_timeout",
            FailoverReason::Closed => "closed_before_send",
        }
    }

    /// The reason a connect error moves a request elsewhere.
    pub fn of_connect(error: &ConnectError) -> Self {
        match error {
            ConnectError::Timeout(_) => FailoverReason::ConnectTimeout,
            ConnectError::Io(_) => FailoverReason::Connect,
        }
    }
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoUpstream => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBody(body) => body.status(),
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The upstream's failure this is, if it is one.
    pub fn failure(&self) -> Option<UpstreamFailure> {
        match self {
            ProxyError::Connect {
                source: ConnectError::Timeout(_),
                ..
            }
            | ProxyError::Timeout { .. } => Some(UpstreamFailure::Timeout),
            ProxyError::Connect { .. } => Some(UpstreamFailure::Error),
            ProxyError::Upstream { source, .. } => Some(match source {
                ExchangeError::Head(_) | ExchangeError::Framing(_) | ExchangeError::Body(_) => {
                    UpstreamFailure::InvalidHeader
                }
                ExchangeError::TimedOut => UpstreamFailure::Timeout,
                _ => UpstreamFailure::Error,
            }),
            ProxyError::NoUpstream | ProxyError::ClientBody(_) | ProxyError::RateLimited { .. } => {
                None
            }
        }
    }

    /// The upstream the failure happened on, if one was picked.
    pub fn upstream(&self) -> Option<SocketAddr> {
        match self {
            ProxyError::NoUpstream | ProxyError::ClientBody(_) | ProxyError::RateLimited { .. } => {
                None
            }
            ProxyError::Connect { upstream, .. }
            | ProxyError::Timeout { upstream, .. }
            | ProxyError::Upstream { upstream, .. } => Some(*upstream),
        }
    }

    /// The short code in the reply's JSON body.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoUpstream => "no_upstream",
            ProxyError::Connect { .. } => "upstream_unreachable",
            ProxyError::Timeout { .. } => "upstream_timeout",
            ProxyError::Upstream { .. } => "upstream_failed",
            ProxyError::ClientBody(body) => body.rejection().as_str(),
            ProxyError::RateLimited { .. } => "rate_limited",
        }
    }

    /// The reply to the client: the status and the error's code, but not
    /// the upstream.
    pub fn response(&self) -> Response<ReplyBody> {
        let reply = Failure::new(self.status(), self.code()).reply();
        match self {
            ProxyError::NoUpstream => reply::retry_after(reply, 1),
            ProxyError::RateLimited { retry_after } => {
                reply::retry_after(reply, retry_after.as_secs_f64().ceil() as u64)
            }
            // What is left of the body cannot be read as a next request.
            ProxyError::ClientBody(_) => reply::closing(reply),
            _ => reply,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn only_what_fail_on_names_counts_against_the_upstream() {
        let upstream = "127.0.0.1:1".parse().unwrap();
        let refused = ProxyError::Connect {
            upstream,
            source: ConnectError::Io(io::ErrorKind::ConnectionRefused.into()),
        };
        let slow = ProxyError::Timeout {
            upstream,
            timeout: Duration::from_secs(1),
        };
        let garbled = ProxyError::Upstream {
            upstream,
            source: ExchangeError::Head(spike_http1::decode::HeadError::Malformed("x")),
        };
        let defaults = FailOn::default();
        assert_eq!(refused.failure(), Some(UpstreamFailure::Error));
        assert_eq!(slow.failure(), Some(UpstreamFailure::Timeout));
        assert_eq!(garbled.failure(), Some(UpstreamFailure::InvalidHeader));
        assert!(refused.failure().unwrap().counts(&defaults));
        assert!(slow.failure().unwrap().counts(&defaults));
        assert!(!garbled.failure().unwrap().counts(&defaults));
        // A live node's own 503 is an answer, unless the file says otherwise.
        assert!(!UpstreamFailure::Status(503).counts(&defaults));
        let strict = FailOn::parse(["error", "http_503"]).unwrap();
        assert!(UpstreamFailure::Status(503).counts(&strict));
        assert_eq!(ProxyError::ClientBody(BodyError::TooLarge).failure(), None);
    }
}
