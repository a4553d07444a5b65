//! Requests and responses as both sides hand them on: the parts of a head
//! this crate reads (method, target, version; status and reason phrase)
//! as `http` types, the header fields as they came ([`Fields`]), and a
//! body.

use bytes::Bytes;
use http::{Method, StatusCode, Uri, Version};

use crate::fields::Fields;

/// A request: its head and its body.
#[derive(Debug, Clone, Default)]
pub struct Request<B> {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Fields,
    body: B,
}

impl<B> Request<B> {
    /// An HTTP/1.1 request without header fields.
    pub fn new(method: Method, uri: Uri, body: B) -> Self {
        Self {
            method,
            uri,
            version: Version::HTTP_11,
            headers: Fields::new(),
            body,
        }
    }

    pub(crate) fn from_head(method: Method, uri: Uri, version: Version, headers: Fields) -> Self
    where
        B: Default,
    {
        Self {
            method,
            uri,
            version,
            headers,
            body: B::default(),
        }
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    pub fn uri_mut(&mut self) -> &mut Uri {
        &mut self.uri
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn version_mut(&mut self) -> &mut Version {
        &mut self.version
    }

    pub fn headers(&self) -> &Fields {
        &self.headers
    }

    pub fn headers_mut(&mut self) -> &mut Fields {
        &mut self.headers
    }

    pub fn body(&self) -> &B {
        &self.body
    }

    pub fn body_mut(&mut self) -> &mut B {
        &mut self.body
    }

    pub fn into_body(self) -> B {
        self.body
    }

    /// The head, as a request without a body, and the body.
    pub fn into_parts(self) -> (Request<()>, B) {
        let head = Request {
            method: self.method,
            uri: self.uri,
            version: self.version,
            headers: self.headers,
            body: (),
        };
        (head, self.body)
    }

    /// The same head with another body.
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Request<C> {
        Request {
            method: self.method,
            uri: self.uri,
            version: self.version,
            headers: self.headers,
            body: f(self.body),
        }
    }
}

/// A request made with `http`'s builder, its header fields added in order.
impl<B> From<http::Request<B>> for Request<B> {
    fn from(req: http::Request<B>) -> Self {
        let (parts, body) = req.into_parts();
        Self {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts
                .headers
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            body,
        }
    }
}

/// A response: its head and its body.
#[derive(Debug, Clone, Default)]
pub struct Response<B> {
    status: StatusCode,
    version: Version,
    /// The reason phrase, when it is not the status code's usual one (a
    /// node's `409 Sold Out`), so that it reaches the client as the
    /// upstream wrote it.
    reason: Option<Bytes>,
    headers: Fields,
    body: B,
}

impl<B> Response<B> {
    /// An HTTP/1.1 response of `status` without header fields.
    pub fn new(status: StatusCode, body: B) -> Self {
        Self {
            status,
            version: Version::HTTP_11,
            reason: None,
            headers: Fields::new(),
            body,
        }
    }

    pub(crate) fn from_head(
        status: StatusCode,
        version: Version,
        reason: Option<Bytes>,
        headers: Fields,
        body: B,
    ) -> Self {
        Self {
            status,
            version,
            reason,
            headers,
            body,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn status_mut(&mut self) -> &mut StatusCode {
        &mut self.status
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// The reason phrase, if it is not the status code's usual one.
    pub fn reason(&self) -> Option<&[u8]> {
        self.reason.as_deref()
    }

    pub fn headers(&self) -> &Fields {
        &self.headers
    }

    pub fn headers_mut(&mut self) -> &mut Fields {
        &mut self.headers
    }

    pub fn body(&self) -> &B {
        &self.body
    }

    pub fn body_mut(&mut self) -> &mut B {
        &mut self.body
    }

    pub fn into_body(self) -> B {
        self.body
    }

    /// The same head with another body.
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Response<C> {
        Response {
            status: self.status,
            version: self.version,
            reason: self.reason,
            headers: self.headers,
            body: f(self.body),
        }
    }
}
