//! The checks every request passes before any service sees it, and the
//! refusal of one that fails them.
//!
//! - The request target must be in origin form (`/path`), absolute form
//!   (`http://host/path`), or `*` for `OPTIONS` (RFC 9112, 3.2). `CONNECT`
//!   and its authority form are refused, as nginx refuses them: neither
//!   binary opens tunnels.
//! - `Host` (RFC 9112, 3.2): one, holding a host and an optional port, and
//!   required in HTTP/1.1; a request in absolute form has its `Host` taken
//!   from its target, which a server must use instead (3.2.2).
//! - The body's framing follows [`crate::framing`]: what could be read two
//!   ways is refused (400), a transfer coding nothing here implements gets
//!   501; `Transfer-Encoding` with `Content-Length` is framed by the coding
//!   and the connection closed after the reply, so nothing that followed
//!   can be read as a second request.
//! - A `Content-Length` over the body limit: 413, before the body is read.
//! - `Expect: 100-continue` is answered here, for this hop.

use http::header::{HOST, HeaderValue};
use http::uri::Authority;
use http::{Method, StatusCode, Version};

use super::body::BodyError;
use super::counters::Rejection;
use crate::fields::Known;
use crate::framing::{self, BodyLength, Framing, Role};
use crate::message::{Request, Response};
use crate::reply::{self, Failure, ReplyBody};

/// What the checks found of a request they let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Checked {
    pub framing: Framing,
    /// The client waits for `100 Continue` before sending its body.
    pub expects_continue: bool,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refused {
    pub reason: Rejection,
    pub status: StatusCode,
    pub detail: &'static str,
}

impl Refused {
    /// The refusal of a body found faulty before any handler saw it.
    pub fn body(error: BodyError) -> Self {
        Self {
            reason: error.rejection(),
            status: error.status(),
            detail: match error {
                BodyError::TooLarge => "a body over max_body_bytes",
                BodyError::Timeout => "a body that did not arrive in time",
                BodyError::Malformed => "a malformed chunked body",
            },
        }
    }

    fn bad(detail: &'static str) -> Self {
        Self {
            reason: Rejection::BadRequest,
            status: StatusCode::BAD_REQUEST,
            detail,
        }
    }

    /// The refusal the client gets; the connection is closed after it.
    pub fn reply(&self) -> Response<ReplyBody> {
        reply::closing(
            Failure::new(self.status, self.reason.as_str())
                .detail(self.detail)
                .reply(),
        )
    }
}

/// Checks and normalises `req`, for a body limit of `max_body` bytes.
pub(super) fn check<B>(req: &mut Request<B>, max_body: u64) -> Result<Checked, Refused> {
    if req.method() == Method::CONNECT {
        return Err(Refused::bad("CONNECT: no tunnels here"));
    }
    check_target(req)?;
    check_host(req)?;
    let version = req.version();
    let framing =
        framing::body_framing(Role::Request, version, req.headers_mut()).map_err(|error| {
            match error.is_unsupported() {
                true => Refused {
                    reason: Rejection::NotImplemented,
                    status: StatusCode::NOT_IMPLEMENTED,
                    detail: "a transfer coding other than chunked",
                },
                false => Refused::bad(framing_detail(error)),
            }
        })?;
    if let BodyLength::Length(length) = framing.length
        && length > max_body
    {
        return Err(Refused {
            reason: Rejection::BodyTooLarge,
            status: StatusCode::PAYLOAD_TOO_LARGE,
            detail: "a Content-Length over the body limit",
        });
    }
    let headers = req.headers_mut();
    let expects_continue = version == Version::HTTP_11
        && framing.length != BodyLength::Empty
        && headers
            .get(Known::EXPECT)
            .is_some_and(|expect| expect.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        headers.remove(Known::EXPECT);
    }
    Ok(Checked {
        framing,
        expects_continue,
    })
}

fn framing_detail(error: framing::FramingError) -> &'static str {
    use framing::FramingError::*;
    match error {
        MalformedLength => "a malformed Content-Length",
        RepeatedLength => "more than one Content-Length",
        CodingInHttp10 => "Transfer-Encoding in an HTTP/1.0 request",
        ChunkedNotFinal => "a Transfer-Encoding that does not end in chunked",
        UnsupportedCoding => "a transfer coding other than chunked",
    }
}

/// The request target's form (RFC 9112, 3.2).
fn check_target<B>(req: &Request<B>) -> Result<(), Refused> {
    let uri = req.uri();
    let origin = uri.scheme().is_none() && uri.authority().is_none() && uri.path().starts_with('/');
    let absolute = uri.authority().is_some()
        && matches!(uri.scheme_str(), Some(scheme) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https"));
    let asterisk = uri.scheme().is_none() && uri.authority().is_none() && uri.path() == "*";
    match (origin || absolute, asterisk) {
        (true, _) => Ok(()),
        (false, true) if req.method() == Method::OPTIONS => Ok(()),
        (false, true) => Err(Refused::bad("`*` is a target for OPTIONS only")),
        (false, false) => Err(Refused::bad(
            "a request target neither in origin nor in absolute form",
        )),
    }
}

/// `Host`: at most one, valid, and present in HTTP/1.1; taken from the
/// target when it is in absolute form.
fn check_host<B>(req: &mut Request<B>) -> Result<(), Refused> {
    {
        let mut hosts = req.headers().get_all(Known::HOST);
        match (hosts.next(), hosts.next()) {
            (_, Some(_)) => return Err(Refused::bad("more than one Host")),
            (None, None) if req.version() == Version::HTTP_11 => {
                return Err(Refused::bad("an HTTP/1.1 request without Host"));
            }
            (Some(host), None) if !valid_host(host.as_bytes()) => {
                return Err(Refused::bad(
                    "a Host that is not a host and an optional port",
                ));
            }
            _ => {}
        }
    }
    if let Some(authority) = req.uri().authority().map(Authority::as_str) {
        // A target with user information names no host a server may use.
        let host = HeaderValue::from_str(authority)
            .ok()
            .filter(|host| valid_host(host.as_bytes()))
            .ok_or(Refused::bad("a request target with an invalid host"))?;
        req.headers_mut().insert(HOST, host);
    }
    Ok(())
}

/// Whether `value` is `uri-host [ ":" port ]` (RFC 9110, 7.2): a bracketed
/// IPv6 address, or a name or IPv4 address of unreserved characters,
/// percent-encodings and sub-delimiters but the comma (which would make it
/// a list), and a port of digits.
fn valid_host(value: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(literal) = value.strip_prefix(b"[") {
        let Some(end) = literal.iter().position(|&b| b == b']') else {
            return false;
        };
        let address = std::str::from_utf8(&literal[..end]).ok();
        let ok = address.is_some_and(|address| address.parse::<std::net::Ipv6Addr>().is_ok());
        (ok, &literal[end + 1..])
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let name = &value[..end];
        let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+;=".contains(b);
        (!name.is_empty() && name.iter().all(allowed), &value[end..])
    };
    let port_ok = match rest.strip_prefix(b":") {
        Some(port) => port.iter().all(u8::is_ascii_digit),
        None => rest.is_empty(),
    };
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use http::header::{CONTENT_LENGTH, HeaderName};

    use super::*;

    fn request(
        method: &str,
        target: &str,
        version: Version,
        headers: &[(&str, &str)],
    ) -> Request<()> {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = Request::new(method, target.parse().unwrap(), ());
        *req.version_mut() = version;
        for (name, value) in headers {
            req.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        req
    }

    fn get(headers: &[(&str, &str)]) -> Request<()> {
        request("GET", "/", Version::HTTP_11, headers)
    }

    fn refusal(mut req: Request<()>) -> Option<(Rejection, StatusCode)> {
        check(&mut req, 100).err().map(|r| (r.reason, r.status))
    }

    const BAD: Option<(Rejection, StatusCode)> =
        Some((Rejection::BadRequest, StatusCode::BAD_REQUEST));
    const HOST_X: (&str, &str) = ("host", "x");

    #[test]
    fn ambiguous_lengths_are_bad_requests() {
        assert_eq!(refusal(get(&[HOST_X, ("content-length", "5, 5")])), BAD);
        assert_eq!(
            refusal(get(&[
                HOST_X,
                ("content-length", "5"),
                ("content-length", "5")
            ])),
            BAD
        );
        for bad in ["+5", "0x5", "-1", ""] {
            assert_eq!(
                refusal(get(&[HOST_X, ("content-length", bad)])),
                BAD,
                "{bad}"
            );
        }
        assert_eq!(refusal(get(&[HOST_X, ("content-length", "5")])), None);
    }

    #[test]
    fn a_coding_other_than_chunked_is_not_implemented_and_one_not_ending_in_it_is_bad() {
        let not_implemented = Some((Rejection::NotImplemented, StatusCode::NOT_IMPLEMENTED));
        for coding in ["gzip, chunked", "chunked, chunked"] {
            let req = get(&[HOST_X, ("transfer-encoding", coding)]);
            assert_eq!(refusal(req), not_implemented, "{coding}");
        }
        for coding in ["chunked, identity", "\"chunked\""] {
            assert_eq!(refusal(get(&[HOST_X, ("transfer-encoding", coding)])), BAD);
        }
    }

    #[test]
    fn connect_and_targets_in_no_request_form_are_refused() {
        let connect = request("CONNECT", "example.com:443", Version::HTTP_11, &[HOST_X]);
        assert_eq!(refusal(connect), BAD);
        let authority_form = request("GET", "localhost:80", Version::HTTP_11, &[HOST_X]);
        assert_eq!(refusal(authority_form), BAD);
        assert_eq!(
            refusal(request("GET", "*", Version::HTTP_11, &[HOST_X])),
            BAD
        );
        assert_eq!(
            refusal(request("OPTIONS", "*", Version::HTTP_11, &[HOST_X])),
            None
        );
        assert_eq!(
            refusal(request("GET", "ftp://x/a", Version::HTTP_11, &[HOST_X])),
            BAD
        );
    }

    #[test]
    fn host_must_be_single_valid_and_present_in_http_1_1() {
        assert_eq!(refusal(get(&[])), BAD, "HTTP/1.1 without Host");
        assert_eq!(refusal(request("GET", "/", Version::HTTP_10, &[])), None);
        assert_eq!(refusal(get(&[HOST_X, ("host", "y")])), BAD);
        for bad in [
            "good.example, evil.example",
            "a,b",
            "",
            ":80",
            "x:8a",
            "a b",
            "[::1",
            "[nope]",
            "x/y",
            "user@x",
        ] {
            assert_eq!(refusal(get(&[("host", bad)])), BAD, "{bad:?}");
        }
        for good in [
            "x",
            "shop.example:8080",
            "127.0.0.1:80",
            "[::1]:8080",
            "x:",
            "a-b_c~d%20",
        ] {
            assert_eq!(refusal(get(&[("host", good)])), None, "{good:?}");
        }
    }

    #[test]
    fn an_absolute_target_sets_the_host() {
        let mut req = request(
            "GET",
            "http://shop.example:8080/a",
            Version::HTTP_11,
            &[("host", "other.example")],
        );
        check(&mut req, 100).unwrap();
        assert_eq!(req.headers().get(HOST).unwrap(), "shop.example:8080");
        let with_user = request("GET", "http://u@shop/a", Version::HTTP_11, &[HOST_X]);
        assert_eq!(refusal(with_user), BAD);
    }

    #[test]
    fn chunked_on_http_1_0_is_refused() {
        let headers = [HOST_X, ("transfer-encoding", "chunked")];
        assert_eq!(
            refusal(request("POST", "/", Version::HTTP_10, &headers)),
            BAD
        );
        assert_eq!(
            refusal(request("POST", "/", Version::HTTP_11, &headers)),
            None
        );
    }

    #[test]
    fn a_length_beside_chunked_is_dropped_and_the_connection_closed() {
        let mut req = get(&[
            HOST_X,
            ("transfer-encoding", "chunked"),
            ("content-length", "4"),
        ]);
        let checked = check(&mut req, 100).unwrap();
        assert!(checked.framing.ambiguous);
        assert!(!req.headers().contains_key(CONTENT_LENGTH));
    }

    #[test]
    fn a_length_over_the_limit_is_refused_before_reading() {
        assert_eq!(
            refusal(get(&[HOST_X, ("content-length", "101")])),
            Some((Rejection::BodyTooLarge, StatusCode::PAYLOAD_TOO_LARGE))
        );
        assert_eq!(refusal(get(&[HOST_X, ("content-length", "100")])), None);
    }

    #[test]
    fn expect_100_continue_is_answered_here_for_a_body_only() {
        let mut req = request(
            "POST",
            "/",
            Version::HTTP_11,
            &[HOST_X, ("expect", "100-Continue"), ("content-length", "5")],
        );
        assert!(check(&mut req, 100).unwrap().expects_continue);
        assert!(!req.headers().contains_key(Known::EXPECT));
        let mut bodiless = get(&[HOST_X, ("expect", "100-continue")]);
        assert!(!check(&mut bodiless, 100).unwrap().expects_continue);
    }
}
