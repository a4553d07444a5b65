//! Every reply the software makes up itself, rather than passes on: the
//! server's refusals of client input, the balancer's proxy errors and admin
//! answers, the node's answers. All are JSON; every error has one shape:
//!
//! ```json
//! {"error": "sold_out", "detail": "why, for a person", "node": "node-3001"}
//! ```
//!
//! `error` is a short code a program can match on; `detail` (optional)
//! says more; `node` (optional) names the node that answered; an error may
//! carry one more field of its own (`opens_at` of a sale not open yet).

use bytes::Bytes;
use http::StatusCode;
use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http_body_util::Full;
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::message::Response;

/// The body of every reply made here.
pub type ReplyBody = Full<Bytes>;

/// An error reply: its status and the fields of its JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure<'a> {
    pub status: StatusCode,
    pub error: &'a str,
    pub detail: Option<&'a str>,
    pub node: Option<&'a str>,
    /// One more field, name and value, of this error's own.
    pub field: Option<(&'static str, &'a str)>,
}

impl Serialize for Failure<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("error", self.error)?;
        if let Some(detail) = self.detail {
            map.serialize_entry("detail", detail)?;
        }
        if let Some(node) = self.node {
            map.serialize_entry("node", node)?;
        }
        if let Some((name, value)) = self.field {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'a> Failure<'a> {
    pub fn new(status: StatusCode, error: &'a str) -> Self {
        Self {
            status,
            error,
            detail: None,
            node: None,
            field: None,
        }
    }

    pub fn detail(self, detail: &'a str) -> Self {
        Self {
            detail: Some(detail),
            ..self
        }
    }

    pub fn node(self, node: &'a str) -> Self {
        Self {
            node: Some(node),
            ..self
        }
    }

    /// One more field of this error's own.
    pub fn field(self, name: &'static str, value: &'a str) -> Self {
        Self {
            field: Some((name, value)),
            ..self
        }
    }

    /// The JSON body alone, to render once and send many times.
    pub fn body(&self) -> Bytes {
        json_bytes(self)
    }

    pub fn reply(&self) -> Response<ReplyBody> {
        json(self.status, self.body())
    }
}

/// A JSON reply with `body` (already JSON).
pub fn json(status: StatusCode, body: Bytes) -> Response<ReplyBody> {
    let mut reply = Response::new(status, Full::new(body));
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    reply
}

/// `value` as a JSON body, ending in a newline.
pub fn json_bytes<T: Serialize + ?Sized>(value: &T) -> Bytes {
    // Serializing plain structs of strings and numbers cannot fail.
    let mut body = serde_json::to_vec(value).unwrap_or_default();
    body.push(b'\n');
    Bytes::from(body)
}

/// A reply of some other type (`/metrics`, say).
pub fn typed(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<ReplyBody> {
    let mut reply = Response::new(status, Full::new(body));
    reply
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    reply
}

/// 405, naming the methods allowed.
pub fn method_not_allowed(allow: &'static str) -> Response<ReplyBody> {
    let mut reply = Failure::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").reply();
    reply
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    reply
}

/// Tells the client to ask again in `seconds` (at least 1).
pub fn retry_after<B>(mut reply: Response<B>, seconds: u64) -> Response<B> {
    reply
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(seconds.max(1)));
    reply
}

/// Ends the connection after this reply: what is left of the request
/// cannot be read as the next one.
pub fn closing<B>(mut reply: Response<B>) -> Response<B> {
    reply
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    reply
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn text(reply: Response<ReplyBody>) -> String {
        let body = reply.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn every_error_has_one_json_shape() {
        let bare = Failure::new(StatusCode::NOT_FOUND, "not_found").reply();
        assert_eq!(bare.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            bare.headers().get(CONTENT_TYPE).unwrap(),
            "application/json"
        );
        assert_eq!(text(bare).await, "{\"error\":\"not_found\"}\n");
        let full = Failure::new(StatusCode::CONFLICT, "sold_out")
            .detail("a \"quoted\" detail")
            .node("node-1")
            .reply();
        assert_eq!(
            text(full).await,
            "{\"error\":\"sold_out\",\"detail\":\"a \\\"quoted\\\" detail\",\"node\":\"node-1\"}\n"
        );
        let own = Failure::new(StatusCode::FORBIDDEN, "not_open")
            .field("opens_at", "2026-12-12T12:00:00Z")
            .reply();
        assert_eq!(
            text(own).await,
            "{\"error\":\"not_open\",\"opens_at\":\"2026-12-12T12:00:00Z\"}\n"
        );
    }

    #[test]
    fn retry_after_is_at_least_a_second_and_closing_says_close() {
        let reply = retry_after(
            Failure::new(StatusCode::SERVICE_UNAVAILABLE, "x").reply(),
            0,
        );
        assert_eq!(reply.headers().get(RETRY_AFTER).unwrap(), "1");
        let reply = closing(method_not_allowed("GET, HEAD"));
        assert_eq!(reply.headers().get(ALLOW).unwrap(), "GET, HEAD");
        assert_eq!(reply.headers().get(CONNECTION).unwrap(), "close");
    }
}
