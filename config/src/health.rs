//! `[health]`: how the balancer decides that an upstream may take requests.
//!
//! Active checks probe each upstream with `GET path` every `interval`; an
//! up upstream goes down after `fall` failed probes in a row, a down one
//! comes back after `rise` good ones (HAProxy's defaults: rise 2, fall 3;
//! its interval is 2s, ours 1s, so a dead node is found in 3.5s at most).
//! Passive checks count failures of live traffic as nginx's `max_fails` and
//! `fail_timeout` do; what counts as a failure is `fail_on` (nginx's
//! `proxy_next_upstream` conditions), by default only what says the
//! upstream is not there: a connection error or a timeout. An upstream's
//! own answer, even a 503, is an answer from a live node. An upstream
//! coming back ramps up over `slow_start`.
//!
//! The section sets every upstream's checks; an `[upstream.health]` table
//! under one `[[upstream]]` changes them for that upstream only.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::source::{self, Validator};

pub const DEFAULT_PATH: &str = "/health";
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Failures of live traffic, with no success in between, that take an
/// upstream out of rotation.
pub const DEFAULT_MAX_FAILS: u32 = 3;
/// How long the upstream then rests.
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// What counts as a failure of live traffic: nginx's default
/// (`proxy_next_upstream error timeout`).
pub const DEFAULT_FAIL_ON: [&str; 2] = ["error", "timeout"];
/// The statuses `fail_on` may name, as `http_NNN`.
pub const FAIL_ON_STATUSES: [u16; 7] = [403, 404, 429, 500, 502, 503, 504];

/// What counts as a failure of live traffic against an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailOn {
    /// A connection that could not be made, or broke (`error`).
    pub error: bool,
    /// Connecting, or the response, took too long (`timeout`).
    pub timeout: bool,
    /// A response that could not be read as HTTP (`invalid_header`).
    pub invalid_header: bool,
    /// Response statuses (`http_500`, ...), sorted.
    pub statuses: Vec<u16>,
}

impl FailOn {
    /// From the names of a `fail_on` list.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut fail_on = FailOn {
            error: false,
            timeout: false,
            invalid_header: false,
            statuses: Vec::new(),
        };
        for name in names {
            match name {
                "error" => fail_on.error = true,
                "timeout" => fail_on.timeout = true,
                "invalid_header" => fail_on.invalid_header = true,
                _ => {
                    let status = name
                        .strip_prefix("http_")
                        .and_then(|code| code.parse::<u16>().ok())
                        .filter(|code| FAIL_ON_STATUSES.contains(code))
                        .ok_or_else(|| {
                            format!(
                                "`{name}` is not a failure: error, timeout, invalid_header, or http_NNN for NNN in {FAIL_ON_STATUSES:?}"
                            )
                        })?;
                    fail_on.statuses.push(status);
                }
            }
        }
        fail_on.statuses.sort_unstable();
        fail_on.statuses.dedup();
        Ok(fail_on)
    }

    /// Whether a response with `status` counts as a failure.
    pub fn status(&self, status: u16) -> bool {
        self.statuses.binary_search(&status).is_ok()
    }
}

impl Default for FailOn {
    fn default() -> Self {
        Self::parse(DEFAULT_FAIL_ON).unwrap_or(FailOn {
            error: true,
            timeout: true,
            invalid_header: false,
            statuses: Vec::new(),
        })
    }
}

/// Whether `path` is a request target in origin form (RFC 9112, 3.2.1): a
/// `/`, then path characters (RFC 3986: unreserved, percent-encoded,
/// sub-delimiters, `:`, `@`, `/`), then an optional `?` and query.
pub fn origin_form(path: &str) -> bool {
    let bytes = path.as_bytes();
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&b);
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                i += 3;
            }
            b if allowed(b) => i += 1,
            _ => return false,
        }
    }
    path.starts_with('/')
}

/// The checks of one upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// Whether active checks run; passive ones always do unless `max_fails`
    /// is 0.
    pub enabled: bool,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// The ramp of an upstream coming back up; zero (the default) turns it
    /// off.
    pub slow_start: Duration,
    /// 0 turns passive checks off.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// What counts as a failure of live traffic.
    pub fail_on: FailOn,
}

impl Default for HealthSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: DEFAULT_PATH.to_owned(),
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            slow_start: Duration::ZERO,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            fail_on: FailOn::default(),
        }
    }
}

/// `[health]` or `[upstream.health]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealth {
    enabled: Option<Spanned<bool>>,
    path: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<u64>>,
    fall: Option<Spanned<u64>>,
    slow_start: Option<Spanned<String>>,
    max_fails: Option<Spanned<u64>>,
    fail_timeout: Option<Spanned<String>>,
    fail_on: Option<Spanned<Vec<String>>>,
}

impl HealthSettings {
    /// These settings with the keys of `raw` changed.
    pub(crate) fn merge(&self, raw: Option<RawHealth>, v: &mut Validator<'_>) -> Self {
        let raw = raw.unwrap_or_default();
        let count = |n: u64| {
            source::at_least(1)(n)
                .and_then(|n| u32::try_from(n).map_err(|_| format!("{n} is too large")))
        };
        Self {
            enabled: v.field(raw.enabled, self.enabled, Ok),
            path: v.field(raw.path, self.path.clone(), |path| {
                if origin_form(&path) {
                    Ok(path)
                } else {
                    Err(format!(
                        "path `{path}` is not a request path: a / then letters, digits, \
                         percent-encodings and -._~!$&'()*+,;=:@/, and an optional ?query"
                    ))
                }
            }),
            interval: v.field(raw.interval, self.interval, source::duration),
            timeout: v.field(raw.timeout, self.timeout, source::duration),
            rise: v.field(raw.rise, self.rise, count),
            fall: v.field(raw.fall, self.fall, count),
            slow_start: v.field(raw.slow_start, self.slow_start, source::duration_or_zero),
            max_fails: v.field(raw.max_fails, self.max_fails, |n| {
                u32::try_from(n).map_err(|_| format!("{n} is too large"))
            }),
            fail_timeout: v.field(raw.fail_timeout, self.fail_timeout, source::duration),
            fail_on: v.field(raw.fail_on, self.fail_on.clone(), |names| {
                FailOn::parse(names.iter().map(String::as_str))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_path_is_a_request_path_in_origin_form() {
        for good in ["/health", "/", "/a/b?c=d&e=%2F", "/~x:@!$'()*+,;="] {
            assert!(origin_form(good), "{good}");
        }
        for bad in [
            "/he<alth>",
            "health",
            "/a b",
            "/a%2",
            "/a%zz",
            "/\u{e9}",
            "/a\"b",
            "/#x",
            "",
        ] {
            assert!(!origin_form(bad), "{bad}");
        }
    }

    #[test]
    fn fail_on_names_nginx_s_conditions() {
        let default = FailOn::default();
        assert!(default.error && default.timeout && !default.invalid_header);
        assert!(!default.status(503));
        let statuses = FailOn::parse(["http_503", "http_500", "http_503"]).unwrap();
        assert!(!statuses.error);
        assert_eq!(statuses.statuses, [500, 503]);
        assert!(statuses.status(503) && !statuses.status(502));
        assert!(FailOn::parse(["http_200"]).is_err());
        assert!(FailOn::parse(["errors"]).is_err());
    }
}
