//! The status page: one HTML file, its script and its style sheet, built
//! into the binary (nothing is fetched from anywhere else). The page polls
//! `/stats` every second and draws it; its actions call the admin
//! endpoints. The page is served to anyone who reaches the admin address;
//! what it shows needs the token, if one is set, which the page asks for.

use bytes::Bytes;
use http::StatusCode;
use http::header::{CACHE_CONTROL, HeaderName, HeaderValue};
use spike_http1::message::Response;
use spike_http1::reply::{self, ReplyBody};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/status.js");
const STYLE: &str = include_str!("page/status.css");

/// The page's files by path: content type and body.
pub fn file(path: &str) -> Option<Response<ReplyBody>> {
    let (content_type, body) = match path {
        "/" => ("text/html; charset=utf-8", INDEX),
        "/status.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/status.css" => ("text/css; charset=utf-8", STYLE),
        _ => return None,
    };
    let mut reply = reply::typed(
        StatusCode::OK,
        content_type,
        Bytes::from_static(body.as_bytes()),
    );
    let headers = reply.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // Its own files only, and never inside another site's frame (its
    // buttons change the balancer).
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("same-origin"),
    );
    Some(reply)
}
