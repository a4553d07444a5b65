//! A small HTTP/1.1 client for tests, over hyper's pooled client.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as Pool;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "body is not JSON ({err}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A keep-alive client; clones share its connection pool.
#[derive(Debug, Clone)]
pub struct Client {
    pool: Pool<HttpConnector, Full<Bytes>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    pub fn new() -> Self {
        Self {
            pool: Pool::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn get(&self, url: &str) -> Reply {
        self.send(Request::get(url).body(Full::default()).expect("request"))
            .await
            .unwrap_or_else(|err| panic!("GET {url}: {err}"))
    }

    pub async fn post(&self, url: &str) -> Reply {
        self.send(Self::request(Method::POST, url, &[], b""))
            .await
            .unwrap_or_else(|err| panic!("POST {url}: {err}"))
    }

    /// Sends a request; an error means no complete response arrived.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = self
            .pool
            .request(req)
            .await
            .map_err(|err| format!("{err:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|err| format!("{err:?}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// A request with `method`, `headers` and `body`.
    pub fn request(
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Request<Full<Bytes>> {
        let mut req = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request")
    }
}
