//! `node.toml`: the settings of a ticket node.
//!
//! Every key is optional; an empty file gives a node on
//! [`DEFAULT_LISTEN`] selling from the sale [`DEFAULT_EVENT`] in the Redis at
//! [`DEFAULT_REDIS_URL`].

pub use crate::redis::{DEFAULT_REDIS_URL, RedisTarget, redis_url};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use toml::Spanned;

use crate::redis::RawRedis;
use crate::server::{RawServer, ServerSettings};
use crate::source::{self, ConfigError, Source, Validator};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3001";
pub const DEFAULT_EVENT: &str = "ticket";
/// The seed article's sale: 10,000 train tickets.
pub const DEFAULT_TOTAL_STOCK: u64 = 10_000;
/// A quarter of the default total (four nodes) plus a buffer of 100, so that
/// the other nodes can still sell a dead node's share.
pub const DEFAULT_LOCAL_STOCK: u64 = 2_600;
/// How long a purchase waits on Redis before the client gets 503.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the node reads the sale's state from Redis: to learn that it is
/// sold out, has tickets back, or was started over, and to know whether
/// Redis answers.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How long a buyer has to pay: an order unpaid after it expires, and its
/// ticket goes back on sale (12306's window is 15 to 30 minutes).
pub const DEFAULT_PAY_WINDOW: Duration = Duration::from_secs(15 * 60);
/// How often the node expires the orders past their deadline: an unpaid
/// order is expired within about this long after it.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_millis(250);

/// The validated settings of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// The name written into orders and stat lines; when absent, derived from
    /// the listen port (see [`NodeConfig::name`]).
    pub name: Option<String>,
    pub listen: SocketAddr,
    pub redis: RedisTarget,
    /// Replicas that must have every change of the sale before a buyer
    /// hears of it (`WAIT`); 0: answer once the master has it.
    pub replica_acks: u32,
    /// The sale this node sells from; it names the Redis keys.
    pub event: String,
    /// The sale's size, written to Redis only when the sale does not exist yet.
    pub total_stock: u64,
    /// How many tickets this node may sell at most.
    pub local_stock: u64,
    /// Where the per-request stat lines go; `None` turns them off.
    pub stat_log: Option<PathBuf>,
    pub redis_timeout: Duration,
    pub sync_interval: Duration,
    pub pay_window: Duration,
    pub sweep_interval: Duration,
    /// When the sale opens, for a sale this node creates; `None`: at once.
    pub opens_at: Option<SystemTime>,
    /// Whether the node's threads run under Linux's `SCHED_BATCH` policy.
    pub sched_batch: bool,
    pub server: ServerSettings,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: None,
            listen: DEFAULT_LISTEN.parse().expect("default listen address"),
            redis: RedisTarget::default(),
            replica_acks: 0,
            event: DEFAULT_EVENT.to_owned(),
            total_stock: DEFAULT_TOTAL_STOCK,
            local_stock: DEFAULT_LOCAL_STOCK,
            stat_log: None,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            pay_window: DEFAULT_PAY_WINDOW,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            opens_at: None,
            sched_batch: true,
            server: ServerSettings::default(),
        }
    }
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeConfig {
    name: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    redis_url: Option<Spanned<String>>,
    redis_sentinels: Option<Spanned<Vec<Spanned<String>>>>,
    redis_master: Option<Spanned<String>>,
    redis_cluster: Option<Spanned<Vec<Spanned<String>>>>,
    replica_acks: Option<Spanned<u32>>,
    event: Option<Spanned<String>>,
    total_stock: Option<Spanned<u64>>,
    local_stock: Option<Spanned<u64>>,
    stat_log: Option<Spanned<String>>,
    redis_timeout: Option<Spanned<String>>,
    sync_interval: Option<Spanned<String>>,
    pay_window: Option<Spanned<String>>,
    sweep_interval: Option<Spanned<String>>,
    opens_at: Option<Spanned<String>>,
    sched_batch: Option<Spanned<bool>>,
    server: Option<RawServer>,
}

impl NodeConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    /// Validates an already read file.
    pub fn from_source(source: &Source) -> Result<Self, ConfigError> {
        let raw: RawNodeConfig = source.parse()?;
        let defaults = Self::default();
        let mut v = Validator::new(source);
        let config = Self {
            name: v.field(raw.name, None, |name| name_like("name", name).map(Some)),
            listen: v.field(raw.listen, defaults.listen, source::socket_addr),
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
            event: v.field(raw.event, defaults.event, |event| name_like("event", event)),
            total_stock: v.field(raw.total_stock, defaults.total_stock, source::at_least(1)),
            local_stock: v.field(raw.local_stock, defaults.local_stock, source::at_least(1)),
            stat_log: v.field(raw.stat_log, defaults.stat_log, |path| {
                Ok((!path.is_empty()).then(|| PathBuf::from(path)))
            }),
            redis_timeout: v.field(raw.redis_timeout, defaults.redis_timeout, source::duration),
            sync_interval: v.field(raw.sync_interval, defaults.sync_interval, source::duration),
            pay_window: v.field(raw.pay_window, defaults.pay_window, |text| {
                // Deadlines are kept in whole milliseconds.
                match source::duration(text.clone())? {
                    d if d < Duration::from_millis(1) => {
                        Err(format!("pay_window `{text}` must be at least 1ms"))
                    }
                    d => Ok(d),
                }
            }),
            sweep_interval: v.field(
                raw.sweep_interval,
                defaults.sweep_interval,
                source::duration,
            ),
            opens_at: v.field(raw.opens_at, defaults.opens_at, |text| {
                source::instant(&text).map(Some)
            }),
            sched_batch: v.field(raw.sched_batch, defaults.sched_batch, Ok),
            server: ServerSettings::validate(raw.server, &mut v),
        };
        v.finish(config)
    }

    /// The node's name: the configured one, or `node-PORT`.
    pub fn name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("node-{}", self.listen.port()))
    }
}

/// Names and events appear in Redis keys (inside a `{...}` hash tag) and in
/// log lines, so they are kept to a plain character set.
pub fn name_like(what: &str, value: String) -> Result<String, String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if !value.is_empty() && value.len() <= 64 && value.chars().all(plain) {
        Ok(value)
    } else {
        Err(format!(
            "{what} `{value}` must be 1 to 64 characters of letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::from_source(&Source::new("node.toml", text))
    }

    #[test]
    fn the_shipped_file_shows_the_defaults_but_the_stat_log() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node.toml");
        let config = NodeConfig::load(&path).unwrap();
        assert_eq!(config.stat_log, Some("log/stat.log".into()));
        let defaults = NodeConfig {
            stat_log: config.stat_log.clone(),
            ..NodeConfig::default()
        };
        assert_eq!(config, defaults);
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("").unwrap(), NodeConfig::default());
        assert_eq!(NodeConfig::default().name(), "node-3001");
    }

    #[test]
    fn every_key_is_read() {
        let config = parse(
            r#"
            name = "east-1"
            listen = "127.0.0.1:4000"
            redis_url = "redis://10.0.0.1:6380/2"
            replica_acks = 1
            event = "g1234"
            total_stock = 500
            local_stock = 150
            stat_log = "log/stat.log"
            redis_timeout = "250ms"
            sync_interval = "2s"
            pay_window = "10m"
            sweep_interval = "1s"
            opens_at = "2026-12-12T20:00:00+08:00"
            sched_batch = false

            [server]
            header_timeout = "3s"
            shutdown_grace = "1s"
            workers = 3
            "#,
        )
        .unwrap();
        assert_eq!(config.name(), "east-1");
        assert_eq!(config.listen.port(), 4000);
        assert_eq!(
            config.redis,
            RedisTarget::Single("redis://10.0.0.1:6380/2".into())
        );
        assert_eq!(config.replica_acks, 1);
        assert_eq!(config.event, "g1234");
        assert_eq!((config.total_stock, config.local_stock), (500, 150));
        assert_eq!(config.stat_log, Some(PathBuf::from("log/stat.log")));
        assert_eq!(config.redis_timeout, Duration::from_millis(250));
        assert_eq!(config.sync_interval, Duration::from_secs(2));
        assert_eq!(config.pay_window, Duration::from_secs(600));
        assert_eq!(config.sweep_interval, Duration::from_secs(1));
        let opens = config.opens_at.unwrap();
        let since_epoch = opens.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        // 12:00 UTC.
        assert_eq!(since_epoch.as_secs(), 1_797_076_800);
        assert!(!config.sched_batch);
        assert_eq!(config.server.header_timeout, Duration::from_secs(3));
        assert_eq!(config.server.shutdown_grace, Duration::from_secs(1));
        assert_eq!(config.server.workers, Some(3));
    }

    #[test]
    fn an_opening_time_is_an_rfc_3339_instant() {
        let err = parse("opens_at = \"tomorrow\"\n").unwrap_err().to_string();
        assert!(
            err.starts_with("node.toml:1:12: `tomorrow` is not a time"),
            "{err}"
        );
        let err = parse("pay_window = \"0s\"\n").unwrap_err().to_string();
        assert!(err.contains("greater than zero"), "{err}");
        let err = parse("pay_window = \"500us\"\n").unwrap_err().to_string();
        assert!(err.contains("at least 1ms"), "{err}");
        let err = parse("pay_window = \"5000years\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 365 days"), "{err}");
    }

    #[test]
    fn an_empty_stat_log_turns_it_off() {
        assert_eq!(parse("stat_log = \"\"").unwrap().stat_log, None);
    }

    #[test]
    fn an_unknown_key_is_located() {
        let err = parse("listen = \"127.0.0.1:1\"\nlocal_stok = 5\n").unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("node.toml:2:1: unknown field `local_stok`"),
            "{message}"
        );
    }

    #[test]
    fn every_bad_value_is_reported_with_its_position() {
        let err =
            parse("listen = \"nowhere\"\nevent = \"a b\"\nredis_timeout = \"soon\"\n").unwrap_err();
        let problems = err.problems();
        let places: Vec<_> = problems.iter().map(|p| (p.line, p.column)).collect();
        assert_eq!(places, [(1, 10), (2, 9), (3, 17)], "{err}");
        assert!(problems[0].message.contains("not a socket address"));
        assert!(problems[1].message.contains("event `a b`"));
        assert!(problems[2].message.contains("not a duration"));
    }

    #[test]
    fn stock_must_be_a_positive_integer() {
        let err = parse("total_stock = -1").unwrap_err().to_string();
        assert!(err.starts_with("node.toml:1:15:"), "{err}");
        let err = parse("local_stock = 0").unwrap_err().to_string();
        assert!(err.contains("must be at least 1"), "{err}");
        let err = parse("local_stock = \"10\"").unwrap_err().to_string();
        assert!(err.starts_with("node.toml:1:15:"), "{err}");
    }

    #[test]
    fn a_syntax_error_is_located() {
        let err = parse("listen = \n").unwrap_err().to_string();
        assert!(err.starts_with("node.toml:1:"), "{err}");
    }
}
