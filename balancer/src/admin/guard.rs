//! Who may use the admin address.
//!
//! A web page the operator visits can make the browser send requests to
//! the admin address (`127.0.0.1:8088` is as reachable from a browser as
//! any site). So:
//!
//! - a request that changes anything is refused (403) when it carries an
//!   `Origin`, or failing that a `Referer`, other than the admin address's
//!   own, and it must say its body is JSON: a cross-site form cannot, and a
//!   cross-site script that does is held up by the browser's preflight,
//!   which gets no CORS header in reply;
//! - without a token, a request whose `Host` does not name the admin
//!   address is refused (403), reads included: a hostile site that points
//!   its own name at this machine (DNS rebinding) is same-origin to itself,
//!   and would otherwise read `/stats`;
//! - with an `admin_token`, every request but those of the status page's
//!   own files and `/metrics` needs `Authorization: Bearer TOKEN`, compared
//!   in constant time (as SHA-256 digests, so not even its length shows).
//!
//! The admin address's own names are its IP address and `localhost` when
//! it listens on the loopback, and, when it listens on every address, the
//! addresses of the machine's interfaces and `localhost`: never a DNS
//! name, which anyone can point anywhere.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use http::header::{
    AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, ORIGIN, REFERER, WWW_AUTHENTICATE,
};
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use spike_config::balancer::AdminToken;
use spike_http1::fields::Fields;
use spike_http1::message::Response;
use spike_http1::reply::{Failure, ReplyBody};
use subtle::ConstantTimeEq;

/// What the admin lets in.
#[derive(Debug)]
pub struct Guard {
    /// The token's digest, if one is set.
    token: Option<[u8; 32]>,
    /// The admin listener's own addresses, once bound.
    own: OnceLock<Own>,
}

/// The addresses the admin listener answers on.
#[derive(Debug)]
struct Own {
    port: u16,
    ips: BTreeSet<IpAddr>,
    /// Whether `localhost` names it.
    localhost: bool,
}

impl Guard {
    pub fn new(token: Option<AdminToken>) -> Self {
        Self {
            token: token.map(|token| Sha256::digest(token.expose().as_bytes()).into()),
            own: OnceLock::new(),
        }
    }

    /// Notes the address the admin listener was bound to.
    pub fn bound(&self, addr: SocketAddr) {
        let ip = addr.ip();
        let mut ips = BTreeSet::from([ip]);
        if ip.is_unspecified() {
            ips.extend(interface_addresses());
        }
        let _ = self.own.set(Own {
            port: addr.port(),
            ips,
            localhost: ip.is_loopback() || ip.is_unspecified(),
        });
    }

    /// The refusal (403) of a request whose `Host` does not name the admin
    /// address, when no token is set (with one, the token keeps others
    /// out).
    pub fn foreign_host(&self, headers: &Fields) -> Option<Response<ReplyBody>> {
        if self.token.is_some() {
            return None;
        }
        let host = headers.get(HOST)?.to_str().unwrap_or_default();
        (!self.own_authority(host)).then(|| {
            Failure::new(StatusCode::FORBIDDEN, "foreign_host")
                .detail(
                    "open the admin address by its IP address (or localhost), or set admin_token",
                )
                .reply()
        })
    }

    /// The refusal (401) of a request without the token, if one is set.
    pub fn unauthorized(&self, headers: &Fields) -> Option<Response<ReplyBody>> {
        let token = self.token.as_ref()?;
        let given = headers
            .get(AUTHORIZATION)
            .map(|value| value.as_bytes())
            .and_then(|value| {
                let (scheme, rest) = value.split_at_checked(7)?;
                scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
            })
            .unwrap_or_default();
        let given: [u8; 32] = Sha256::digest(given).into();
        if bool::from(given.ct_eq(token)) {
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
    pub fn refuse_change(&self, method: &Method, headers: &Fields) -> Option<Response<ReplyBody>> {
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
        let Some(rest) = origin.strip_prefix("http://") else {
            return false;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        self.own_authority(authority)
    }

    /// Whether `authority` (`host[:port]`) names the admin listener.
    fn own_authority(&self, authority: &str) -> bool {
        let Some(own) = self.own.get() else {
            return false;
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, port.parse::<u16>().ok()),
            // No port: 80.
            _ => (authority, Some(80)),
        };
        if port != Some(own.port) {
            return false;
        }
        if host.eq_ignore_ascii_case("localhost") {
            return own.localhost;
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        // A name could be anyone's.
        literal
            .parse::<IpAddr>()
            .is_ok_and(|ip| own.ips.contains(&ip))
    }
}

/// The addresses of the machine's network interfaces.
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(interfaces) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    interfaces
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
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

    fn headers(pairs: &[(&'static str, &str)]) -> Fields {
        let mut headers = Fields::new();
        for (name, value) in pairs {
            headers.insert(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
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
    fn on_every_address_the_machines_own_are_its_own_but_no_name() {
        let guard = guard("0.0.0.0:8088", None);
        assert!(
            guard.own_origin("http://127.0.0.1:8088"),
            "the loopback interface"
        );
        assert!(guard.own_origin("http://localhost:8088"));
        assert!(
            !guard.own_origin("http://203.0.113.5:8088"),
            "not this machine's"
        );
        assert!(!guard.own_origin("http://lb.internal:8088"));
        let loopback = self::guard("127.0.0.1:8088", None);
        assert!(
            !loopback.own_origin("http://127.0.0.2:8088"),
            "another local service"
        );
        assert!(!loopback.own_origin("http://[::1]:8088"));
        let public = self::guard("10.1.2.3:8088", None);
        assert!(!public.own_origin("http://localhost:8088"));
        assert!(!public.own_origin("http://10.1.2.4:8088"));
        assert!(public.own_origin("http://10.1.2.3:8088/page"));
    }

    #[test]
    fn without_a_token_a_request_must_name_the_admin_address() {
        let guard = guard("127.0.0.1:8088", None);
        let host = |host: &str| status(guard.foreign_host(&headers(&[("host", host)])));
        assert_eq!(host("127.0.0.1:8088"), 200);
        assert_eq!(host("localhost:8088"), 200);
        assert_eq!(host("evil.example:8088"), 403, "a name pointed here");
        assert_eq!(host("127.0.0.1:9999"), 403);
        let with_token = self::guard("127.0.0.1:8088", Some("0123456789abcdef"));
        assert_eq!(
            status(with_token.foreign_host(&headers(&[("host", "lb.internal:8088")]))),
            200,
            "the token keeps others out"
        );
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
        assert_eq!(
            status(guard.unauthorized(&headers(&[("authorization", "bearer 0123456789abcdef")]))),
            200,
            "the scheme is case-insensitive"
        );
        assert_eq!(
            status(guard.unauthorized(&headers(&[("authorization", "Bearer 0123456789abcdef0")]))),
            401
        );
        let open = self::guard("127.0.0.1:8088", None);
        assert_eq!(status(open.unauthorized(&headers(&[]))), 200);
    }
}
