//! `[health]`: how the balancer decides that an upstream may take requests.
//!
//! Active checks probe each upstream with `GET path` every `interval`; an
//! up upstream goes down after `fall` failed probes in a row, a down one
//! comes back after `rise` good ones (HAProxy's defaults: rise 2, fall 3;
//! its interval is 2s, ours 1s, so a dead node is found in 3.5s at most).
//! Passive checks count failures of live traffic as nginx's `max_fails` and
//! `fail_timeout` do. An upstream coming back ramps up over
//! `slow_start`.
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
                if path.starts_with('/') && !path.contains(char::is_whitespace) {
                    Ok(path)
                } else {
                    Err(format!(
                        "path `{path}` must start with / and hold no spaces"
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
        }
    }
}
