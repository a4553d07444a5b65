//! Where a program finds the sale's Redis: one server (`redis_url`), the
//! master a set of sentinels names (`redis_sentinels` and `redis_master`),
//! or a Redis Cluster (`redis_cluster`). The node and the order service
//! read the same keys, validated here once.

use std::fmt;

use serde::Deserialize;
use toml::Spanned;

use crate::source::Validator;

pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// The most replicas `replica_acks` may ask for: more than any deployment
/// runs, and small enough that every count is a valid argument of `WAIT`.
pub const MAX_REPLICA_ACKS: u32 = 16;

/// The sale's Redis, as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis server, by URL.
    Single(String),
    /// The master that the sentinels (each `HOST:PORT`) name `master`;
    /// followed from one master to the next on failover.
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A Redis Cluster, found from any of these nodes (`HOST:PORT`).
    Cluster(Vec<String>),
}

impl Default for RedisTarget {
    fn default() -> Self {
        Self::Single(DEFAULT_REDIS_URL.to_owned())
    }
}

/// Names the Redis in a sentence: "Redis at URL", "master `NAME` of the
/// sentinels at ...", "Redis Cluster at ...".
impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Single(url) => write!(f, "Redis at {url}"),
            Self::Sentinel { sentinels, master } => write!(
                f,
                "master `{master}` of the sentinels at {}",
                sentinels.join(", ")
            ),
            Self::Cluster(nodes) => write!(f, "Redis Cluster at {}", nodes.join(", ")),
        }
    }
}

/// The keys that name a Redis, as written in a file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRedis {
    pub redis_url: Option<Spanned<String>>,
    pub redis_sentinels: Option<Spanned<Vec<Spanned<String>>>>,
    pub redis_master: Option<Spanned<String>>,
    pub redis_cluster: Option<Spanned<Vec<Spanned<String>>>>,
}

impl RedisTarget {
    /// Validates the keys of a file that name its Redis: at most one kind,
    /// a master's name with sentinels and only with them, lists not empty.
    pub(crate) fn validate(raw: RawRedis, v: &mut Validator<'_>) -> Self {
        let RawRedis {
            redis_url,
            redis_sentinels,
            redis_master,
            redis_cluster,
        } = raw;
        let named = [
            redis_url.as_ref().map(|s| ("redis_url", s.span())),
            redis_sentinels
                .as_ref()
                .map(|s| ("redis_sentinels", s.span())),
            redis_cluster.as_ref().map(|s| ("redis_cluster", s.span())),
        ];
        let mut named = named.into_iter().flatten();
        if let (Some((first, _)), Some((second, span))) = (named.next(), named.next()) {
            v.report(
                span,
                format!("{second} and {first} name two Redis setups: keep one of them"),
            );
            return Self::default();
        }
        if let Some(list) = redis_sentinels {
            let span = list.span();
            let sentinels = addresses(list, "redis_sentinels", v);
            let Some(master) = redis_master else {
                v.report(
                    span,
                    "redis_sentinels needs redis_master, the name the sentinels monitor the master by",
                );
                return Self::default();
            };
            let master = v.field(Some(master), String::new(), |name| {
                if name.is_empty() || name.len() > 64 || name.contains(char::is_whitespace) {
                    Err(format!(
                        "redis_master `{name}` must be 1 to 64 characters without spaces"
                    ))
                } else {
                    Ok(name)
                }
            });
            return Self::Sentinel { sentinels, master };
        }
        if let Some(master) = redis_master {
            v.report(
                master.span(),
                "redis_master names a master of sentinels: set redis_sentinels too",
            );
            return Self::default();
        }
        if let Some(list) = redis_cluster {
            return Self::Cluster(addresses(list, "redis_cluster", v));
        }
        v.field(redis_url, Self::default(), url_target)
    }
}

/// Accepts a Redis URL: `redis://`, `rediss://` or a Unix socket.
pub fn redis_url(url: String) -> Result<String, String> {
    const SCHEMES: [&str; 4] = ["redis://", "rediss://", "redis+unix://", "unix://"];
    if SCHEMES.iter().any(|scheme| url.starts_with(scheme)) {
        Ok(url)
    } else {
        Err(format!(
            "`{url}` is not a Redis URL such as redis://127.0.0.1:6379"
        ))
    }
}

/// How many replicas each change (or, for the order service, each read)
/// must reach: 0 to [`MAX_REPLICA_ACKS`].
pub fn replica_acks(n: u32) -> Result<u32, String> {
    if n <= MAX_REPLICA_ACKS {
        Ok(n)
    } else {
        Err(format!(
            "replica_acks must be at most {MAX_REPLICA_ACKS}, got {n}"
        ))
    }
}

/// A single Redis by URL, for a flag such as `--redis`.
pub fn url_target(url: String) -> Result<RedisTarget, String> {
    redis_url(url).map(RedisTarget::Single)
}

/// A list of `HOST:PORT` given as one value (a flag), checked whole.
pub fn address_list(key: &str, list: Vec<String>) -> Result<Vec<String>, String> {
    if list.is_empty() {
        return Err(format!("{key} must name at least one HOST:PORT"));
    }
    match list.iter().find(|address| !host_port(address)) {
        Some(bad) => Err(format!(
            "`{bad}` in {key} is not a HOST:PORT such as 127.0.0.1:26379"
        )),
        None => Ok(list),
    }
}

/// A non-empty list of `HOST:PORT`, each checked where it is written.
fn addresses(list: Spanned<Vec<Spanned<String>>>, key: &str, v: &mut Validator<'_>) -> Vec<String> {
    let span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        v.report(span, format!("{key} must name at least one HOST:PORT"));
    }
    list.into_iter()
        .filter_map(|address| {
            v.field(Some(address), None, |address| {
                host_port(&address)
                    .then_some(Some(address.clone()))
                    .ok_or_else(|| {
                        format!("`{address}` in {key} is not a HOST:PORT such as 127.0.0.1:26379")
                    })
            })
        })
        .collect()
}

/// `HOST:PORT`, with a host of letters, digits, '.', '-' or an IPv6
/// address in brackets, and a port other than 0.
fn host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        }
    };
    host_ok && matches!(port.parse::<u16>(), Ok(p) if p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Source;

    fn parse(text: &str) -> Result<RedisTarget, crate::ConfigError> {
        let source = Source::new("node.toml", text);
        let raw: RawRedis = source.parse()?;
        let mut v = Validator::new(&source);
        let target = RedisTarget::validate(raw, &mut v);
        v.finish(target)
    }

    #[test]
    fn each_kind_is_read() {
        assert_eq!(parse("").unwrap(), RedisTarget::default());
        assert_eq!(
            parse("redis_url = \"redis://10.0.0.1:6380/2\"").unwrap(),
            RedisTarget::Single("redis://10.0.0.1:6380/2".into())
        );
        assert_eq!(
            parse(
                "redis_sentinels = [\"10.0.0.1:26379\", \"sentinel-b:26379\"]\nredis_master = \"sale\""
            )
            .unwrap(),
            RedisTarget::Sentinel {
                sentinels: vec!["10.0.0.1:26379".into(), "sentinel-b:26379".into()],
                master: "sale".into(),
            }
        );
        assert_eq!(
            parse("redis_cluster = [\"[::1]:7000\"]").unwrap(),
            RedisTarget::Cluster(vec!["[::1]:7000".into()])
        );
    }

    #[test]
    fn two_kinds_at_once_are_refused_at_the_second() {
        let err = parse("redis_url = \"redis://a:1\"\nredis_cluster = [\"a:7000\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("node.toml:2:17: redis_cluster and redis_url name two Redis setups"),
            "{err}"
        );
    }

    #[test]
    fn sentinels_and_their_master_go_together() {
        let err = parse("redis_master = \"sale\"").unwrap_err().to_string();
        assert!(
            err.starts_with("node.toml:1:16: redis_master names"),
            "{err}"
        );
        let err = parse("redis_sentinels = [\"a:1\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs redis_master"), "{err}");
    }

    #[test]
    fn every_bad_address_is_located() {
        let err = parse("redis_cluster = [\"a:7000\", \"b\", \"c:0\", \"d e:1\"]").unwrap_err();
        let places: Vec<_> = err.problems().iter().map(|p| p.column).collect();
        assert_eq!(places, [28, 33, 40], "{err}");
        let err = parse("redis_cluster = []").unwrap_err().to_string();
        assert!(err.contains("at least one HOST:PORT"), "{err}");
        let err = parse("redis_url = \"http://x\"").unwrap_err().to_string();
        assert!(err.starts_with("node.toml:1:13:"), "{err}");
    }
}
