//! Requests and responses as both sides hand them on: the parts of a head
//! this crate reads (method, target, version; status and reason phrase)
//! as `http` types, the header fields as they came ([`Fields`]), and a
//! body.

use bytes::Bytes;
use http::{Method, StatusCode, Uri, Version};

use crate::fields::Fields;

/// A request: its head and its body.
///
/// The head is boxed: a request is moved, whole, through every layer of
/// futures that hands it on, and eight bytes move where two hundred would.
#[derive(Debug, Clone, Default)]
pub struct Request<B> {
    head: Box<RequestHead>,
    body: B,
}

#[derive(Debug, Clone, Default)]
struct RequestHead {
    method: Method,
    uri: Uri,
    version: Version,
    headers: Fields,
}

impl<B> Request<B> {
    /// An HTTP/1.1 request without header fields.
    pub fn new(method: Method, uri: Uri, body: B) -> Self {
        Self::from_head(method, uri, Version::HTTP_11, Fields::new(), body)
    }

    pub(crate) fn from_head(
        method: Method,
        uri: Uri,
        version: Version,
        headers: Fields,
        body: B,
    ) -> Self {
        Self {
            head: Box::new(RequestHead {
                method,
                uri,
                version,
                headers,
            }),
            body,
        }
    }

    pub fn method(&self) -> &Method {
        &self.head.method
    }

    pub fn uri(&self) -> &Uri {
        &self.head.uri
    }

    pub fn uri_mut(&mut self) -> &mut Uri {
        &mut self.head.uri
    }

    pub fn version(&self) -> Version {
        self.head.version
    }

    pub fn version_mut(&mut self) -> &mut Version {
        &mut self.head.version
    }

    pub fn headers(&self) -> &Fields {
        &self.head.headers
    }

    pub fn headers_mut(&mut self) -> &mut Fields {
        &mut self.head.headers
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
            head: self.head,
            body: (),
        };
        (head, self.body)
    }

    /// The same head with another body.
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Request<C> {
        Request {
            head: self.head,
            body: f(self.body),
        }
    }
}

/// A request made with `http`'s builder, its header fields added in order.
impl<B> From<http::Request<B>> for Request<B> {
    fn from(req: http::Request<B>) -> Self {
        let (parts, body) = req.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Self::from_head(parts.method, parts.uri, parts.version, headers, body)
    }
}

/// A response: its head (boxed, as a request's) and its body.
#[derive(Debug, Clone, Default)]
pub struct Response<B> {
    head: Box<ResponseHead>,
    body: B,
}

#[derive(Debug, Clone, Default)]
struct ResponseHead {
    status: StatusCode,
    version: Version,
    /// The reason phrase, when it is not the status code's usual one (a
    /// node's `409 Sold Out`), so that it reaches the client as the
    /// upstream wrote it.
    reason: Option<Bytes>,
    headers: Fields,
}

impl<B> Response<B> {
    /// An HTTP/1.1 response of `status` without header fields.
    pub fn new(status: StatusCode, body: B) -> Self {
        Self::from_head(status, Version::HTTP_11, None, Fields::new(), body)
    }

    pub(crate) fn from_head(
        status: StatusCode,
        version: Version,
        reason: Option<Bytes>,
        headers: Fields,
        body: B,
    ) -> Self {
        Self {
            head: Box::new(ResponseHead {
                status,
                version,
                reason,
                headers,
            }),
            body,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.head.status
    }

    pub fn status_mut(&mut self) -> &mut StatusCode {
        &mut self.head.status
    }

    pub fn version(&self) -> Version {
        self.head.version
    }

    /// The reason phrase, if it is not the status code's usual one.
    pub fn reason(&self) -> Option<&[u8]> {
        self.head.reason.as_deref()
    }

    pub fn headers(&self) -> &Fields {
        &self.head.headers
    }

    pub fn headers_mut(&mut self) -> &mut Fields {
        &mut self.head.headers
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
            head: self.head,
            body: f(self.body),
        }
    }
}
