//! The global stock in Redis: the second deduction of a purchase and the only
//! source of truth for how many tickets were sold.
//!
//! One sale (an "event") lives in three keys that share the hash tag
//! `{EVENT}`, so a Redis Cluster keeps them in one slot and one script can
//! touch all three:
//!
//! - `spike:{EVENT}:stock`, a hash: `total` tickets, `sold` so far, and
//!   `epoch`, bumped each time the sale is started over;
//! - `spike:{EVENT}:buyers`, a hash from buyer id to order id;
//! - `spike:{EVENT}:orders`, a stream with one entry per order (`ticket`,
//!   `buyer`, `node`, `time`), whose entry id is the order id. It is the queue
//!   that order and payment services downstream consume.
//!
//! A purchase is one Lua script ([`PURCHASE_SCRIPT`]), sent as EVALSHA and
//! loaded again whenever Redis answers NOSCRIPT (after a restart or a
//! failover).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, RedisError, Script};

/// The purchase script; see the comments at its top.
pub const PURCHASE_SCRIPT: &str = include_str!("purchase.lua");

/// The Redis keys of one sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub stock: String,
    pub buyers: String,
    pub orders: String,
}

impl Keys {
    pub fn new(event: &str) -> Self {
        Self {
            stock: format!("spike:{{{event}}}:stock"),
            buyers: format!("spike:{{{event}}}:buyers"),
            orders: format!("spike:{{{event}}}:orders"),
        }
    }
}

/// What Redis decided about one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A ticket was sold and its order appended to the stream.
    Sold {
        order_id: String,
    },
    /// The buyer already holds this order; nothing was sold.
    AlreadyBought {
        order_id: String,
    },
    SoldOut,
    /// The sale's total was never set (e.g. Redis restarted without its data).
    NoSale,
}

/// Why Redis gave no answer. In every case the outcome of a purchase is
/// unknown to the node: the script may or may not have run.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from the purchase script: code {0}")]
    Reply(i64),
}

/// The state of a sale, as `node status` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SaleState {
    /// `None` when the sale does not exist.
    pub total: Option<u64>,
    pub sold: u64,
    pub epoch: u64,
    /// Entries in the order stream.
    pub orders: u64,
}

/// `total`, `sold` and `epoch` of the stock hash, each absent until set.
type StockFields = (Option<u64>, Option<u64>, Option<u64>);

/// A handle on one sale in Redis. Cheap to share: every clone of the
/// connection multiplexes requests over the same TCP connection, which is
/// re-established in the background when it drops.
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    keys: Keys,
    purchase: Script,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// A store for `event` at `url`. It connects on first use, so a node can
    /// start while Redis is down. Every command fails after `timeout` rather
    /// than waiting on a reconnection.
    pub fn new(url: &str, event: &str, timeout: Duration) -> Result<Self, RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // One attempt per command: a purchase must fail fast when Redis
            // is down, and the next command tries to connect again.
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            keys: Keys::new(event),
            purchase: Script::new(PURCHASE_SCRIPT),
            timeout,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Runs the purchase script for `buyer` (anonymous when `None`).
    pub async fn purchase(&self, buyer: Option<&str>, node: &str) -> Result<Outcome, StoreError> {
        let mut conn = self.conn.clone();
        let reply: (i64, String) = self
            .bounded(
                self.purchase
                    .key(&self.keys.stock)
                    .key(&self.keys.buyers)
                    .key(&self.keys.orders)
                    .arg(buyer.unwrap_or(""))
                    .arg(node)
                    .invoke_async(&mut conn),
            )
            .await?;
        match reply {
            (1, order_id) => Ok(Outcome::Sold { order_id }),
            (2, order_id) => Ok(Outcome::AlreadyBought { order_id }),
            (0, _) => Ok(Outcome::SoldOut),
            (-1, _) => Ok(Outcome::NoSale),
            (code, _) => Err(StoreError::Reply(code)),
        }
    }

    /// Every buyer and their order, read in batches (`HSCAN`) so that a large
    /// sale does not hold Redis up; each batch is bounded by the timeout.
    pub async fn buyers(&self) -> Result<HashMap<String, String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut buyers = HashMap::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<(String, String)>) = self
                .bounded(
                    redis::cmd("HSCAN")
                        .arg(&self.keys.buyers)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
            buyers.extend(batch);
            if next == 0 {
                return Ok(buyers);
            }
            cursor = next;
        }
    }

    /// Creates the sale with `total` tickets unless it exists; never touches
    /// `sold`. Returns whether it was created.
    pub async fn ensure_sale(&self, total: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let created: bool = self
            .bounded(conn.hset_nx(&self.keys.stock, "total", total))
            .await?;
        Ok(created)
    }

    /// Starts the sale over with `total` tickets: nothing sold, no buyers, no
    /// orders, and a new epoch so running nodes refill their local stock.
    pub async fn reset(&self, total: u64) -> Result<SaleState, StoreError> {
        let mut conn = self.conn.clone();
        let (epoch,): (u64,) = self
            .bounded(
                redis::pipe()
                    .atomic()
                    .del(&self.keys.buyers)
                    .ignore()
                    .del(&self.keys.orders)
                    .ignore()
                    .hset_multiple(&self.keys.stock, &[("total", total), ("sold", 0)])
                    .ignore()
                    .hincr(&self.keys.stock, "epoch", 1)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(SaleState {
            total: Some(total),
            sold: 0,
            epoch,
            orders: 0,
        })
    }

    /// Reads the sale's state in one round trip.
    pub async fn state(&self) -> Result<SaleState, StoreError> {
        let mut conn = self.conn.clone();
        let (fields, orders): (StockFields, u64) = self
            .bounded(
                redis::pipe()
                    .hmget(&self.keys.stock, &["total", "sold", "epoch"])
                    .xlen(&self.keys.orders)
                    .query_async(&mut conn),
            )
            .await?;
        let (total, sold, epoch) = fields;
        Ok(SaleState {
            total,
            sold: sold.unwrap_or(0),
            epoch: epoch.unwrap_or(0),
            orders,
        })
    }

    /// Bounds a command by the store's timeout. The connection has timeouts
    /// of its own; this one also covers waiting for a reconnection.
    async fn bounded<T>(
        &self,
        command: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, command).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_event_hash_tag() {
        let keys = Keys::new("g1234");
        assert_eq!(keys.stock, "spike:{g1234}:stock");
        assert_eq!(keys.buyers, "spike:{g1234}:buyers");
        assert_eq!(keys.orders, "spike:{g1234}:orders");
    }
}
