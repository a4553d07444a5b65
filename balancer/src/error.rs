//! Why a request could not be proxied, and the reply each reason gets.
//!
//! Every failure of the proxy is one [`ProxyError`]; [`ProxyError::status`]
//! is the one place that maps a failure to a status code.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

use spike_config::server::Rejection;
use spike_config::server::body::BodyError;

use crate::h1::ExchangeError;
use crate::pool::ConnectError;

/// A request the proxy could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No upstream may take the request (every weight is 0).
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

    /// The refusal this is, if the client is at fault.
    pub fn rejection(&self) -> Option<Rejection> {
        match self {
            ProxyError::ClientBody(body) => Some(body.rejection()),
            ProxyError::RateLimited { .. } => Some(Rejection::RateLimited),
            _ => None,
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

    /// The reply to the client: the status and a short JSON body that names
    /// the reason but not the upstream.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let body = format!("{{\"error\":\"{}\"}}\n", self.code());
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            ProxyError::NoUpstream => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::RateLimited { retry_after } => {
                let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
                headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
            }
            // What is left of the body cannot be read as a next request.
            ProxyError::ClientBody(_) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}
