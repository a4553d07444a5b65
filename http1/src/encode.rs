//! Writing HTTP/1.1: a request head toward an upstream, a response head
//! toward a client, and a body framed by its length or chunked (RFC 9112,
//! 7.1), its data passed on as it came.
//!
//! Both directions re-frame what they forward: a message goes out with the
//! framing written here, never with the framing headers it came with, so
//! bytes a sender framed one way cannot reach the next hop framed another.

use std::cell::RefCell;
use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue};
use http::{StatusCode, Version};

use crate::fields::{Fields, Known};
use crate::io::Outgoing;
use crate::message::Request;

/// How a body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Exactly this many bytes are still due (a `Content-Length`).
    Length(u64),
    /// Chunked.
    Chunked,
    /// As it comes, ended by closing the connection (to an HTTP/1.0 client
    /// when the length is not known).
    UntilClose,
}

/// Why a body could not be written as framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the body does not match its Content-Length")]
pub struct LengthMismatch;

/// A body on its way out, framed as it was announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyEncoder {
    framing: BodyFraming,
}

impl BodyEncoder {
    pub fn new(framing: BodyFraming) -> Self {
        Self { framing }
    }

    /// Whether the announced length has all gone out: a body of known
    /// length is done then, whether or not its source has said so yet.
    pub fn is_complete(&self) -> bool {
        self.framing == BodyFraming::Length(0)
    }

    /// Queues one piece of data.
    pub(crate) fn data(&mut self, data: Bytes, out: &mut Outgoing) -> Result<(), LengthMismatch> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            BodyFraming::Length(due) => {
                *due = due.checked_sub(data.len() as u64).ok_or(LengthMismatch)?;
                out.push(data);
            }
            BodyFraming::Chunked => {
                out.push(Bytes::from(format!("{:x}\r\n", data.len())));
                out.push(data);
                out.push(Bytes::from_static(b"\r\n"));
            }
            BodyFraming::UntilClose => out.push(data),
        }
        Ok(())
    }

    /// Queues the end of the body, with `trailers` if it is chunked.
    pub(crate) fn finish(
        &mut self,
        trailers: Option<&HeaderMap>,
        out: &mut Outgoing,
    ) -> Result<(), LengthMismatch> {
        match self.framing {
            BodyFraming::Length(0) | BodyFraming::UntilClose => Ok(()),
            BodyFraming::Length(_) => Err(LengthMismatch),
            BodyFraming::Chunked => {
                match trailers.filter(|trailers| !trailers.is_empty()) {
                    None => out.push(Bytes::from_static(b"0\r\n\r\n")),
                    Some(trailers) => {
                        let mut section = BytesMut::from(&b"0\r\n"[..]);
                        for (name, value) in trailers {
                            write_field(&mut section, name.as_str().as_bytes(), value.as_bytes());
                        }
                        section.put_slice(b"\r\n");
                        out.push(section.freeze());
                    }
                }
                Ok(())
            }
        }
    }
}

/// Writes the request line and header fields of `req` into `out`, in
/// HTTP/1.1 and origin form, with `Transfer-Encoding: chunked` if the body
/// goes out chunked (the caller removed the framing headers it came with,
/// but a checked `Content-Length`).
pub fn request_head<B>(out: &mut BytesMut, req: &Request<B>, chunked: bool) {
    out.put_slice(req.method().as_str().as_bytes());
    out.put_u8(b' ');
    let target = req.uri().path_and_query().map_or("/", |path| path.as_str());
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    req.headers().write(out, |_| true);
    if chunked {
        out.put_slice(b"transfer-encoding: chunked\r\n");
    }
    out.put_slice(b"\r\n");
}

/// How a response head is to frame its body and its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFraming {
    /// The body's framing; `None` when no body follows whatever the
    /// headers say (HEAD, 204, 304), which are then left as they are.
    pub body: Option<BodyFraming>,
    /// Whether the connection stays open after this response.
    pub keep_alive: bool,
    /// The client's version: an HTTP/1.0 client is told `keep-alive`.
    pub client: Version,
}

/// Writes a response head into `out`: the status line (always HTTP/1.1,
/// as nginx answers HTTP/1.0 clients too), the header fields but
/// `Connection` and the framing ones, then the framing, `Connection` and
/// `Date` as this server decides them.
pub fn response_head(
    out: &mut BytesMut,
    status: StatusCode,
    reason: Option<&[u8]>,
    headers: &Fields,
    framing: ResponseFraming,
) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    match reason {
        Some(reason) => out.put_slice(reason),
        None => out.put_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.put_slice(b"\r\n");
    let mut dated = false;
    headers.write(out, |known| {
        let framing_field = framing.body.is_some()
            && matches!(
                known,
                Some(Known::CONTENT_LENGTH | Known::TRANSFER_ENCODING)
            );
        dated |= known == Some(Known::DATE);
        known != Some(Known::CONNECTION) && !framing_field
    });
    match framing.body {
        Some(BodyFraming::Length(length)) => {
            let mut digits = [0; 20];
            write_field(out, b"content-length", decimal(&mut digits, length));
        }
        Some(BodyFraming::Chunked) => write_field(out, b"transfer-encoding", b"chunked"),
        Some(BodyFraming::UntilClose) | None => {}
    }
    if !framing.keep_alive {
        write_field(out, b"connection", b"close");
    } else if framing.client == Version::HTTP_10 {
        write_field(out, b"connection", b"keep-alive");
    }
    if !dated {
        DATE.with(|date| write_field(out, b"date", date.borrow_mut().now().as_bytes()));
    }
    out.put_slice(b"\r\n");
}

fn write_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[at..];
        }
    }
}

thread_local! {
    /// This thread's `Date` value, made again once a second.
    static DATE: RefCell<CachedDate> = RefCell::new(CachedDate::default());
}

/// An HTTP date (RFC 9110, 5.6.7), as `Date` carries it.
#[derive(Debug, Default)]
struct CachedDate {
    second: u64,
    value: Option<HeaderValue>,
}

impl CachedDate {
    fn now(&mut self) -> &HeaderValue {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        if self.value.is_none() || self.second != second {
            self.second = second;
            let text = httpdate::fmt_http_date(now);
            self.value = HeaderValue::try_from(text).ok();
        }
        self.value
            .get_or_insert(HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
    }
}

#[cfg(test)]
mod tests {
    use http::header::{HOST, HeaderName};
    use http::{Method, Uri};

    use super::*;

    fn queued(out: &mut Outgoing) -> String {
        let mut text = Vec::new();
        while let Some(bytes) = out.pop() {
            text.extend_from_slice(&bytes);
        }
        String::from_utf8(text).unwrap()
    }

    #[test]
    fn a_chunked_body_is_framed_chunk_by_chunk_and_ended_with_its_trailers() {
        let mut out = Outgoing::default();
        let mut body = BodyEncoder::new(BodyFraming::Chunked);
        body.data(Bytes::from_static(b"hello"), &mut out).unwrap();
        body.data(Bytes::new(), &mut out).unwrap();
        body.data(Bytes::from(vec![b'x'; 17]), &mut out).unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        body.finish(Some(&trailers), &mut out).unwrap();
        assert_eq!(
            queued(&mut out),
            format!(
                "5\r\nhello\r\n11\r\n{}\r\n0\r\nx-sum: 7\r\n\r\n",
                "x".repeat(17)
            )
        );
    }

    #[test]
    fn a_sized_body_must_match_its_length() {
        let mut out = Outgoing::default();
        let mut body = BodyEncoder::new(BodyFraming::Length(5));
        body.data(Bytes::from_static(b"hel"), &mut out).unwrap();
        assert_eq!(body.finish(None, &mut out), Err(LengthMismatch));
        body.data(Bytes::from_static(b"lo"), &mut out).unwrap();
        assert!(body.is_complete());
        assert_eq!(
            body.data(Bytes::from_static(b"!"), &mut out),
            Err(LengthMismatch)
        );
        assert_eq!(body.finish(None, &mut out), Ok(()));
        assert_eq!(queued(&mut out), "hello");
    }

    #[test]
    fn a_response_head_carries_the_framing_and_connection_decided_here() {
        let mut headers = Fields::new();
        headers.insert(
            HeaderName::from_static("content-type"),
            HeaderValue::from_static("text/plain"),
        );
        headers.insert(
            HeaderName::from_static("content-length"),
            HeaderValue::from_static("999"),
        );
        headers.insert(
            HeaderName::from_static("connection"),
            HeaderValue::from_static("x-secret"),
        );
        headers.insert(
            HeaderName::from_static("date"),
            HeaderValue::from_static("today"),
        );
        let mut out = BytesMut::new();
        let framing = ResponseFraming {
            body: Some(BodyFraming::Length(12)),
            keep_alive: true,
            client: Version::HTTP_10,
        };
        response_head(&mut out, StatusCode::OK, None, &headers, framing);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: today\r\n\
              content-length: 12\r\nconnection: keep-alive\r\n\r\n"
        );
        let mut out = BytesMut::new();
        let closing = ResponseFraming {
            body: None,
            keep_alive: false,
            client: Version::HTTP_11,
        };
        response_head(
            &mut out,
            StatusCode::CONFLICT,
            Some(&b"Sold Out"[..]),
            &headers,
            closing,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Sold Out\r\n"), "{text}");
        assert!(
            text.contains("content-length: 999\r\n"),
            "HEAD keeps it: {text}"
        );
        assert!(text.ends_with("connection: close\r\n\r\n"), "{text}");
    }

    #[test]
    fn a_date_is_added_when_the_reply_has_none() {
        let mut out = BytesMut::new();
        let framing = ResponseFraming {
            body: Some(BodyFraming::Chunked),
            keep_alive: true,
            client: Version::HTTP_11,
        };
        response_head(&mut out, StatusCode::OK, None, &Fields::new(), framing);
        let text = String::from_utf8(out.to_vec()).unwrap();
        let date = text
            .lines()
            .find_map(|line| line.strip_prefix("date: "))
            .unwrap();
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
        assert!(text.contains("transfer-encoding: chunked\r\n"));
    }

    #[test]
    fn a_request_head_goes_out_in_origin_form() {
        let mut req = Request::new(
            Method::POST,
            Uri::from_static("http://example.com/a?b=1"),
            (),
        );
        req.headers_mut()
            .append(HOST, HeaderValue::from_static("example.com"));
        let mut out = BytesMut::new();
        request_head(&mut out, &req, true);
        assert_eq!(
            &out[..],
            b"POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }
}
