//! `balancer.toml`: the settings of the load balancer.
//!
//! `listen`, `admin` and at least one `[[upstream]]` are required; every
//! section has defaults, so a file holding only those is complete:
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! admin = "127.0.0.1:8088"
//!
//! [[upstream]]
//! addr = "127.0.0.1:3001"
//! weight = 1
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::health::{HealthSettings, RawHealth};
use crate::server::{RawServer, ServerSettings};
use crate::source::{self, ConfigError, Source, Validator};

/// An upstream's weight when the file gives none, as in nginx.
pub const DEFAULT_WEIGHT: u32 = 1;
/// The largest weight accepted; weights are relative, and this keeps every
/// sum of them far from overflowing.
pub const MAX_WEIGHT: u32 = 10_000;
/// How long connecting to an upstream may take before the client gets 502.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an upstream may take to answer with its response head before
/// the client gets 504, and then between two reads of its body (nginx's
/// `proxy_read_timeout`).
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle keep-alive connection to an upstream stays in the pool
/// (nginx's `keepalive_timeout` in an `upstream`): less than the upstream
/// keeps it open, or a request may go out on a connection the upstream is
/// closing. Less than the nodes' own default.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const _: () = assert!(
    DEFAULT_UPSTREAM_IDLE_TIMEOUT.as_secs() < crate::server::DEFAULT_IDLE_TIMEOUT.as_secs()
);
/// The most idle keep-alive connections kept per upstream.
pub const DEFAULT_MAX_IDLE_PER_UPSTREAM: usize = 1024;
/// The deepest pipeline `[proxy] pipeline_depth` allows: past a few
/// requests, a batch saves little more, and each request waits behind all
/// the others.
pub const MAX_PIPELINE_DEPTH: u64 = 64;
/// The clients whose `X-Forwarded-For` is kept (appended to) rather than
/// replaced: the loopback, where only this machine's own processes (a
/// TLS terminator, say) connect from.
pub const DEFAULT_TRUSTED_PROXIES: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// The validated settings of the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerConfig {
    /// The proxy's address, where clients send requests.
    pub listen: SocketAddr,
    /// The admin listener's address (`/stats`, `/metrics`); never the proxy's.
    pub admin: SocketAddr,
    /// When set, every admin request but `/metrics` and the status page's
    /// own files needs `Authorization: Bearer TOKEN`.
    pub admin_token: Option<AdminToken>,
    /// In file order, which is the order of nginx's peers: it decides ties.
    pub upstreams: Vec<UpstreamConfig>,
    pub proxy: ProxySettings,
    /// `[health]`, the checks of every upstream without overrides.
    pub health: HealthSettings,
    pub rate_limit: RateLimitSettings,
    pub server: ServerSettings,
    pub log: LogSettings,
}

/// One `[[upstream]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub addr: SocketAddr,
    /// 0 means drained: the upstream gets no new requests.
    pub weight: u32,
    /// A backup takes requests only while no other upstream can.
    pub backup: bool,
    /// `[health]` with this upstream's `[upstream.health]` applied.
    pub health: HealthSettings,
}

/// `[proxy]`: how the balancer talks to upstreams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_upstream: usize,
    /// How many other upstreams a request that could not be sent may try;
    /// `None` (the default) means all the others.
    pub retries: Option<u32>,
    /// Requests in flight on one upstream beyond which it is skipped; 0 (the
    /// default) sets no limit.
    pub max_requests_per_upstream: u32,
    /// The most requests without a body (GET, HEAD) one upstream connection
    /// carries at once, written ahead of the responses (HTTP/1.1
    /// pipelining); 1 (the default) sends the next only once the last was
    /// answered.
    pub pipeline_depth: u32,
    /// Clients whose `X-Forwarded-For`, `X-Forwarded-Proto` and
    /// `X-Forwarded-Host` are kept; from any other they are replaced.
    pub trusted_proxies: Vec<IpNet>,
}

/// `[rate_limit]`: a token bucket per client address; off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Requests per second a client address may make on average; 0 (the
    /// default) turns the limit off.
    pub per_second: u32,
    /// Requests it may make at once after a quiet spell (default: one
    /// second's worth).
    pub burst: u32,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            max_idle_per_upstream: DEFAULT_MAX_IDLE_PER_UPSTREAM,
            retries: None,
            max_requests_per_upstream: 0,
            pipeline_depth: 1,
            trusted_proxies: DEFAULT_TRUSTED_PROXIES
                .iter()
                .map(|net| net.parse().expect("a valid network"))
                .collect(),
        }
    }
}

/// The admin token: kept out of `Debug` output, and so out of logs.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// The shortest admin token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// Read as any TOML value, so that a token mistyped as a number is never
/// echoed in the error (and from there into logs and `/stats`).
fn admin_token(token: toml::Value) -> Result<Option<AdminToken>, String> {
    let token = match token {
        toml::Value::String(token) => token,
        _ => return Err("admin_token must be a string".to_owned()),
    };
    let visible = |b: u8| b.is_ascii_graphic();
    if token.len() < MIN_TOKEN_LEN || token.len() > 512 || !token.bytes().all(visible) {
        Err(format!(
            "admin_token must be {MIN_TOKEN_LEN} to 512 visible ASCII characters (no spaces), \
             got {} characters",
            token.chars().count()
        ))
    } else {
        Ok(Some(AdminToken(token)))
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogSettings {
    /// One line per proxied request (method, path, status, upstream,
    /// duration); `None` (the default, or `""`) turns it off.
    pub access_log: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalancerConfig {
    listen: Spanned<String>,
    admin: Spanned<String>,
    admin_token: Option<Spanned<toml::Value>>,
    upstream: Option<Spanned<Vec<RawUpstream>>>,
    proxy: Option<RawProxy>,
    health: Option<RawHealth>,
    rate_limit: Option<RawRateLimit>,
    server: Option<RawServer>,
    log: Option<RawLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: Option<Spanned<u64>>,
    burst: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    addr: Spanned<String>,
    weight: Option<Spanned<i64>>,
    backup: Option<Spanned<bool>>,
    health: Option<RawHealth>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_idle_per_upstream: Option<Spanned<u64>>,
    retries: Option<Spanned<u64>>,
    max_requests_per_upstream: Option<Spanned<u64>>,
    pipeline_depth: Option<Spanned<u64>>,
    trusted_proxies: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access_log: Option<Spanned<String>>,
}

impl BalancerConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    /// Validates an already read file.
    pub fn from_source(source: &Source) -> Result<Self, ConfigError> {
        let raw: RawBalancerConfig = source.parse()?;
        let mut v = Validator::new(source);
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));

        let listen_span = raw.listen.span();
        let listen = v.field(Some(raw.listen), unspecified, source::socket_addr);
        let admin_span = raw.admin.span();
        let admin = v.field(Some(raw.admin), unspecified, source::socket_addr);
        if listen == admin && listen.port() != 0 {
            v.report(
                admin_span,
                format!("admin must differ from listen ({listen})"),
            );
        }
        let admin_token = v.field(raw.admin_token, None, admin_token);

        let health = HealthSettings::default().merge(raw.health, &mut v);
        let upstreams = match raw.upstream {
            Some(list) if !list.get_ref().is_empty() => {
                validate_upstreams(list.into_inner(), &health, &mut v)
            }
            Some(list) => {
                v.report(list.span(), "at least one [[upstream]] is required");
                Vec::new()
            }
            None => {
                v.report(listen_span, "at least one [[upstream]] is required");
                Vec::new()
            }
        };

        let proxy = validate_proxy(raw.proxy.unwrap_or_default(), &mut v);
        let rate_limit = validate_rate_limit(raw.rate_limit.unwrap_or_default(), &mut v);
        let server = ServerSettings::validate(raw.server, &mut v);
        let log = LogSettings {
            access_log: v.field(raw.log.unwrap_or_default().access_log, None, |path| {
                Ok((!path.is_empty()).then(|| PathBuf::from(path)))
            }),
        };
        v.finish(Self {
            listen,
            admin,
            admin_token,
            upstreams,
            proxy,
            health,
            rate_limit,
            server,
            log,
        })
    }
}

fn validate_upstreams(
    raw: Vec<RawUpstream>,
    health: &HealthSettings,
    v: &mut Validator<'_>,
) -> Vec<UpstreamConfig> {
    let mut first_seen: HashMap<SocketAddr, usize> = HashMap::new();
    let mut upstreams = Vec::with_capacity(raw.len());
    for upstream in raw {
        let addr_span = upstream.addr.span();
        let Some(addr) = v.field(Some(upstream.addr), None, |a| {
            source::socket_addr(a).map(Some)
        }) else {
            continue;
        };
        let weight = v.field(upstream.weight, DEFAULT_WEIGHT, weight);
        let backup = v.field(upstream.backup, false, Ok);
        let health = health.merge(upstream.health, v);
        if let Some(first) = first_seen.get(&addr) {
            v.report(
                addr_span,
                format!(
                    "duplicate upstream {addr} (first listed as upstream #{})",
                    first + 1
                ),
            );
            continue;
        }
        first_seen.insert(addr, upstreams.len());
        upstreams.push(UpstreamConfig {
            addr,
            weight,
            backup,
            health,
        });
    }
    upstreams
}

fn validate_proxy(raw: RawProxy, v: &mut Validator<'_>) -> ProxySettings {
    let defaults = ProxySettings::default();
    ProxySettings {
        connect_timeout: v.field(
            raw.connect_timeout,
            defaults.connect_timeout,
            source::duration,
        ),
        response_timeout: v.field(
            raw.response_timeout,
            defaults.response_timeout,
            source::duration,
        ),
        idle_timeout: v.field(raw.idle_timeout, defaults.idle_timeout, source::duration),
        max_idle_per_upstream: v.field(
            raw.max_idle_per_upstream,
            defaults.max_idle_per_upstream,
            |n| usize::try_from(n).map_err(|_| format!("{n} is too large")),
        ),
        retries: v.field(raw.retries, defaults.retries, |n| small(n).map(Some)),
        max_requests_per_upstream: v.field(
            raw.max_requests_per_upstream,
            defaults.max_requests_per_upstream,
            small,
        ),
        pipeline_depth: v.field(raw.pipeline_depth, defaults.pipeline_depth, |n| {
            source::at_least(1)(n)?;
            if n > MAX_PIPELINE_DEPTH {
                return Err(format!("{n} is more than {MAX_PIPELINE_DEPTH}"));
            }
            small(n)
        }),
        trusted_proxies: match raw.trusted_proxies {
            None => defaults.trusted_proxies,
            Some(list) => list
                .into_iter()
                .filter_map(|net| {
                    v.field(Some(net), None, |text| {
                        network(&text).map(Some).ok_or_else(|| {
                            format!("`{text}` is not an address or a network such as 10.0.0.0/8")
                        })
                    })
                })
                .collect(),
        },
    }
}

fn validate_rate_limit(raw: RawRateLimit, v: &mut Validator<'_>) -> RateLimitSettings {
    let per_second = v.field(raw.per_second, 0, small);
    RateLimitSettings {
        per_second,
        burst: v.field(raw.burst, per_second, |n| {
            small(n).and_then(|n| source::at_least(1)(u64::from(n)).map(|_| n))
        }),
    }
}

/// A count that fits 32 bits.
fn small(n: u64) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// A network (`10.0.0.0/8`) or a single address.
fn network(text: &str) -> Option<IpNet> {
    text.parse()
        .ok()
        .or_else(|| text.parse::<std::net::IpAddr>().ok().map(IpNet::from))
}

/// A weight is an integer from 0 to [`MAX_WEIGHT`].
pub fn weight(raw: i64) -> Result<u32, String> {
    match u32::try_from(raw) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(format!(
            "weight must be an integer from 0 to {MAX_WEIGHT}, got {raw}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<BalancerConfig, ConfigError> {
        BalancerConfig::from_source(&Source::new("balancer.toml", text))
    }

    fn messages(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .problems()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const MINIMAL: &str = r#"
listen = "127.0.0.1:8080"
admin = "127.0.0.1:8088"

[[upstream]]
addr = "127.0.0.1:3001"
weight = 1

[[upstream]]
addr = "127.0.0.1:3002"
"#;

    #[test]
    fn listen_admin_and_upstreams_make_a_complete_file() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.admin, "127.0.0.1:8088".parse().unwrap());
        let upstreams: Vec<_> = config
            .upstreams
            .iter()
            .map(|u| (u.addr.port(), u.weight))
            .collect();
        assert_eq!(upstreams, [(3001, 1), (3002, DEFAULT_WEIGHT)]);
        assert_eq!(config.proxy, ProxySettings::default());
        assert_eq!(config.server, ServerSettings::default());
        assert_eq!(config.log, LogSettings::default());
    }

    #[test]
    fn the_shipped_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("balancer.toml");
        let config = BalancerConfig::load(&path).unwrap();
        let weights: Vec<_> = config
            .upstreams
            .iter()
            .map(|u| (u.addr.port(), u.weight))
            .collect();
        assert_eq!(weights, [(3001, 1), (3002, 2), (3003, 3), (3004, 4)]);
        // Its comments say the values it shows are the defaults, but for
        // the pipelining it turns on for the nodes.
        assert_eq!(
            config.proxy,
            ProxySettings {
                pipeline_depth: 16,
                ..ProxySettings::default()
            }
        );
        assert_eq!(config.health, HealthSettings::default());
        assert_eq!(config.rate_limit, RateLimitSettings::default());
        assert_eq!(config.server, ServerSettings::default());
        assert_eq!(config.log, LogSettings::default());
    }

    #[test]
    fn sections_are_read() {
        let config = parse(&format!(
            "{MINIMAL}\n[proxy]\nconnect_timeout = \"250ms\"\nresponse_timeout = \"3s\"\n\
             idle_timeout = \"5s\"\nmax_idle_per_upstream = 8\n\n[log]\naccess_log = \"a.log\"\n"
        ))
        .unwrap();
        assert_eq!(config.proxy.connect_timeout, Duration::from_millis(250));
        assert_eq!(config.proxy.response_timeout, Duration::from_secs(3));
        assert_eq!(config.proxy.idle_timeout, Duration::from_secs(5));
        assert_eq!(config.proxy.max_idle_per_upstream, 8);
        assert_eq!(config.log.access_log, Some(PathBuf::from("a.log")));
    }

    #[test]
    fn health_checks_default_like_haproxy_and_can_differ_per_upstream() {
        let config = parse(MINIMAL).unwrap();
        let health = &config.upstreams[0].health;
        assert!(health.enabled);
        assert_eq!(health.path, "/health");
        assert_eq!(
            (health.interval, health.timeout),
            (Duration::from_secs(1), Duration::from_millis(500))
        );
        assert_eq!((health.rise, health.fall), (2, 3));
        assert_eq!(health.slow_start, Duration::ZERO);
        assert!(!config.upstreams[0].backup);
        assert_eq!(config.proxy.retries, None);

        let config = parse(
            r#"
listen = "127.0.0.1:8080"
admin = "127.0.0.1:8088"

[health]
interval = "200ms"
fall = 2
slow_start = "30s"
max_fails = 0

[proxy]
retries = 1

[[upstream]]
addr = "127.0.0.1:3001"

[upstream.health]
path = "/ping"
rise = 5

[[upstream]]
addr = "127.0.0.1:3002"
backup = true
"#,
        )
        .unwrap();
        let (first, second) = (&config.upstreams[0], &config.upstreams[1]);
        assert_eq!(first.health.path, "/ping");
        assert_eq!((first.health.rise, first.health.fall), (5, 2));
        assert_eq!(first.health.interval, Duration::from_millis(200));
        assert_eq!(second.health.path, "/health");
        assert_eq!((second.health.rise, second.health.fall), (2, 2));
        assert_eq!(second.health.slow_start, Duration::from_secs(30));
        assert_eq!(second.health.max_fails, 0);
        assert!(second.backup && !first.backup);
        assert_eq!(config.proxy.retries, Some(1));
        assert_eq!(config.health.interval, Duration::from_millis(200));
    }

    #[test]
    fn bad_health_settings_are_located() {
        let problems = messages(&format!(
            "{MINIMAL}\n[health]\nrise = 0\npath = \"health\"\ntimeout = \"0s\"\nsurprise = 1\n"
        ));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("unknown field `surprise`"),
            "{problems:?}"
        );
        let problems = messages(&format!(
            "{MINIMAL}\n[health]\nrise = 0\npath = \"health\"\ntimeout = \"0s\"\n"
        ));
        let lines: Vec<_> = problems
            .iter()
            .map(|p| p.split(':').nth(1).unwrap().to_owned())
            .collect();
        assert_eq!(lines, ["13", "14", "15"], "{problems:?}");
    }

    #[test]
    fn a_probe_path_that_cannot_be_sent_is_refused_at_its_place() {
        let problems = messages(&format!(
            "{MINIMAL}\n[health]\npath = \"/he<alth>\"\n\n[upstream.health]\n"
        ));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("balancer.toml:13:8: path `/he<alth>` is not a request path"),
            "{problems:?}"
        );
        let per_upstream = messages(
            "listen = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n[[upstream]]\naddr = \"127.0.0.1:3\"\n\
             [upstream.health]\npath = \"/a b\"\nfail_on = [\"error\", \"http_200\"]\n",
        );
        let places: Vec<_> = per_upstream
            .iter()
            .map(|p| p.split(':').skip(1).take(2).collect::<Vec<_>>().join(":"))
            .collect();
        assert_eq!(places, ["6:8", "7:11"], "{per_upstream:?}");
    }

    #[test]
    fn passive_checks_count_errors_and_timeouts_unless_told_more() {
        let config = parse(MINIMAL).unwrap();
        let fail_on = &config.upstreams[0].health.fail_on;
        assert!(fail_on.error && fail_on.timeout && fail_on.statuses.is_empty());
        let config = parse(&format!(
            "{MINIMAL}\n[health]\nfail_on = [\"timeout\", \"http_503\"]\n"
        ))
        .unwrap();
        let fail_on = &config.upstreams[1].health.fail_on;
        assert!(!fail_on.error && fail_on.timeout && fail_on.status(503));
    }

    #[test]
    fn edge_settings_are_read_and_checked() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.rate_limit.per_second, 0, "off by default");
        assert!(
            config
                .proxy
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&"127.0.0.1".parse::<std::net::IpAddr>().unwrap()))
        );
        let config = parse(&format!(
            "{MINIMAL}\n[proxy]\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\nmax_requests_per_upstream = 64\n\n\
             [rate_limit]\nper_second = 20\n\n[server]\nmax_body_bytes = 4096\nbody_timeout = \"2s\"\nidle_timeout = \"5s\"\n"
        ))
        .unwrap();
        assert_eq!(config.proxy.trusted_proxies.len(), 2);
        assert_eq!(config.proxy.max_requests_per_upstream, 64);
        assert_eq!(
            (config.rate_limit.per_second, config.rate_limit.burst),
            (20, 20)
        );
        assert_eq!(config.server.max_body_bytes, 4096);
        assert_eq!(config.server.body_timeout, Duration::from_secs(2));
        assert_eq!(config.server.idle_timeout, Duration::from_secs(5));
        let problems = messages(&format!(
            "{MINIMAL}\n[proxy]\ntrusted_proxies = [\"10.0.0.0/33\"]\n"
        ));
        assert!(
            problems[0].contains("is not an address or a network"),
            "{problems:?}"
        );
    }

    #[test]
    fn pipelining_is_off_unless_asked_for_and_its_depth_bounded() {
        assert_eq!(parse(MINIMAL).unwrap().proxy.pipeline_depth, 1);
        let config = parse(&format!("{MINIMAL}\n[proxy]\npipeline_depth = 8\n")).unwrap();
        assert_eq!(config.proxy.pipeline_depth, 8);
        for (depth, problem) in [(0, "must be at least 1"), (65, "65 is more than 64")] {
            let problems = messages(&format!("{MINIMAL}\n[proxy]\npipeline_depth = {depth}\n"));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains(problem), "{problems:?}");
            assert!(
                problems[0].contains(":13:18:"),
                "line and column: {problems:?}"
            );
        }
    }

    #[test]
    fn a_weight_must_be_a_non_negative_integer() {
        let file = |w: &str| {
            format!(
                "listen = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n[[upstream]]\naddr = \"127.0.0.1:3\"\nweight = {w}\n"
            )
        };
        assert_eq!(parse(&file("0")).unwrap().upstreams[0].weight, 0);
        for bad in ["-1", "1.5", "\"2\"", "10001"] {
            let problems = messages(&file(bad));
            assert_eq!(problems.len(), 1, "{bad}: {problems:?}");
            assert!(
                problems[0].starts_with("balancer.toml:5:10:"),
                "{bad}: {problems:?}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_located() {
        let problems = messages(&MINIMAL.replace("weight = 1", "wieght = 1"));
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("balancer.toml:7:1: unknown field `wieght`"),
            "{problems:?}"
        );
        let problems = messages(&format!("{MINIMAL}\n[proxy]\ntimeout = \"1s\"\n"));
        assert!(
            problems[0].starts_with("balancer.toml:13:1: unknown field `timeout`"),
            "{problems:?}"
        );
    }

    #[test]
    fn duplicates_and_bad_addresses_are_all_reported() {
        let problems = messages(&format!(
            "{MINIMAL}\n[[upstream]]\naddr = \"127.0.0.1:3001\"\n\n[[upstream]]\naddr = \"localhost\"\n"
        ));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with("balancer.toml:13:8: duplicate upstream 127.0.0.1:3001"),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("balancer.toml:16:8: `localhost` is not a socket address"),
            "{problems:?}"
        );
    }

    #[test]
    fn at_least_one_upstream_is_required() {
        let problems = messages("listen = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n");
        assert!(
            problems[0].contains("at least one [[upstream]] is required"),
            "{problems:?}"
        );
        let problems =
            messages("listen = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\nupstream = []\n");
        assert!(
            problems[0].starts_with("balancer.toml:3:12: at least one"),
            "{problems:?}"
        );
    }

    #[test]
    fn an_admin_token_is_long_visible_text_and_never_printed() {
        let file = |token: &str| {
            format!(
                "listen = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\nadmin_token = \"{token}\"\n\
                 [[upstream]]\naddr = \"127.0.0.1:3\"\n"
            )
        };
        let parse = |text: &str| BalancerConfig::from_source(&Source::new("b.toml", text));
        let config = parse(&file("0123456789abcdef-secret")).unwrap();
        let token = config.admin_token.as_ref().unwrap();
        assert_eq!(token.expose(), "0123456789abcdef-secret");
        assert!(!format!("{config:?}").contains("secret"));
        for bad in ["short", "0123456789 abcdef spaces"] {
            let err = parse(&file(bad)).unwrap_err().to_string();
            let expected = "b.toml:3:15: admin_token must be 16 to 512 visible ASCII \
                            characters (no spaces), got";
            assert!(err.starts_with(expected), "{err}");
        }
        let number = file("x").replace("\"x\"", "1234567890123456789");
        let err = parse(&number).unwrap_err().to_string();
        assert_eq!(err, "b.toml:3:15: admin_token must be a string");
        assert_eq!(
            parse(&file("x").replace("admin_token = \"x\"\n", ""))
                .unwrap()
                .admin_token,
            None
        );
    }

    #[test]
    fn listen_and_admin_are_required_and_distinct() {
        let err =
            parse("admin = \"127.0.0.1:2\"\n[[upstream]]\naddr = \"127.0.0.1:3\"\n").unwrap_err();
        assert!(err.to_string().contains("missing field `listen`"), "{err}");
        let problems = messages(
            "listen = \"127.0.0.1:8\"\nadmin = \"127.0.0.1:8\"\n[[upstream]]\naddr = \"127.0.0.1:3\"\n",
        );
        assert!(
            problems[0].starts_with("balancer.toml:2:9: admin must differ"),
            "{problems:?}"
        );
    }
}
