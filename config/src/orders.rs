//! `orders.toml`: the settings of the order service, which reads a sale's
//! order stream through a Redis consumer group and writes every order to
//! a database.
//!
//! Every key is optional; an empty file gives a service reading the sale
//! [`DEFAULT_EVENT`] from the Redis at [`DEFAULT_REDIS_URL`] into the
//! SQLite file of [`DEFAULT_DATABASE_URL`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::node::{DEFAULT_EVENT, name_like};
use crate::redis::{RawRedis, RedisTarget};
use crate::source::{self, ConfigError, Source, Validator};

/// The embedded default: a SQLite file, relative to the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/orders.db";
/// Where `/health`, `/stats` and `/metrics` are served.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:8090";
/// The consumer group every order service of a sale joins, sharing its
/// events among them.
pub const DEFAULT_GROUP: &str = "orders";
/// The most events read, and written in one transaction, at once.
pub const DEFAULT_BATCH: u64 = 500;
/// How long one read waits for new events.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(1);
/// How long an event read by a consumer and not acknowledged waits before
/// another consumer takes it over: the consumer is taken for dead.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(30);
/// The longest wait between two attempts at a failed write.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the stream is trimmed below what every group acknowledged.
pub const DEFAULT_TRIM_INTERVAL: Duration = Duration::from_secs(10);
/// How long one Redis command may take.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one write to the database may take.
pub const DEFAULT_DATABASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The validated settings of an order service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrdersConfig {
    pub redis: RedisTarget,
    /// Replicas that must hold the events read before they are written
    /// to the database: an order a failover then loses never reaches it.
    pub replica_acks: u32,
    /// `sqlite://PATH` or `postgres://...`.
    pub database_url: String,
    pub event: String,
    pub admin: SocketAddr,
    pub group: String,
    /// This service's name in the group; `None`: the host's name and the
    /// admin port, the same across restarts, so a restarted service takes
    /// back at once what it had read before it died.
    pub consumer: Option<String>,
    pub batch: u64,
    pub read_wait: Duration,
    pub claim_idle: Duration,
    pub retry_max: Duration,
    /// Zero turns trimming off.
    pub trim_interval: Duration,
    pub redis_timeout: Duration,
    pub database_timeout: Duration,
}

impl Default for OrdersConfig {
    fn default() -> Self {
        Self {
            redis: RedisTarget::default(),
            replica_acks: 0,
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            event: DEFAULT_EVENT.to_owned(),
            admin: DEFAULT_ADMIN.parse().expect("default admin address"),
            group: DEFAULT_GROUP.to_owned(),
            consumer: None,
            batch: DEFAULT_BATCH,
            read_wait: DEFAULT_READ_WAIT,
            claim_idle: DEFAULT_CLAIM_IDLE,
            retry_max: DEFAULT_RETRY_MAX,
            trim_interval: DEFAULT_TRIM_INTERVAL,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            database_timeout: DEFAULT_DATABASE_TIMEOUT,
        }
    }
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrdersConfig {
    redis_url: Option<Spanned<String>>,
    redis_sentinels: Option<Spanned<Vec<Spanned<String>>>>,
    redis_master: Option<Spanned<String>>,
    redis_cluster: Option<Spanned<Vec<Spanned<String>>>>,
    replica_acks: Option<Spanned<u32>>,
    database_url: Option<Spanned<String>>,
    event: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    consumer: Option<Spanned<String>>,
    batch: Option<Spanned<u64>>,
    read_wait: Option<Spanned<String>>,
    claim_idle: Option<Spanned<String>>,
    retry_max: Option<Spanned<String>>,
    trim_interval: Option<Spanned<String>>,
    redis_timeout: Option<Spanned<String>>,
    database_timeout: Option<Spanned<String>>,
}

impl OrdersConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    /// Validates an already read file.
    pub fn from_source(source: &Source) -> Result<Self, ConfigError> {
        let raw: RawOrdersConfig = source.parse()?;
        let defaults = Self::default();
        let mut v = Validator::new(source);
        let config = Self {
            redis: RedisTarget::validate(
                RawRedis {
                    redis_url: raw.redis_url,
                    redis_sentinels: raw.redis_sentinels,
                    redis_master: raw.redis_master,
                    redis_cluster: raw.redis_cluster,
                },
                &mut v,
            ),
            replica_acks: v.field(
                raw.replica_acks,
                defaults.replica_acks,
                crate::redis::replica_acks,
            ),
            database_url: v.field(raw.database_url, defaults.database_url, database_url),
            event: v.field(raw.event, defaults.event, |event| name_like("event", event)),
            admin: v.field(raw.admin, defaults.admin, source::socket_addr),
            group: v.field(raw.group, defaults.group, |group| name_like("group", group)),
            consumer: v.field(raw.consumer, None, |name| {
                name_like("consumer", name).map(Some)
            }),
            batch: v.field(raw.batch, defaults.batch, batch),
            read_wait: v.field(raw.read_wait, defaults.read_wait, |text| {
                within(text, "read_wait", Duration::from_millis(1), MAX_READ_WAIT)
            }),
            claim_idle: v.field(raw.claim_idle, defaults.claim_idle, |text| {
                within(text, "claim_idle", MIN_CLAIM_IDLE, source::LONGEST)
            }),
            retry_max: v.field(raw.retry_max, defaults.retry_max, source::duration),
            trim_interval: v.field(
                raw.trim_interval,
                defaults.trim_interval,
                source::duration_or_zero,
            ),
            redis_timeout: v.field(raw.redis_timeout, defaults.redis_timeout, source::duration),
            database_timeout: v.field(
                raw.database_timeout,
                defaults.database_timeout,
                source::duration,
            ),
        };
        v.finish(config)
    }
}

/// The largest batch: one transaction's worth of events.
pub const MAX_BATCH: u64 = 10_000;
/// The longest a read may wait for new events (a stopping service waits
/// for it no longer than this).
pub const MAX_READ_WAIT: Duration = Duration::from_secs(60);
/// The shortest `claim_idle`: below it, live consumers would take each
/// other's batches while writing them.
pub const MIN_CLAIM_IDLE: Duration = Duration::from_secs(1);

/// A duration from `min` to `max`.
fn within(text: String, key: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let value = source::duration(text.clone())?;
    if value < min || value > max {
        Err(format!(
            "{key} `{text}` must be from {} to {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ))
    } else {
        Ok(value)
    }
}

fn batch(n: u64) -> Result<u64, String> {
    if (1..=MAX_BATCH).contains(&n) {
        Ok(n)
    } else {
        Err(format!("batch must be from 1 to {MAX_BATCH}, got {n}"))
    }
}

/// Accepts the URL of a database the service can write to: SQLite or
/// PostgreSQL.
pub fn database_url(url: String) -> Result<String, String> {
    const SCHEMES: [&str; 4] = ["sqlite://", "sqlite:", "postgres://", "postgresql://"];
    match SCHEMES.iter().find(|scheme| url.starts_with(*scheme)) {
        Some(scheme) if url.len() > scheme.len() => Ok(url),
        _ => Err(format!(
            "`{url}` is not a database URL such as sqlite://data/orders.db or \
             postgres://user@host/db"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OrdersConfig, ConfigError> {
        OrdersConfig::from_source(&Source::new("orders.toml", text))
    }

    #[test]
    fn the_shipped_file_shows_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("orders.toml");
        assert_eq!(OrdersConfig::load(&path).unwrap(), OrdersConfig::default());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), OrdersConfig::default());
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(
            r#"
            redis_url = "redis://10.0.0.1:6380/2"
            database_url = "postgres://spike@10.0.0.2/sale"
            event = "g1234"
            admin = "127.0.0.1:9100"
            group = "audit"
            consumer = "east-1"
            batch = 100
            read_wait = "200ms"
            claim_idle = "5s"
            retry_max = "1s"
            trim_interval = "0s"
            redis_timeout = "1s"
            database_timeout = "3s"
            "#,
        )
        .unwrap();
        assert_eq!(
            config.redis,
            RedisTarget::Single("redis://10.0.0.1:6380/2".into())
        );
        assert_eq!(config.database_url, "postgres://spike@10.0.0.2/sale");
        assert_eq!(config.admin, "127.0.0.1:9100".parse().unwrap());
        assert_eq!(config.consumer.as_deref(), Some("east-1"));
        assert_eq!(config.batch, 100);
        assert_eq!(config.claim_idle, Duration::from_secs(5));
        assert_eq!(config.trim_interval, Duration::ZERO);
        assert_eq!(config.database_timeout, Duration::from_secs(3));
    }

    #[test]
    fn a_sentinel_master_is_named_as_for_a_node() {
        let config =
            parse("redis_sentinels = [\"127.0.0.1:26379\"]\nredis_master = \"sale\"\n").unwrap();
        assert_eq!(
            config.redis,
            RedisTarget::Sentinel {
                sentinels: vec!["127.0.0.1:26379".into()],
                master: "sale".into()
            }
        );
        assert_eq!(parse("replica_acks = 1\n").unwrap().replica_acks, 1);
        let err = parse("replica_acks = 17\n").unwrap_err().to_string();
        assert!(
            err.starts_with("orders.toml:1:16: replica_acks must be at most 16"),
            "{err}"
        );
    }

    #[test]
    fn every_bad_value_is_reported_with_its_position() {
        let err = parse(
            "database_url = \"mysql://x\"\nbatch = 0\nclaim_idle = \"soon\"\ngroup = \"a b\"\n",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "orders.toml:1:16: `mysql://x` is not a database URL",
            "orders.toml:2:9: batch must be from 1 to 10000, got 0",
            "orders.toml:3:14: `soon` is not a duration",
            "orders.toml:4:9: group `a b` must be",
        ] {
            assert!(err.contains(expected), "{expected:?} in {err}");
        }
    }

    #[test]
    fn waits_and_takeovers_have_bounds() {
        let err = parse("read_wait = \"2m\"\nclaim_idle = \"10ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("orders.toml:1:13: read_wait `2m` must be from 1ms to 1m"),
            "{err}"
        );
        assert!(
            err.contains("orders.toml:2:14: claim_idle `10ms` must be from 1s to"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_key_is_located() {
        let err = parse("batch = 5\ndatabase = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("orders.toml:2:1: unknown field `database`"),
            "{err}"
        );
    }
}
