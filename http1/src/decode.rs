//! Reading HTTP/1.1 off the wire: request and response heads, parsed with
//! `httparse` into messages whose header fields stay where they were read
//! ([`Fields`]: no copy), and bodies, decoded by their framing as the
//! reader asks for them.
//!
//! Heads are read as nginx reads them (a bare LF ends a line, as RFC 9112,
//! 2.2 allows a recipient to accept); inside a chunked body, where a
//! reader that accepted a bare LF would disagree with one that did not on
//! where the body ends, every line must end in CRLF (RFC 9112, 7.1).

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use http_body::{Frame, SizeHint};

use crate::fields::{Field, Fields};
use crate::framing::BodyLength;
use crate::message::{Request, Response};

/// The most header fields a response head or a trailer section may have.
pub const MAX_HEADERS: usize = 100;
/// The largest response head, or trailer section, accepted.
pub const MAX_HEAD: usize = 400 * 1024;
/// The longest chunk-size line (with its extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

/// Why a head could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the head is over {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    #[error("a malformed head: {0}")]
    Malformed(&'static str),
}

impl From<httparse::Error> for HeadError {
    fn from(err: httparse::Error) -> Self {
        HeadError::Malformed(match err {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Status => "invalid status",
            httparse::Error::Token => "invalid token",
            httparse::Error::TooManyHeaders => "too many headers",
            httparse::Error::Version => "invalid HTTP version",
        })
    }
}

/// How large a request head may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The request line and the header fields together.
    pub bytes: usize,
    pub headers: usize,
}

/// Where each header field's name and value lie in a head, with room for
/// the few a proxy adds (`Via` and the three `X-Forwarded-*`).
type Spans = Vec<Field>;

/// Parses a request head off the front of `buf`: `None` while it is
/// incomplete. An empty line before the request line is skipped (RFC 9112,
/// 2.2).
pub fn parse_request(
    buf: &mut BytesMut,
    limits: HeadLimits,
) -> Result<Option<Request<()>>, HeadError> {
    while buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
        buf.advance(if buf[0] == b'\r' { 2 } else { 1 });
    }
    let parsed = if limits.headers <= MAX_HEADERS {
        let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        request_head(buf, &mut slots[..limits.headers], limits)?
    } else {
        let mut slots: Vec<_> = (0..limits.headers).map(|_| MaybeUninit::uninit()).collect();
        request_head(buf, &mut slots, limits)?
    };
    let Some(parsed) = parsed else {
        return Ok(None);
    };
    let head = buf.split_to(parsed.len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(parsed.target))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    Ok(Some(Request::from_head(
        parsed.method,
        uri,
        version(parsed.minor),
        Fields::received(head, parsed.spans),
        (),
    )))
}

/// A request head as parsed, by offsets into the buffer.
struct ParsedRequest {
    len: usize,
    method: Method,
    target: Range<usize>,
    minor: u8,
    spans: Spans,
}

fn request_head<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
    limits: HeadLimits,
) -> Result<Option<ParsedRequest>, HeadError> {
    // Fields are found by 32-bit offsets into their head, whatever limit
    // the settings allow.
    let most = limits.bytes.min(u32::MAX as usize);
    let mut request = httparse::Request::new(&mut []);
    let status = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        slots,
    );
    let len = match status {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > most => {
            return Err(HeadError::TooLarge(most));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooManyHeaders(limits.headers));
        }
        Err(err) => return Err(err.into()),
    };
    if len > most {
        return Err(HeadError::TooLarge(most));
    }
    let base = buf.as_ptr() as usize;
    let method = Method::from_bytes(request.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let target = request.path.unwrap_or_default();
    let start = target.as_ptr() as usize - base;
    Ok(Some(ParsedRequest {
        len,
        method,
        target: start..start + target.len(),
        minor: request.version.unwrap_or_default(),
        // As nginx does: a proxy or an application that maps `-` and `_`
        // to the same name (CGI does) could read `Transfer_Encoding` as
        // `Transfer-Encoding`.
        spans: spans(buf, request.headers, true),
    }))
}

/// Where the fields parsed from `buf` lie: those whose names hold `_` left
/// out if `drop_underscored`.
fn spans(buf: &[u8], fields: &[httparse::Header<'_>], drop_underscored: bool) -> Spans {
    let base = buf.as_ptr() as usize;
    // Offsets within a head of at most a few hundred kilobytes.
    let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
    let mut spans = Vec::with_capacity(fields.len() + 4);
    let kept = fields
        .iter()
        .filter(|field| !(drop_underscored && field.name.as_bytes().contains(&b'_')));
    spans.extend(kept.map(|field| {
        let (name, value) = (field.name.as_bytes(), field.value);
        let name_start = offset(name);
        // An empty value is placed right after the colon that follows the
        // name, wherever the parser's empty slice points.
        let value_start = if value.is_empty() {
            name_start + name.len() as u32 + 1
        } else {
            offset(value)
        };
        Field::received(
            buf,
            [
                name_start,
                name_start + name.len() as u32,
                value_start,
                value_start + value.len() as u32,
            ],
        )
    }));
    spans
}

fn version(minor: u8) -> Version {
    if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    }
}

/// Parses a final response head off the front of `buf`: `None` while it is
/// incomplete. Interim (1xx) responses are consumed and passed over; a
/// protocol upgrade (101) is refused: nothing here switches protocols.
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<Response<()>>, HeadError> {
    loop {
        let parsed = {
            let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
            response_head(buf, &mut slots)?
        };
        let Some(parsed) = parsed else {
            return Ok(None);
        };
        if (100..200).contains(&parsed.code) {
            if parsed.code == 101 {
                return Err(HeadError::Malformed("a protocol upgrade"));
            }
            buf.advance(parsed.len);
            continue;
        }
        let status = StatusCode::from_u16(parsed.code)
            .map_err(|_| HeadError::Malformed("invalid status"))?;
        let head = buf.split_to(parsed.len).freeze();
        let reason = parsed.reason.map(|reason| head.slice(reason));
        return Ok(Some(Response::from_head(
            status,
            version(parsed.minor),
            reason,
            Fields::received(head, parsed.spans),
            (),
        )));
    }
}

/// A response head as parsed, by offsets into the buffer.
struct ParsedResponse {
    len: usize,
    code: u16,
    minor: u8,
    /// The reason phrase, if it is not the status code's usual one.
    reason: Option<Range<usize>>,
    spans: Spans,
}

fn response_head<'b>(
    buf: &'b [u8],
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<ParsedResponse>, HeadError> {
    let mut response = httparse::Response::new(&mut []);
    let status = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        slots,
    );
    let len = match status {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(HeadError::TooLarge(MAX_HEAD));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::TooManyHeaders(MAX_HEADERS));
        }
        Err(err) => return Err(err.into()),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge(MAX_HEAD));
    }
    let base = buf.as_ptr() as usize;
    let code = response.code.unwrap_or_default();
    let reason = response
        .reason
        .filter(|reason| {
            !reason.is_empty()
                && StatusCode::from_u16(code)
                    .ok()
                    .and_then(|status| status.canonical_reason())
                    != Some(*reason)
        })
        .map(|reason| {
            let start = reason.as_ptr() as usize - base;
            start..start + reason.len()
        });
    Ok(Some(ParsedResponse {
        len,
        code,
        minor: response.version.unwrap_or_default(),
        reason,
        spans: spans(buf, response.headers, false),
    }))
}

/// Why a body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a malformed chunked body")]
    Chunked,
    #[error("the connection closed before the body was complete")]
    Incomplete,
}

/// Where the decoding of a body stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    /// This many bytes are still to come.
    Length(u64),
    Chunked {
        state: Chunked,
        /// The largest trailer section accepted.
        trailer_limit: usize,
    },
    /// Everything until the sender closes the connection.
    UntilClose,
    /// The body has ended.
    Done,
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk, with this much of it to come.
    Data(u64),
    /// At the CRLF that ends a chunk's data.
    DataEnd,
    /// At the trailer section after the last chunk, this much of it
    /// already read as whole lines.
    Trailers { scanned: usize },
}

impl Decoder {
    pub fn new(length: BodyLength) -> Self {
        match length {
            BodyLength::Empty => Decoder::Done,
            BodyLength::Length(n) => Decoder::Length(n),
            BodyLength::Chunked => Decoder::Chunked {
                state: Chunked::Size,
                trailer_limit: MAX_HEAD,
            },
            BodyLength::UntilClose => Decoder::UntilClose,
        }
    }

    /// The same, accepting a trailer section of at most `limit` bytes (a
    /// server holds a client's trailers to its limit on heads).
    pub fn limit_trailers(self, limit: usize) -> Self {
        match self {
            Decoder::Chunked { state, .. } => Decoder::Chunked {
                state,
                trailer_limit: limit,
            },
            other => other,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, Decoder::Done)
    }

    /// Whether the body's end is known without the connection closing.
    pub fn is_delimited(&self) -> bool {
        !matches!(self, Decoder::UntilClose)
    }

    /// The next frame of the body from what `buf` holds: `None` when more
    /// must be read first, or when the body has ended ([`Self::is_done`]).
    /// Data frames are slices of `buf`; what follows the body stays in it.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, DecodeError> {
        match self {
            Decoder::Done => Ok(None),
            _ if buf.is_empty() => Ok(None),
            Decoder::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = Decoder::Done;
                }
                Ok(Some(Frame::data(buf.split_to(n as usize).freeze())))
            }
            Decoder::UntilClose => Ok(Some(Frame::data(buf.split().freeze()))),
            Decoder::Chunked { .. } => self.decode_chunked(buf),
        }
    }

    /// The sender closed the connection: the end of a body that runs until
    /// then, and a cut for any other.
    pub fn closed(&mut self) -> Result<(), DecodeError> {
        match self {
            Decoder::Done => Ok(()),
            Decoder::UntilClose => {
                *self = Decoder::Done;
                Ok(())
            }
            _ => Err(DecodeError::Incomplete),
        }
    }

    pub fn size_hint(&self) -> SizeHint {
        match *self {
            Decoder::Length(left) => SizeHint::with_exact(left),
            Decoder::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    fn decode_chunked(&mut self, buf: &mut BytesMut) -> Result<Option<Frame<Bytes>>, DecodeError> {
        loop {
            let Decoder::Chunked {
                state,
                trailer_limit,
            } = self
            else {
                return Ok(None);
            };
            match state {
                Chunked::Size => {
                    let Some(end) = line_end(buf, MAX_CHUNK_LINE)? else {
                        return Ok(None);
                    };
                    let line = &buf[..end];
                    let digits = line
                        .iter()
                        .position(|b| !b.is_ascii_hexdigit())
                        .unwrap_or(line.len());
                    // After the size: nothing, or extensions (ignored)
                    // after optional spaces and tabs, with no control
                    // character but tab.
                    let start = line[digits..]
                        .iter()
                        .position(|&b| b != b' ' && b != b'\t')
                        .map_or(line.len(), |i| digits + i);
                    let rest = &line[start..];
                    if digits == 0
                        || digits > 15
                        || !(rest.is_empty() || rest[0] == b';')
                        || rest.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f)
                    {
                        return Err(DecodeError::Chunked);
                    }
                    let size = line[..digits].iter().fold(0u64, |n, &d| {
                        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
                    });
                    buf.advance(end + 2);
                    *state = if size == 0 {
                        Chunked::Trailers { scanned: 0 }
                    } else {
                        Chunked::Data(size)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    let n = (*left).min(buf.len() as u64);
                    *left -= n;
                    if *left == 0 {
                        *state = Chunked::DataEnd;
                    }
                    return Ok(Some(Frame::data(buf.split_to(n as usize).freeze())));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(None);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(DecodeError::Chunked);
                    }
                    buf.advance(2);
                    *state = Chunked::Size;
                }
                Chunked::Trailers { scanned } => {
                    let Some(end) = trailer_section_end(buf, scanned, *trailer_limit)? else {
                        return Ok(None);
                    };
                    let trailers = parse_trailers(&buf[..end])?;
                    buf.advance(end);
                    *self = Decoder::Done;
                    return Ok((!trailers.is_empty()).then(|| Frame::trailers(trailers)));
                }
            }
        }
    }
}

/// Where the CRLF ending the line at the front of `buf` starts: `None` if
/// it has not arrived. A bare LF, or a line longer than `max`, is an error.
fn line_end(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(0) => Err(DecodeError::Chunked),
        Some(lf) if buf[lf - 1] != b'\r' => Err(DecodeError::Chunked),
        Some(lf) => Ok(Some(lf - 1)),
        None if buf.len() > max => Err(DecodeError::Chunked),
        None => Ok(None),
    }
}

/// The length of the trailer section at the front of `buf`, its final
/// empty line included: `None` if it has not all arrived. `scanned` is how
/// much of it was read as whole lines before (and is moved on), so that
/// each byte is looked at once; a section longer than `limit` is refused.
fn trailer_section_end(
    buf: &[u8],
    scanned: &mut usize,
    limit: usize,
) -> Result<Option<usize>, DecodeError> {
    loop {
        let Some(end) = line_end(&buf[*scanned..], limit)? else {
            if buf.len() > limit {
                return Err(DecodeError::Chunked);
            }
            return Ok(None);
        };
        *scanned += end + 2;
        if *scanned > limit {
            return Err(DecodeError::Chunked);
        }
        if end == 0 {
            return Ok(Some(*scanned));
        }
    }
}

/// The fields of a whole trailer section (every line ending in CRLF).
fn parse_trailers(section: &[u8]) -> Result<HeaderMap, DecodeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(section, &mut fields)
    else {
        return Err(DecodeError::Chunked);
    };
    let mut trailers = HeaderMap::new();
    for field in fields.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Err(DecodeError::Chunked);
        };
        trailers.append(name, value);
    }
    Ok(trailers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        bytes: 1024,
        headers: 10,
    };

    /// The request parsed from `text`, as its target (or an error).
    fn request(text: &str) -> Result<Option<String>, HeadError> {
        let parsed = parse_request(&mut BytesMut::from(text), LIMITS)?;
        Ok(parsed.map(|req| req.uri().to_string()))
    }

    #[test]
    fn a_request_head_becomes_a_request_and_leaves_the_body() {
        let mut buf =
            BytesMut::from("\r\nPOST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\nbody");
        let req = parse_request(&mut buf, LIMITS).unwrap().unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.uri(), "/a?b=1");
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.headers().get("host").unwrap(), "x");
        let values: Vec<_> = req.headers().get_all("x-a").collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&buf[..], b"body");
        let mut buf = BytesMut::from("GET / HTTP/1.0\r\n\r\n");
        let req = parse_request(&mut buf, LIMITS).unwrap().unwrap();
        assert_eq!(req.version(), Version::HTTP_10);
    }

    #[test]
    fn a_field_goes_out_as_it_came_and_an_empty_one_as_its_name() {
        let mut buf =
            BytesMut::from("GET / HTTP/1.1\r\nX-Empty:   \r\nHost:x\r\nX-A:  1 2\r\n\r\n");
        let req = parse_request(&mut buf, LIMITS).unwrap().unwrap();
        assert_eq!(req.headers().get("x-empty").unwrap(), "");
        assert_eq!(req.headers().get("x-a").unwrap(), "1 2");
        let mut out = BytesMut::new();
        req.headers().write(&mut out, |_| true);
        assert_eq!(&out[..], b"X-Empty:\r\nHost:x\r\nX-A:  1 2\r\n");
    }

    #[test]
    fn request_header_names_with_underscores_are_dropped() {
        let mut buf = BytesMut::from(
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer_Encoding: chunked\r\nx_user: a\r\nx-user: b\r\n\r\n",
        );
        let req = parse_request(&mut buf, LIMITS).unwrap().unwrap();
        let names: Vec<_> = req.headers().iter().map(|(name, _)| name).collect();
        assert_eq!(names, [&b"Host"[..], b"x-user"]);
        assert!(!req.headers().contains_key("transfer-encoding"));
    }

    #[test]
    fn an_incomplete_request_head_waits_and_an_oversized_one_is_refused() {
        assert_eq!(request("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(1100));
        assert_eq!(request(&long), Err(HeadError::TooLarge(1024)));
        let complete_but_long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(1100));
        assert_eq!(request(&complete_but_long), Err(HeadError::TooLarge(1024)));
        let many: String = (0..11).map(|i| format!("X-{i}: {i}\r\n")).collect();
        assert_eq!(
            request(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Err(HeadError::TooManyHeaders(10))
        );
    }

    #[test]
    fn malformed_request_heads_are_refused() {
        for bad in [
            "GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding : chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "G(T / HTTP/1.1\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
        ] {
            assert!(
                matches!(request(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    fn response(text: &str) -> Response<()> {
        parse_response(&mut BytesMut::from(text)).unwrap().unwrap()
    }

    #[test]
    fn interim_responses_are_passed_over() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\n\r\nbody",
        );
        let head = parse_response(&mut buf).unwrap().unwrap();
        assert_eq!(head.status(), StatusCode::CREATED);
        assert_eq!(head.headers().get("x-a").unwrap(), "1");
        assert!(!head.headers().contains_key("link"));
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn an_incomplete_response_head_waits_for_more() {
        let partial = "HTTP/1.1 200 OK\r\ncontent-le";
        let mut buf = BytesMut::from(partial);
        assert!(parse_response(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), partial.len());
    }

    #[test]
    fn an_upgrade_or_a_bad_status_is_an_error() {
        let mut upgrade = BytesMut::from("HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert!(parse_response(&mut upgrade).is_err());
        let mut garbage = BytesMut::from("HTTP/1.1 2000 OK\r\n\r\n");
        assert!(parse_response(&mut garbage).is_err());
    }

    #[test]
    fn an_unusual_reason_phrase_is_kept() {
        let sold_out = response("HTTP/1.1 409 Sold Out\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(sold_out.reason(), Some(&b"Sold Out"[..]));
        let usual = response("HTTP/1.1 404 Not Found\r\n\r\n");
        assert!(usual.reason().is_none());
    }

    /// Feeds `input` to a chunked decoder a byte at a time: the data, the
    /// trailers and what is left after the body.
    fn decode_bytewise(input: &str) -> Result<(String, Option<HeaderMap>, String), DecodeError> {
        decode_limited(input, MAX_HEAD)
    }

    fn decode_limited(
        input: &str,
        trailer_limit: usize,
    ) -> Result<(String, Option<HeaderMap>, String), DecodeError> {
        let mut decoder = Decoder::new(BodyLength::Chunked).limit_trailers(trailer_limit);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers) = (Vec::new(), None);
        for &byte in input.as_bytes() {
            buf.extend_from_slice(&[byte]);
            if decoder.is_done() {
                continue;
            }
            while let Some(frame) = decoder.decode(&mut buf)? {
                match frame.into_data() {
                    Ok(chunk) => data.extend_from_slice(&chunk),
                    Err(frame) => trailers = frame.into_trailers().ok(),
                }
            }
        }
        if !decoder.is_done() {
            return Err(DecodeError::Incomplete);
        }
        Ok((
            String::from_utf8(data).unwrap(),
            trailers,
            String::from_utf8(buf.to_vec()).unwrap(),
        ))
    }

    #[test]
    fn chunked_bodies_decode_from_any_split() {
        let (data, trailers, rest) = decode_bytewise(
            "4;name=value\r\nWiki\r\n5 ; x\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nx-sum: 7\r\n\r\nNEXT",
        )
        .unwrap();
        assert_eq!(data, "Wikipedia in\r\n\r\nchunks.");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
        assert_eq!(rest, "NEXT");
        let (data, trailers, rest) = decode_bytewise("3\r\nabc\r\n0\r\n\r\n").unwrap();
        assert_eq!((data.as_str(), trailers, rest.as_str()), ("abc", None, ""));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            "zz\r\n",
            "\r\n",
            "3\r\nabcX\r\n",
            "10000000000000000\r\n",
            "3 x\r\nabc\r\n",
            "5;x\nhello\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r;x\r\nhello\r\n",
        ] {
            assert_eq!(decode_bytewise(bad), Err(DecodeError::Chunked), "{bad:?}");
        }
    }

    #[test]
    fn a_bare_lf_in_the_trailer_section_is_an_error_not_more_trailers() {
        for bad in [
            "0\r\n\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
            "0\r\nx-sum: 7\n\r\n",
            "0\r\nx-sum: 7\r\n\n",
        ] {
            assert_eq!(decode_bytewise(bad), Err(DecodeError::Chunked), "{bad:?}");
        }
    }

    #[test]
    fn a_trailer_section_over_its_limit_is_refused() {
        let trailers: String = (0..10)
            .map(|i| format!("x-t{i}: {}\r\n", "v".repeat(20)))
            .collect();
        let body = format!("0\r\n{trailers}\r\n");
        assert!(decode_limited(&body, 1024).is_ok());
        assert_eq!(decode_limited(&body, 100), Err(DecodeError::Chunked));
    }

    #[test]
    fn a_sized_body_ends_at_its_length_and_a_cut_one_is_incomplete() {
        let mut decoder = Decoder::new(BodyLength::Length(3));
        let mut buf = BytesMut::from("abcNEXT");
        let frame = decoder.decode(&mut buf).unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(decoder.is_done());
        assert_eq!(&buf[..], b"NEXT");
        let mut cut = Decoder::new(BodyLength::Length(3));
        assert_eq!(cut.closed(), Err(DecodeError::Incomplete));
        let mut until_close = Decoder::new(BodyLength::UntilClose);
        assert_eq!(until_close.closed(), Ok(()));
        assert!(until_close.is_done());
    }
}
