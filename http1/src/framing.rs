//! How an HTTP/1.1 message says where its body ends, and whether its
//! connection stays open: the one set of rules that requests from clients
//! and responses from upstreams both go through (RFC 9112, section 6,
//! "Message Body", and section 9.3, "Persistence").
//!
//! A message's body is framed by `Transfer-Encoding`, or else by
//! `Content-Length`, or else (a response only) by the end of the
//! connection. Whatever a sender could mean two ways is refused, because
//! two readers of the same bytes (a proxy in front, this one, a node
//! behind) must never disagree on where a message ends; that disagreement
//! is request smuggling:
//!
//! - `Transfer-Encoding` in HTTP/1.0, which has no transfer codings (6.1);
//! - a `Transfer-Encoding` whose final coding is not `chunked` (6.3, item
//!   4): its length cannot be known;
//! - a coding other than `chunked` at all, or `chunked` twice: nothing here
//!   undoes another coding, and the header goes with the hop, so the body
//!   would reach the next hop coded and unnamed (nginx answers 501);
//! - a `Content-Length` that is not a plain decimal number (6.3, item 5).
//!
//! `Transfer-Encoding` beside `Content-Length` is framed by the coding; the
//! length is removed, as a proxy must before forwarding (6.3, item 3), and
//! the connection is not trusted with another message.
//!
//! Requests and responses differ in one respect, the [`Role`]: a response
//! may repeat the same `Content-Length` (RFC 9110, 8.6, lets a recipient
//! accept `42, 42`), while a request may not, as nginx refuses it.

use http::Version;

use crate::fields::{Fields, Known};

/// Which kind of message the rules apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A request from a client: strict on repeated lengths.
    Request,
    /// A response from an upstream: a repeated, identical length is taken
    /// as one.
    Response,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body.
    Empty,
    /// Exactly this many bytes (never 0: that is `Empty`).
    Length(u64),
    /// The chunked coding.
    Chunked,
    /// Everything until the sender closes the connection (responses only).
    UntilClose,
}

/// The framing of a message's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub length: BodyLength,
    /// `Transfer-Encoding` and `Content-Length` both came (the length is
    /// removed): the connection carries no further message.
    pub ambiguous: bool,
}

/// A framing that the rules refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("a malformed Content-Length")]
    MalformedLength,
    #[error("more than one Content-Length")]
    RepeatedLength,
    #[error("Transfer-Encoding in HTTP/1.0")]
    CodingInHttp10,
    #[error("a Transfer-Encoding whose final coding is not chunked")]
    ChunkedNotFinal,
    #[error("a transfer coding other than chunked")]
    UnsupportedCoding,
}

impl FramingError {
    /// Whether a request refused for this is answered 501 (Not
    /// Implemented) rather than 400: it is well formed, but asks for a
    /// coding nothing here implements (RFC 9112, 6.1).
    pub fn is_unsupported(self) -> bool {
        self == FramingError::UnsupportedCoding
    }
}

/// The framing of a message of `role` and `version` with these headers.
/// The caller has already ruled out messages that have no body whatever
/// their headers say (a response to HEAD, 1xx, 204, 304). A
/// `Content-Length` beside `Transfer-Encoding` is removed from `headers`.
pub fn body_framing(
    role: Role,
    version: Version,
    headers: &mut Fields,
) -> Result<Framing, FramingError> {
    if headers.contains_key(Known::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(FramingError::CodingInHttp10);
        }
        let (mut codings, mut chunked_last) = (0, false);
        for coding in headers
            .get_all(Known::TRANSFER_ENCODING)
            .flat_map(|value| list(value.as_bytes()))
        {
            codings += 1;
            chunked_last = coding.eq_ignore_ascii_case(b"chunked");
        }
        if !chunked_last {
            return Err(FramingError::ChunkedNotFinal);
        }
        if codings > 1 {
            return Err(FramingError::UnsupportedCoding);
        }
        let ambiguous = headers.remove(Known::CONTENT_LENGTH);
        return Ok(Framing {
            length: BodyLength::Chunked,
            ambiguous,
        });
    }
    let length = match content_length(role, headers)? {
        None if role == Role::Response => BodyLength::UntilClose,
        None | Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Length(n),
    };
    Ok(Framing {
        length,
        ambiguous: false,
    })
}

/// The `Content-Length` of a message, if it has one.
fn content_length(role: Role, headers: &Fields) -> Result<Option<u64>, FramingError> {
    let mut length = None;
    for value in headers.get_all(Known::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or(FramingError::MalformedLength)?;
            match length {
                None => length = Some(n),
                Some(seen) if seen == n && role == Role::Response => {}
                Some(_) => return Err(FramingError::RepeatedLength),
            }
        }
    }
    Ok(length)
}

/// A plain decimal number, as `Content-Length` and status codes are
/// written: no sign, no spaces, no more digits than a `u64` holds.
pub fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The members of a comma-separated header value, trimmed, empty ones
/// skipped (RFC 9110, 5.6.1).
pub(crate) fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|member| !member.is_empty())
}

/// The options of every `Connection` header of a message, trimmed (RFC
/// 9110, 7.6.1).
pub fn connection_options(headers: &Fields) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(Known::CONNECTION)
        .flat_map(|value| list(value.as_bytes()))
}

/// Whether the sender of a message of `version` with these headers keeps
/// its connection open after it (RFC 9112, 9.3): never if it says `close`;
/// else in HTTP/1.1, and in HTTP/1.0 only if it says `keep-alive`.
pub fn keeps_alive(version: Version, headers: &Fields) -> bool {
    let options = headers.connection();
    !options.close && (version != Version::HTTP_10 || options.keep_alive)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use http::header;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Fields {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    fn framing(
        role: Role,
        version: Version,
        pairs: &[(&str, &str)],
    ) -> Result<Framing, FramingError> {
        body_framing(role, version, &mut headers(pairs))
    }

    const ROLES: [Role; 2] = [Role::Request, Role::Response];
    const V11: Version = Version::HTTP_11;

    #[test]
    fn a_length_frames_the_body_and_must_be_plain_digits() {
        for role in ROLES {
            let length = framing(role, V11, &[("content-length", "5")]).unwrap();
            assert_eq!(length.length, BodyLength::Length(5));
            assert_eq!(
                framing(role, V11, &[("content-length", "0")])
                    .unwrap()
                    .length,
                BodyLength::Empty
            );
            for bad in ["+5", "0x5", "-1", "", "5 5", "99999999999999999999"] {
                assert_eq!(
                    framing(role, V11, &[("content-length", bad)]),
                    Err(FramingError::MalformedLength),
                    "{bad:?}"
                );
            }
            assert_eq!(
                framing(
                    role,
                    V11,
                    &[("content-length", "5"), ("content-length", "6")]
                ),
                Err(FramingError::RepeatedLength)
            );
        }
    }

    #[test]
    fn a_repeated_identical_length_is_one_in_a_response_only() {
        let same = [("content-length", "5, 5"), ("content-length", "5")];
        assert_eq!(
            framing(Role::Response, V11, &same).unwrap().length,
            BodyLength::Length(5)
        );
        assert_eq!(
            framing(Role::Request, V11, &same),
            Err(FramingError::RepeatedLength)
        );
        assert_eq!(
            framing(
                Role::Request,
                V11,
                &[("content-length", "5"), ("content-length", "5")]
            ),
            Err(FramingError::RepeatedLength)
        );
    }

    #[test]
    fn without_a_length_a_request_has_no_body_and_a_response_runs_to_the_close() {
        assert_eq!(
            framing(Role::Request, V11, &[]).unwrap().length,
            BodyLength::Empty
        );
        assert_eq!(
            framing(Role::Response, V11, &[]).unwrap().length,
            BodyLength::UntilClose
        );
    }

    #[test]
    fn chunked_must_be_the_only_coding_and_http_1_0_has_none() {
        for role in ROLES {
            let chunked = framing(role, V11, &[("transfer-encoding", "Chunked")]).unwrap();
            assert_eq!(chunked.length, BodyLength::Chunked);
            assert!(!chunked.ambiguous);
            for not_final in ["chunked, identity", "\"chunked\"", "gzip", ""] {
                assert_eq!(
                    framing(role, V11, &[("transfer-encoding", not_final)]),
                    Err(FramingError::ChunkedNotFinal),
                    "{not_final:?}"
                );
            }
            for other in ["gzip, chunked", "chunked, chunked"] {
                assert_eq!(
                    framing(role, V11, &[("transfer-encoding", other)]),
                    Err(FramingError::UnsupportedCoding),
                    "{other:?}"
                );
            }
            assert_eq!(
                framing(
                    role,
                    V11,
                    &[
                        ("transfer-encoding", "gzip"),
                        ("transfer-encoding", "chunked")
                    ]
                ),
                Err(FramingError::UnsupportedCoding)
            );
            assert_eq!(
                framing(role, Version::HTTP_10, &[("transfer-encoding", "chunked")]),
                Err(FramingError::CodingInHttp10)
            );
        }
        assert!(FramingError::UnsupportedCoding.is_unsupported());
        assert!(!FramingError::ChunkedNotFinal.is_unsupported());
    }

    #[test]
    fn a_length_beside_chunked_is_removed_and_the_framing_marked_ambiguous() {
        for role in ROLES {
            let mut map = headers(&[("transfer-encoding", "chunked"), ("content-length", "3")]);
            let both = body_framing(role, V11, &mut map).unwrap();
            assert_eq!(both.length, BodyLength::Chunked);
            assert!(both.ambiguous);
            assert!(!map.contains_key(header::CONTENT_LENGTH));
        }
    }

    #[test]
    fn keep_alive_depends_on_the_version_and_the_connection_options() {
        assert!(keeps_alive(V11, &headers(&[])));
        assert!(!keeps_alive(V11, &headers(&[("connection", "x, Close")])));
        assert!(!keeps_alive(Version::HTTP_10, &headers(&[])));
        assert!(keeps_alive(
            Version::HTTP_10,
            &headers(&[("connection", "Keep-Alive")])
        ));
        assert!(!keeps_alive(
            Version::HTTP_10,
            &headers(&[("connection", "keep-alive, close")])
        ));
        let map = headers(&[("connection", " a ,, b"), ("connection", "c")]);
        let options: Vec<_> = connection_options(&map).collect();
        assert_eq!(options, [&b"a"[..], b"b", b"c"]);
    }
}
