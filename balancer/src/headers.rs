//! The header rewriting of a proxy.
//!
//! Hop-by-hop headers describe one connection, not the message, so a proxy
//! must not forward them (RFC 9110, section 7.6.1): `Connection` and every
//! header it names, plus `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
//! `Transfer-Encoding`, `Upgrade`, `Proxy-Authorization` and
//! `Proxy-Authenticate`. Each message is framed anew on its way out
//! (`spike_http1::encode`), so dropping `Transfer-Encoding` loses nothing.
//! They are removed in both directions, by
//! `spike_http1::fields::Fields::remove_hop_by_hop`.
//!
//! A proxy adds itself to `Via` (RFC 9110, section 7.6.3), and the client's
//! address to `X-Forwarded-For`, with `X-Forwarded-Proto` and
//! `X-Forwarded-Host`: appended to what a trusted proxy in front sent,
//! replacing what anyone else claims.

use std::net::{IpAddr, SocketAddr};

use http::Version;
use http::header::{self, HeaderName, HeaderValue};
use ipnet::IpNet;
use spike_http1::fields::{Fields, Known};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends this proxy, named `spike`, to `Via`, as received over `version`.
pub fn add_via(headers: &mut Fields, version: Version) {
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
pub fn forwarded(headers: &mut Fields, client: &ClientAddr, trusted: bool) {
    let (proto, host) = if trusted {
        append_forwarded_for(headers, client);
        (
            headers.contains_key(Known::X_FORWARDED_PROTO),
            headers.contains_key(Known::X_FORWARDED_HOST),
        )
    } else {
        for claimed in [
            Known::X_FORWARDED_FOR,
            Known::X_FORWARDED_PROTO,
            Known::X_FORWARDED_HOST,
        ] {
            headers.remove(claimed);
        }
        headers.append(X_FORWARDED_FOR, client.forwarded_for.clone());
        (false, false)
    };
    if !proto {
        headers.append(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !host {
        headers.append_copy(X_FORWARDED_HOST, Known::HOST);
    }
}

/// The address a request comes from, for per-client limits: the peer's,
/// unless the peer is a trusted proxy; then the nearest address of the
/// `X-Forwarded-For` chain that is not itself a trusted proxy (read from
/// the right, as each proxy appends), or the farthest if all are.
pub fn original_client(headers: &Fields, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<_> = headers.get_all(Known::X_FORWARDED_FOR).collect();
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
fn append_forwarded_for(headers: &mut Fields, client: &ClientAddr) {
    let mut chain = Vec::new();
    for value in headers.get_all(Known::X_FORWARDED_FOR) {
        chain.extend_from_slice(value.as_bytes());
        chain.extend_from_slice(b", ");
    }
    if chain.is_empty() {
        headers.append(X_FORWARDED_FOR, client.forwarded_for.clone());
        return;
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

    fn headers(pairs: &[(&str, &str)]) -> Fields {
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
        assert_eq!(map.get("x-forwarded-for").unwrap(), "10.0.0.1");
        assert_eq!(map.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(map.get("x-forwarded-host").unwrap(), "shop.example");
    }

    #[test]
    fn a_trusted_proxy_keeps_what_it_sent() {
        let mut map = headers(&[("x-forwarded-proto", "https"), ("host", "shop.example")]);
        forwarded(
            &mut map,
            &ClientAddr::new("127.0.0.1:5000".parse().unwrap()),
            true,
        );
        assert_eq!(map.get("x-forwarded-for").unwrap(), "127.0.0.1");
        assert_eq!(map.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(map.get("x-forwarded-host").unwrap(), "shop.example");
    }

    #[test]
    fn forwarded_for_appends_to_the_chain() {
        let mut map = headers(&[
            ("x-forwarded-for", "1.1.1.1, 2.2.2.2"),
            ("x-forwarded-for", "3.3.3.3"),
        ]);
        append_forwarded_for(&mut map, &ClientAddr::new("[::1]:5000".parse().unwrap()));
        assert_eq!(
            map.get("x-forwarded-for").unwrap(),
            "1.1.1.1, 2.2.2.2, 3.3.3.3, ::1"
        );
        assert_eq!(map.get_all("x-forwarded-for").count(), 1);
    }

    #[test]
    fn via_names_the_protocol_received() {
        let mut map = headers(&[("via", "1.1 edge")]);
        add_via(&mut map, Version::HTTP_10);
        let via: Vec<_> = map.get_all("via").collect();
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
            original_client(&Fields::new(), ip("127.0.0.1"), &trusted),
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
