//! Who may use the admin address.
//!
//! A web page the operator visits can make the browser send requests to
//! the admin address (`127.0.0.1:8088` is as reachable from a browser as
//! any site). So a request that changes anything is refused (403) when it
//! carries an `Origin`, or failing that a `Referer`, other than the admin
//! address's own, and it must say its body is JSON: a cross-site form
//! cannot, and a cross-site script that does is held up by the browser's
//! preflight, which the admin never answers. The admin address's own
//! origins are `http://` and its IP address and port, or `localhost` and
//! the port when it listens on the loopback (or on every address, any IP
//! address of the machine): never a DNS name, which a hostile site could
//! point at this machine (DNS rebinding).
//!
//! With an `admin_token`, every request but those of the status page's own
//! files and `/metrics` needs `Authorization: Bearer TOKEN`, compared in
//! constant time.

use std::net::{IpAddr, SocketAddr};

use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, ORIGIN, REFERER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Response, StatusCode};
use spike_config::balancer::AdminToken;
use spike_http1::reply::{Failure, ReplyBody};
use subtle::ConstantTimeEq;

/// What the admin lets in.
#[derive(Debug)]
pub struct Guard {
    token: Option<AdminToken>,
    /// The admin listener's own address, once bound.
    addr: std::sync::OnceLock<SocketAddr>,
}

impl Guard {
    pub fn new(token: Option<AdminToken>) -> Self {
        Self {
            token,
            addr: std::sync::OnceLock::new(),
        }
    }

    /// Notes the address the admin listener was bound to.
    pub fn bound(&self, addr: SocketAddr) {
        let _ = self.addr.set(addr);
    }

    /// The refusal (401) of a request without the token, if one is set.
    pub fn unauthorized(&self, headers: &HeaderMap) -> Option<Response<ReplyBody>> {
        let token = self.token.as_ref()?;
        let given = headers
            .get(AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        if bool::from(given.ct_eq(token.expose().as_bytes())) {
            return None;
        }
        let mut reply = Failure::new(StatusCode::UNAUTHORIZED, "unauthorized")
            .detail("this admin address needs Authorization: Bearer TOKEN (admin_token)")
            .reply();
        reply.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"spike admin\""),
        );
        Some(reply)
    }

    /// The refusal (403, or 415) of a request that changes something,
    /// unless it comes from the admin address's own page, or from no page
    /// at all (a command line client), with a JSON body.
    pub fn refuse_change(
        &self,
        method: &Method,
        headers: &HeaderMap,
    ) -> Option<Response<ReplyBody>> {
        if matches!(*method, Method::GET | Method::HEAD) {
            return None;
        }
        let origin = headers
            .get(ORIGIN)
            .or_else(|| headers.get(REFERER))
            .map(|value| value.to_str().unwrap_or_default());
        if let Some(origin) = origin
            && !self.own_origin(origin)
        {
            return Some(
                Failure::new(StatusCode::FORBIDDEN, "foreign_origin")
                    .detail("a change must come from the admin address's own page")
                    .reply(),
            );
        }
        let json = headers
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
        (!json).then(|| {
            Failure::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "json_required")
                .detail("a change must be sent with Content-Type: application/json")
                .reply()
        })
    }

    /// Whether `origin` (an `Origin`, or a `Referer` URL) is the admin
    /// address's own.
    fn own_origin(&self, origin: &str) -> bool {
        let Some(own) = self.addr.get() else {
            return false;
        };
        let Some(rest) = origin.strip_prefix("http://") else {
            return false;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let Some((host, port)) = authority.rsplit_once(':') else {
            // No port: 80, which the admin listens on only if so told.
            return own.port() == 80 && host_is_own(authority, own.ip());
        };
        port.parse::<u16>().is_ok_and(|port| port == own.port()) && host_is_own(host, own.ip())
    }
}

/// Whether `host` (from a URL: an IP address, `[v6]`, or a name) names the
/// admin listener's address `own`.
fn host_is_own(host: &str, own: IpAddr) -> bool {
    let local = own.is_loopback() || own.is_unspecified();
    if host.eq_ignore_ascii_case("localhost") {
        return local;
    }
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal.parse::<IpAddr>() {
        Ok(ip) => ip == own || own.is_unspecified() || (own.is_loopback() && ip.is_loopback()),
        // A name could be anyone's.
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(addr: &str, token: Option<&str>) -> Guard {
        let config = format!(
            "listen = \"127.0.0.1:1\"\nadmin = \"{addr}\"\n{}[[upstream]]\naddr = \"127.0.0.1:3\"\n",
            token.map_or(String::new(), |t| format!("admin_token = \"{t}\"\n"))
        );
        let source = spike_config::Source::new("b.toml", config);
        let config = spike_config::BalancerConfig::from_source(&source).unwrap();
        let guard = Guard::new(config.admin_token);
        guard.bound(config.admin);
        guard
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn status(refusal: Option<Response<ReplyBody>>) -> u16 {
        refusal.map_or(200, |reply| reply.status().as_u16())
    }

    #[test]
    fn a_change_from_another_origin_is_refused() {
        let guard = guard("127.0.0.1:8088", None);
        let json = ("content-type", "application/json");
        let change = |pairs: &[(&'static str, &str)]| {
            status(guard.refuse_change(&Method::POST, &headers(pairs)))
        };
        assert_eq!(change(&[json, ("origin", "http://127.0.0.1:8088")]), 200);
        assert_eq!(change(&[json, ("origin", "http://localhost:8088")]), 200);
        assert_eq!(change(&[json]), 200, "no page: a command line client");
        for foreign in [
            "http://evil.example",
            "http://evil.example:8088",
            "https://127.0.0.1:8088",
            "http://127.0.0.1:9999",
            "null",
        ] {
            assert_eq!(change(&[json, ("origin", foreign)]), 403, "{foreign}");
        }
        assert_eq!(
            change(&[json, ("referer", "http://evil.example/page")]),
            403
        );
        assert_eq!(change(&[json, ("referer", "http://127.0.0.1:8088/")]), 200);
        assert_eq!(
            change(&[("content-type", "application/x-www-form-urlencoded")]),
            415
        );
        assert_eq!(change(&[]), 415);
        assert_eq!(
            status(
                guard.refuse_change(&Method::GET, &headers(&[("origin", "http://evil.example")]))
            ),
            200
        );
    }

    #[test]
    fn on_every_address_any_ip_of_the_machine_is_its_own_but_no_name() {
        let guard = guard("0.0.0.0:8088", None);
        assert!(guard.own_origin("http://10.1.2.3:8088"));
        assert!(guard.own_origin("http://[::1]:8088"));
        assert!(guard.own_origin("http://localhost:8088"));
        assert!(!guard.own_origin("http://lb.internal:8088"));
        let public = self::guard("10.1.2.3:8088", None);
        assert!(!public.own_origin("http://localhost:8088"));
        assert!(!public.own_origin("http://10.1.2.4:8088"));
    }

    #[test]
    fn the_token_is_needed_when_set() {
        let guard = guard("127.0.0.1:8088", Some("0123456789abcdef"));
        assert_eq!(status(guard.unauthorized(&headers(&[]))), 401);
        assert_eq!(
            status(guard.unauthorized(&headers(&[("authorization", "Bearer 0123456789abcdeX")]))),
            401
        );
        assert_eq!(
            status(guard.unauthorized(&headers(&[("authorization", "Bearer 0123456789abcdef")]))),
            200
        );
        let open = self::guard("127.0.0.1:8088", None);
        assert_eq!(status(open.unauthorized(&headers(&[]))), 200);
    }
}
