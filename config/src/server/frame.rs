//! How a request's body is framed, checked before any service sees the
//! request (RFC 9112, sections 6.1 to 6.3, on request smuggling).
//!
//! hyper already refuses most ambiguous framing with 400 (two different or
//! malformed `Content-Length` values, a `Transfer-Encoding` that does not
//! end in `chunked`). These rules are the rest, kept here so that they hold
//! whatever hyper accepts:
//!
//! - `Transfer-Encoding` in an HTTP/1.0 request: 400 (1.0 has no chunked
//!   coding; a 1.1 server behind could read it);
//! - `Content-Length` as a list (`5, 5`) or repeated: 400;
//! - `Transfer-Encoding` with `Content-Length`: the length is dropped (the
//!   body is framed by the coding) and the connection is closed after the
//!   response, so nothing that followed can be read as a second request;
//! - a `Content-Length` over the body limit: 413, before the body is read;
//! - header names holding `_` are dropped, as nginx does: a proxy or an
//!   application that maps `-` and `_` to the same name (CGI does) could
//!   read `Transfer_Encoding` as `Transfer-Encoding`;
//! - `CONNECT`: 400, as nginx answers it: neither binary opens tunnels, and
//!   its authority-form target names no resource here.

use http::header::{CONTENT_LENGTH, HeaderName, TRANSFER_ENCODING};
use http::{Method, Request, Version};

use super::reject::Rejection;

/// Why a request's framing was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub reason: Rejection,
    pub detail: &'static str,
}

/// Checks and normalises the framing of `req`; a body limit of `max_body`
/// bytes. `Ok(true)` asks to close the connection after the response.
pub fn check<B>(req: &mut Request<B>, max_body: u64) -> Result<bool, Refused> {
    let refuse = |reason, detail| Err(Refused { reason, detail });
    if req.method() == Method::CONNECT {
        return refuse(Rejection::BadRequest, "CONNECT: no tunnels here");
    }
    let headers = req.headers_mut();
    let chunked = headers.contains_key(TRANSFER_ENCODING);
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let length = lengths.next();
    if lengths.next().is_some() {
        return refuse(Rejection::BadRequest, "more than one Content-Length");
    }
    let length = match length.map(|value| value.to_str().map(str::trim)) {
        None => None,
        Some(Ok(text)) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            Some(text.parse::<u64>().unwrap_or(u64::MAX))
        }
        Some(_) => return refuse(Rejection::BadRequest, "a malformed Content-Length"),
    };
    if chunked && req.version() == Version::HTTP_10 {
        return refuse(
            Rejection::BadRequest,
            "Transfer-Encoding in an HTTP/1.0 request",
        );
    }
    let headers = req.headers_mut();
    let mut close = false;
    if chunked && length.is_some() {
        headers.remove(CONTENT_LENGTH);
        close = true;
    } else if length.is_some_and(|length| length > max_body) {
        return refuse(
            Rejection::BodyTooLarge,
            "a Content-Length over the body limit",
        );
    }
    let underscored: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in underscored {
        headers.remove(name);
    }
    Ok(close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().version(version).uri("/");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).unwrap()
    }

    fn refusal(version: Version, headers: &[(&str, &str)]) -> Option<Rejection> {
        check(&mut request(version, headers), 100)
            .err()
            .map(|r| r.reason)
    }

    #[test]
    fn ambiguous_lengths_are_bad_requests() {
        let v11 = Version::HTTP_11;
        assert_eq!(
            refusal(v11, &[("content-length", "5, 5")]),
            Some(Rejection::BadRequest)
        );
        assert_eq!(
            refusal(v11, &[("content-length", "5"), ("content-length", "5")]),
            Some(Rejection::BadRequest)
        );
        for bad in ["+5", "0x5", "-1", ""] {
            assert_eq!(
                refusal(v11, &[("content-length", bad)]),
                Some(Rejection::BadRequest),
                "{bad}"
            );
        }
        assert_eq!(refusal(v11, &[("content-length", "5")]), None);
    }

    #[test]
    fn connect_is_refused() {
        let mut req = Request::connect("example.com:443").body(()).unwrap();
        assert_eq!(
            check(&mut req, 100).err().map(|r| r.reason),
            Some(Rejection::BadRequest)
        );
    }

    #[test]
    fn chunked_on_http_1_0_is_refused() {
        let headers = [("transfer-encoding", "chunked")];
        assert_eq!(
            refusal(Version::HTTP_10, &headers),
            Some(Rejection::BadRequest)
        );
        assert_eq!(refusal(Version::HTTP_11, &headers), None);
    }

    #[test]
    fn a_length_beside_chunked_is_dropped_and_the_connection_closed() {
        let mut req = request(
            Version::HTTP_11,
            &[("transfer-encoding", "chunked"), ("content-length", "4")],
        );
        assert_eq!(check(&mut req, 100), Ok(true));
        assert!(!req.headers().contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn a_length_over_the_limit_is_refused_before_reading() {
        assert_eq!(
            refusal(Version::HTTP_11, &[("content-length", "101")]),
            Some(Rejection::BodyTooLarge)
        );
        assert_eq!(
            refusal(Version::HTTP_11, &[("content-length", "100")]),
            None
        );
    }

    #[test]
    fn underscored_names_are_dropped() {
        let mut req = request(
            Version::HTTP_11,
            &[
                ("transfer_encoding", "chunked"),
                ("x_user", "a"),
                ("x-user", "b"),
            ],
        );
        assert_eq!(check(&mut req, 100), Ok(false));
        let names: Vec<_> = req.headers().keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-user"]);
    }
}
