//! The header rewriting of a proxy.
//!
//! Hop-by-hop headers describe one connection, not the message, so a proxy
//! must not forward them (RFC 9110, section 7.6.1): `Connection` and every
//! header it names, plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-Authorization` and
//! `Proxy-Authenticate`. Each message is framed anew on its way out
//! (`spike_http1::encode`), so dropping `Transfer-Encoding` loses nothing.
//! They are removed in both directions.
//!
//! A proxy adds itself to `Via` (RFC 9110, section 7.6.3), and the client's
//! address to `X-Forwarded-For`, with `X-Forwarded-Proto` and
//! `X-Forwarded-Host`: appended to what a trusted proxy in front sent,
//! replacing what anyone else claims.

use std::net::{IpAddr, SocketAddr};

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use spike_http1::framing::connection_options;

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers that are not named by `Connection`.
const HOP_BY_HOP: [HeaderName; 8] = [
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Removes every hop-by-hop header.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names tells what is there; most messages carry at
    // most `Connection: keep-alive`, and this runs twice per request, so
    // that case removes one header and allocates nothing.
    let mut named_by_connection = false;
    let mut others = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            named_by_connection = true;
        } else if HOP_BY_HOP.contains(name) {
            others = true;
        }
    }
    if named_by_connection {
        // The usual tokens name no header of their own (`close`) or one
        // removed anyway (`keep-alive`).
        let named: Vec<HeaderName> = connection_options(headers)
            .filter(|token| {
                !token.eq_ignore_ascii_case(b"keep-alive") && !token.eq_ignore_ascii_case(b"close")
            })
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    if others {
        for name in HOP_BY_HOP {
            headers.remove(name);
        }
    }
}

/// Appends this proxy, named `spike`, to `Via`, as received over `version`.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    let value = match version {
        Version::HTTP_10 => const { HeaderValue::from_static("1.0 spike") },
        _ => const { HeaderValue::from_static("1.1 spike") },
    };
    headers.append(header::VIA, value);
}

/// A client's address, with its text for `X-Forwarded-For` written once
/// per connection rather than once per request.
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> Self {
        // An IP address is always a valid header value.
        let forwarded_for = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            addr,
            forwarded_for,
        }
    }
}

/// Sets the `X-Forwarded-*` headers. From a `trusted` proxy, the client's
/// address is appended to the `X-Forwarded-For` chain and the proxy's
/// `X-Forwarded-Proto` and `X-Forwarded-Host` are kept; from anyone else,
/// whatever they claim is replaced by what this hop saw, so a client cannot
/// forge its address.
pub fn forwarded(headers: &mut HeaderMap, client: &ClientAddr, trusted: bool) {
    if trusted {
        append_forwarded_for(headers, client);
    } else {
        headers.insert(X_FORWARDED_FOR, client.forwarded_for.clone());
        headers.remove(X_FORWARDED_PROTO);
        headers.remove(X_FORWARDED_HOST);
    }
    if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !headers.contains_key(X_FORWARDED_HOST)
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// The address a request comes from, for per-client limits: the peer's,
/// unless the peer is a trusted proxy; then the nearest address of the
/// `X-Forwarded-For` chain that is not itself a trusted proxy (read from
/// the right, as each proxy appends), or the farthest if all are.
pub fn original_client(headers: &HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<_> = headers.get_all(&X_FORWARDED_FOR).iter().collect();
    for value in values.iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for hop in text.rsplit(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip;
            if !is_trusted(&ip) {
                return ip;
            }
        }
    }
    client
}

/// Appends the client's address to `X-Forwarded-For`, joining any values
/// already there into one comma-separated chain.
fn append_forwarded_for(headers: &mut HeaderMap, client: &ClientAddr) {
    let mut existing = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    if existing.peek().is_none() {
        headers.insert(X_FORWARDED_FOR, client.forwarded_for.clone());
        return;
    }
    let mut chain = Vec::new();
    for value in existing {
        chain.extend_from_slice(value.as_bytes());
        chain.extend_from_slice(b", ");
    }
    chain.extend_from_slice(client.forwarded_for.as_bytes());
    // Valid values joined by a comma make a valid value.
    if let Ok(value) = HeaderValue::from_bytes(&chain) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut map = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "3"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut map);
        let mut left: Vec<_> = map.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "x-kept"]);
    }

    #[test]
    fn connection_keep_alive_alone_is_removed() {
        let mut map = headers(&[("connection", "Keep-Alive"), ("host", "x")]);
        strip_hop_by_hop(&mut map);
        assert_eq!(
            map.keys().map(HeaderName::as_str).collect::<Vec<_>>(),
            ["host"]
        );
    }

    #[test]
    fn an_untrusted_client_cannot_forge_its_address() {
        let mut map = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("host", "shop.example"),
        ]);
        forwarded(
            &mut map,
            &ClientAddr::new("10.0.0.1:5000".parse().unwrap()),
            false,
        );
        assert_eq!(map["x-forwarded-for"], "10.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "http");
        assert_eq!(map["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn a_trusted_proxy_keeps_what_it_sent() {
        let mut map = headers(&[("x-forwarded-proto", "https"), ("host", "shop.example")]);
        forwarded(
            &mut map,
            &ClientAddr::new("127.0.0.1:5000".parse().unwrap()),
            true,
        );
        assert_eq!(map["x-forwarded-for"], "127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "https");
        assert_eq!(map["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn forwarded_for_appends_to_the_chain() {
        let mut map = headers(&[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        append_forwarded_for(&mut map, &ClientAddr::new("[::1]:5000".parse().unwrap()));
        assert_eq!(map["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, ::1");
        assert_eq!(map.get_all("x-forwarded-for").iter().count(), 1);
    }

    #[test]
    fn via_names_the_protocol_received() {
        let mut map = headers(&[("via", "1.1 edge")]);
        add_via(&mut map, Version::HTTP_10);
        let via: Vec<_> = map.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 edge", "1.0 spike"]);
    }

    #[test]
    fn the_original_client_is_the_nearest_untrusted_hop() {
        let trusted: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = |chain: &str| headers(&[("x-forwarded-for", chain)]);
        // An untrusted peer is the client, whatever it claims.
        assert_eq!(
            original_client(&xff("1.1.1.1"), ip("203.0.113.7"), &trusted),
            ip("203.0.113.7")
        );
        // Through trusted proxies, the nearest hop they did not add.
        let chain = xff("6.6.6.6, 203.0.113.9, 10.0.0.2");
        assert_eq!(
            original_client(&chain, ip("127.0.0.1"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            original_client(&HeaderMap::new(), ip("127.0.0.1"), &trusted),
            ip("127.0.0.1")
        );
        assert_eq!(
            original_client(&xff("10.0.0.3, 10.0.0.2"), ip("127.0.0.1"), &trusted),
            ip("10.0.0.3")
        );
        // A hop that is not an address ends the walk where it is.
        assert_eq!(
            original_client(&xff("junk, 10.0.0.2"), ip("127.0.0.1"), &trusted),
            ip("10.0.0.2")
        );
    }
}
