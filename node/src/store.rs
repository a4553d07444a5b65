//! The global stock in Redis: the second deduction of a purchase, the life
//! of every order, and the only source of truth of the sale.
//!
//! One sale (an "event") lives in six keys that share the hash tag
//! `{EVENT}`, so a Redis Cluster keeps them in one slot and one script can
//! touch them all ([`Keys`]; `lua/order.lua` says what each holds).
//!
//! Every change of an order is one Lua script, which also appends the
//! change to the order stream: a purchase (`lua/purchase.lua`) creates an
//! order `pending` with a deadline; a payment (`lua/pay.lua`) makes it
//! `paid`, or `expired` if its deadline has passed; a sweep
//! (`lua/expire.lua`) expires the pending orders past their deadline, and
//! their tickets go back on sale. Scripts are sent as EVALSHA and loaded
//! again whenever Redis answers NOSCRIPT (after a restart or a failover);
//! every key a script touches is declared.
//!
//! A change is sent again only while Redis refused it before running it
//! ([`never_ran`]), never after a connection broke under it: it may have
//! run. With `replica_acks = N`, changes go out in batches, each followed
//! by `WAIT N` in the same pipeline ([`crate::commit`]), and a change is
//! known only once N replicas have it: one the master answered but that
//! too few replicas acknowledged in time is an unknown outcome, like one
//! Redis never answered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::{AsyncCommands, Cmd, FromRedisValue, RedisError, Script, Value};
use spike_config::redis::RedisTarget;

use crate::commit::Committer;
use crate::link::{Link, Redis, never_ran};

/// What every script that changes an order shares.
#[cfg(test)]
const ORDER_LUA: &str = include_str!("lua/order.lua");

/// The purchase script; see the comments at its top.
pub const PURCHASE_SCRIPT: &str = concat!(
    include_str!("lua/order.lua"),
    include_str!("lua/purchase.lua")
);
/// The payment script.
pub const PAY_SCRIPT: &str = concat!(include_str!("lua/order.lua"), include_str!("lua/pay.lua"));
/// The expiry sweep.
pub const EXPIRE_SCRIPT: &str = concat!(
    include_str!("lua/order.lua"),
    include_str!("lua/expire.lua")
);
/// Creates a sale unless it exists: its total, and its opening time if
/// given (ARGV[2], '' for none), in one step, so that no purchase ever
/// sees a sale without the time it opens at.
const CREATE_SCRIPT: &str = r"
if redis.call('HSETNX', KEYS[1], 'total', ARGV[1]) == 0 then
  return 0
end
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'opens_at', ARGV[2])
end
return 1
";

/// Reads the record of order ARGV[1] (every key of the sale given, as to
/// the other scripts) and counts a confirmation (`confirmed`), one write,
/// so that a `WAIT` after it covers the order, whichever connection made
/// it; '' if there is no such order.
const CONFIRM_SCRIPT: &str = r"
local record = redis.call('HGET', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'confirmed', 1)
return record or ''
";

/// The Redis keys of one sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub stock: String,
    pub buyers: String,
    pub orders: String,
    pub ledger: String,
    pub deadlines: String,
    pub returned: String,
}

impl Keys {
    pub fn new(event: &str) -> Self {
        let key = |name: &str| format!("spike:{{{event}}}:{name}");
        Self {
            stock: key("stock"),
            buyers: key("buyers"),
            orders: key("orders"),
            ledger: key("ledger"),
            deadlines: key("deadlines"),
            returned: key("returned"),
        }
    }

    /// Every key, in the order the scripts take them.
    fn all(&self) -> [&str; 6] {
        [
            &self.stock,
            &self.buyers,
            &self.orders,
            &self.ledger,
            &self.deadlines,
            &self.returned,
        ]
    }
}

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Paid,
    Expired,
}

/// An order, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    pub id: String,
    pub ticket: u64,
    pub buyer: Option<String>,
    /// The node that sold it.
    pub node: String,
    pub status: Status,
    /// Milliseconds since the epoch, by Redis's clock.
    pub created: u64,
    pub pay_by: u64,
    /// When it was paid or expired.
    pub closed: Option<u64>,
}

impl Order {
    /// The order `id` from its ledger record,
    /// `status|ticket|buyer|node|created|pay_by|closed`.
    pub fn parse(id: &str, record: &str) -> Option<Self> {
        let mut fields = record.split('|');
        let mut next = || fields.next();
        let status = match next()? {
            "pending" => Status::Pending,
            "paid" => Status::Paid,
            "expired" => Status::Expired,
            _ => return None,
        };
        let ticket = next()?.parse().ok()?;
        let buyer = Some(next()?).filter(|buyer| !buyer.is_empty());
        let node = next()?.to_owned();
        let created = next()?.parse().ok()?;
        let pay_by = next()?.parse().ok()?;
        let closed = match next()? {
            "" => None,
            closed => Some(closed.parse().ok()?),
        };
        Some(Self {
            id: id.to_owned(),
            ticket,
            buyer: buyer.map(str::to_owned),
            node,
            status,
            created,
            pay_by,
            closed,
        })
    }
}

/// What a purchase tells of the order it made or found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub order_id: String,
    pub ticket: u64,
    /// The deadline to pay (ms since the epoch).
    pub pay_by: u64,
}

/// What Redis decided about one purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A ticket was sold: a new order, pending.
    Sold(Ticket),
    /// The buyer holds this live order; nothing was sold.
    AlreadyBought(Ticket),
    /// Every ticket is held by a live order.
    SoldOut,
    /// The sale's total was never set (e.g. Redis restarted without its data).
    NoSale,
    /// The sale opens at `opens_at`; Redis's clock read `now` (both ms
    /// since the epoch).
    NotOpen { opens_at: u64, now: u64 },
}

/// What Redis decided about one payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payment {
    /// Paid now.
    Paid(Order),
    /// Paid before: nothing changed.
    AlreadyPaid(Order),
    /// Expired, before this payment or now: its deadline had passed.
    Expired(Order),
    NoSuchOrder,
    /// The order is another buyer's.
    NotYours,
}

/// Why Redis gave no answer. Unless [`StoreError::never_sent`] says
/// otherwise, the outcome of a script is unknown to the node: it may or may
/// not have run.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from a script: code {0}")]
    Reply(i64),
    #[error("a malformed record in the ledger: {0:?}")]
    Record(String),
    /// The master made the change, but only `acked` replicas of the
    /// `wanted` had it in time: a failover now could lose it.
    #[error("only {acked} of {wanted} replicas acknowledged the change in time")]
    NotReplicated { acked: u64, wanted: u32 },
    /// Too many changes wait for a Redis that does not answer: this one
    /// was not sent.
    #[error("too many changes waiting for redis")]
    Busy,
}

impl StoreError {
    /// Whether the command certainly never ran: nothing happened.
    pub fn never_sent(&self) -> bool {
        match self {
            Self::Busy => true,
            Self::Redis(err) => never_ran(err),
            _ => false,
        }
    }
}

/// How long to wait before sending again a change Redis refused without
/// running it (the slot moved, a failover under way).
const RETRY_PAUSE: Duration = Duration::from_millis(25);

/// The state of a sale, as `node status` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SaleState {
    /// `None` when the sale does not exist.
    pub total: Option<u64>,
    /// Tickets held by live orders, pending or paid.
    pub sold: u64,
    pub paid: u64,
    /// Orders expired unpaid, their tickets returned.
    pub expired: u64,
    /// Returned tickets sold again.
    pub resold: u64,
    /// Orders created: every purchase that sold a ticket.
    pub orders: u64,
    /// Entries in the order stream: one per change of an order.
    pub events: u64,
    pub epoch: u64,
    /// When the sale opens (ms since the epoch), if it has a time set.
    pub opens_at: Option<u64>,
    /// Redis's clock when it was read (ms since the epoch).
    pub clock: u64,
}

impl SaleState {
    /// Live orders not paid yet.
    pub fn pending(&self) -> u64 {
        self.sold.saturating_sub(self.paid)
    }
}

/// Redis's `TIME`: seconds and microseconds since the epoch.
type RedisTime = (u64, u64);

/// The fields of the stock hash `state` reads, each absent until set.
type StockFields = (
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
    Option<u64>,
);

/// A handle on one sale in Redis. Cheap to share: every clone of the
/// link multiplexes requests over the same connection, which is
/// re-established in the background when it drops.
#[derive(Clone)]
pub struct Store {
    conn: Link,
    /// With `replica_acks`, where changes go: in batches, each followed
    /// by one `WAIT`.
    committer: Option<std::sync::Arc<Committer>>,
    replica_acks: u32,
    keys: Keys,
    purchase: Script,
    pay: Script,
    expire: Script,
    create: Script,
    confirm: Script,
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
    /// A store for `event` at `target`. It connects on first use, so a
    /// node can start while Redis is down. Every command fails after
    /// `timeout` rather than waiting on a reconnection.
    pub fn new(target: &RedisTarget, event: &str, timeout: Duration) -> Result<Self, RedisError> {
        Self::with_replica_acks(target, event, timeout, 0)
    }

    /// A store whose changes are answered only once `replica_acks`
    /// replicas have them (`WAIT`, for up to `timeout` more).
    pub fn with_replica_acks(
        target: &RedisTarget,
        event: &str,
        timeout: Duration,
        replica_acks: u32,
    ) -> Result<Self, RedisError> {
        let wait = if replica_acks > 0 {
            timeout
        } else {
            Duration::ZERO
        };
        let redis = Redis::new(target, timeout, wait)?;
        let committer = if replica_acks > 0 {
            Some(std::sync::Arc::new(Committer::new(
                &redis,
                replica_acks,
                timeout,
            )?))
        } else {
            None
        };
        Ok(Self {
            conn: redis.link()?,
            committer,
            replica_acks,
            keys: Keys::new(event),
            purchase: Script::new(PURCHASE_SCRIPT),
            pay: Script::new(PAY_SCRIPT),
            expire: Script::new(EXPIRE_SCRIPT),
            create: Script::new(CREATE_SCRIPT),
            confirm: Script::new(CONFIRM_SCRIPT),
            timeout,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// `EVALSHA` of `script` with every key of the sale; its arguments
    /// follow.
    fn script(&self, script: &Script) -> Cmd {
        let keys = self.keys.all();
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(&keys[..]);
        cmd
    }

    /// Runs `cmd`, a script that changes the sale (`code` its text, loaded
    /// on NOSCRIPT), as described at the top of this module.
    async fn change<T: FromRedisValue>(&self, code: &str, cmd: Cmd) -> Result<T, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let mut conn = self.conn.clone();
        loop {
            let sent = match &self.committer {
                Some(committer) => committer.commit(cmd.clone()).await,
                None => self.bounded(cmd.query_async::<Value>(&mut conn)).await,
            };
            let err = match sent {
                Ok(reply) => return Ok(T::from_redis_value(reply).map_err(RedisError::from)?),
                Err(StoreError::Redis(err)) => err,
                Err(err) => return Err(err),
            };
            if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                // Nothing ran: load the script, then send it again.
                self.bounded(
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(code)
                        .query_async::<String>(&mut conn),
                )
                .await?;
            } else if never_ran(&err)
                && !err.is_connection_refusal()
                && Instant::now() + RETRY_PAUSE < deadline
            {
                // Redis answered that it did not run it: a failover or a
                // slot moving is under way. (No Redis at all is answered
                // at once, and the client asked to come back.)
                tokio::time::sleep(RETRY_PAUSE).await;
            } else {
                return Err(err.into());
            }
        }
    }

    /// How many replicas are connected to the master that holds the sale,
    /// and whether the server answering is that master.
    pub async fn replicas(&self) -> Result<(bool, u64), StoreError> {
        let mut conn = self.conn.clone();
        // The key sends the pipeline to the sale's master in a cluster.
        let (_, role): (bool, Vec<Value>) = self
            .bounded(
                redis::pipe()
                    .exists(&self.keys.stock)
                    .cmd("ROLE")
                    .query_async(&mut conn),
            )
            .await?;
        let mut role = role.into_iter();
        let is_master = role
            .next()
            .and_then(|kind| String::from_redis_value(kind).ok())
            .is_some_and(|kind| kind == "master");
        if !is_master {
            conn.suspect();
            return Ok((false, 0));
        }
        let replicas = match role.nth(1) {
            Some(Value::Array(replicas)) => replicas.len() as u64,
            _ => 0,
        };
        Ok((true, replicas))
    }

    /// The replicas every change waits for.
    pub fn replica_acks(&self) -> u32 {
        self.replica_acks
    }

    /// Runs the purchase script for `buyer` (anonymous when `None`); an
    /// order it creates must be paid within `pay_window`.
    pub async fn purchase(
        &self,
        buyer: Option<&str>,
        node: &str,
        pay_window: Duration,
    ) -> Result<Outcome, StoreError> {
        let mut cmd = self.script(&self.purchase);
        cmd.arg(buyer.unwrap_or(""))
            .arg(node)
            .arg(pay_window.as_millis() as u64);
        let (code, order_id, number, at): (i64, String, u64, u64) =
            self.change(PURCHASE_SCRIPT, cmd).await?;
        let ticket = || Ticket {
            order_id: order_id.clone(),
            ticket: number,
            pay_by: at,
        };
        match code {
            1 => Ok(Outcome::Sold(ticket())),
            2 => Ok(Outcome::AlreadyBought(ticket())),
            0 => Ok(Outcome::SoldOut),
            -1 => Ok(Outcome::NoSale),
            // Redis's clock is in the ticket's place.
            -2 => Ok(Outcome::NotOpen {
                opens_at: at,
                now: number,
            }),
            code => Err(StoreError::Reply(code)),
        }
    }

    /// Runs the payment script for order `id`, paid by `payer`.
    pub async fn pay(&self, id: &str, payer: Option<&str>) -> Result<Payment, StoreError> {
        let mut cmd = self.script(&self.pay);
        cmd.arg(id).arg(payer.unwrap_or(""));
        let (code, record): (i64, String) = self.change(PAY_SCRIPT, cmd).await?;
        let order = || Order::parse(id, &record).ok_or_else(|| StoreError::Record(record.clone()));
        match code {
            1 => Ok(Payment::Paid(order()?)),
            2 => Ok(Payment::AlreadyPaid(order()?)),
            -4 => Ok(Payment::Expired(order()?)),
            -1 => Ok(Payment::NoSuchOrder),
            -3 => Ok(Payment::NotYours),
            code => Err(StoreError::Reply(code)),
        }
    }

    /// The order `id`, as the ledger holds it.
    pub async fn order(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let mut conn = self.conn.clone();
        let record: Option<String> = self.bounded(conn.hget(&self.keys.ledger, id)).await?;
        record
            .map(|record| Order::parse(id, &record).ok_or(StoreError::Record(record)))
            .transpose()
    }

    /// The order `id` as the ledger holds it, once as many replicas as
    /// every change waits for hold it too: what a node tells from memory
    /// is told only once it would survive a failover.
    pub async fn confirmed_order(&self, id: &str) -> Result<Option<Order>, StoreError> {
        let mut cmd = self.script(&self.confirm);
        cmd.arg(id);
        let record: String = self.change(CONFIRM_SCRIPT, cmd).await?;
        if record.is_empty() {
            return Ok(None);
        }
        Order::parse(id, &record)
            .map(Some)
            .ok_or(StoreError::Record(record))
    }

    /// Expires at most `limit` pending orders past their deadline; returns
    /// how many it expired, and whether more may be due.
    pub async fn sweep(&self, limit: u64) -> Result<(u64, bool), StoreError> {
        let mut cmd = self.script(&self.expire);
        cmd.arg(limit);
        let (expired, looked_at): (u64, u64) = self.change(EXPIRE_SCRIPT, cmd).await?;
        Ok((expired, looked_at >= limit))
    }

    /// Every buyer holding a live order, with it, read in batches (`HSCAN`
    /// of the buyers, then their orders from the ledger) so that a large
    /// sale does not hold Redis up; each batch is bounded by the timeout.
    pub async fn buyers(&self) -> Result<HashMap<String, Ticket>, StoreError> {
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
            if !batch.is_empty() {
                let ids: Vec<&str> = batch.iter().map(|(_, id)| id.as_str()).collect();
                let records: Vec<Option<String>> = self
                    .bounded(
                        redis::cmd("HMGET")
                            .arg(&self.keys.ledger)
                            .arg(&ids)
                            .query_async(&mut conn),
                    )
                    .await?;
                for ((buyer, id), record) in batch.iter().zip(records) {
                    let Some(order) = record.and_then(|record| Order::parse(id, &record)) else {
                        continue;
                    };
                    let ticket = Ticket {
                        order_id: order.id,
                        ticket: order.ticket,
                        pay_by: order.pay_by,
                    };
                    buyers.insert(buyer.clone(), ticket);
                }
            }
            if next == 0 {
                return Ok(buyers);
            }
            cursor = next;
        }
    }

    /// Creates the sale with `total` tickets, opening at `opens_at` (ms
    /// since the epoch) if given, unless it exists; never touches `sold`.
    /// Returns whether it was created.
    pub async fn ensure_sale(&self, total: u64, opens_at: Option<u64>) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.create.get_hash())
            .arg(1)
            .arg(&self.keys.stock)
            .arg(total)
            .arg(opens_at.map_or_else(String::new, |at| at.to_string()));
        self.change(CREATE_SCRIPT, cmd).await
    }

    /// Starts the sale over with `total` tickets, opening at `opens_at` if
    /// given (at once if not): nothing sold, no buyers, no orders, and a
    /// new epoch so running nodes refill their local stock.
    pub async fn reset(&self, total: u64, opens_at: Option<u64>) -> Result<SaleState, StoreError> {
        let mut conn = self.conn.clone();
        let keys = &self.keys;
        let mut pipe = redis::pipe();
        pipe.atomic();
        for key in [
            &keys.buyers,
            &keys.orders,
            &keys.ledger,
            &keys.deadlines,
            &keys.returned,
        ] {
            pipe.del(key).ignore();
        }
        pipe.hset_multiple(
            &keys.stock,
            &[
                ("total", total),
                ("sold", 0),
                ("paid", 0),
                ("expired", 0),
                ("resold", 0),
            ],
        )
        .ignore();
        match opens_at {
            Some(opens_at) => pipe.hset(&keys.stock, "opens_at", opens_at).ignore(),
            None => pipe.hdel(&keys.stock, "opens_at").ignore(),
        };
        pipe.hincr(&keys.stock, "epoch", 1);
        pipe.cmd("TIME");
        let (epoch, clock): (u64, RedisTime) = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(SaleState {
            total: Some(total),
            sold: 0,
            paid: 0,
            expired: 0,
            resold: 0,
            orders: 0,
            events: 0,
            epoch,
            opens_at,
            clock: clock.0 * 1000 + clock.1 / 1000,
        })
    }

    /// Reads the sale's state in one round trip.
    pub async fn state(&self) -> Result<SaleState, StoreError> {
        let mut conn = self.conn.clone();
        let (fields, events, clock): (StockFields, u64, RedisTime) = self
            .bounded(
                redis::pipe()
                    .hmget(
                        &self.keys.stock,
                        &[
                            "total", "sold", "paid", "expired", "resold", "epoch", "opens_at",
                        ],
                    )
                    .xlen(&self.keys.orders)
                    .cmd("TIME")
                    .query_async(&mut conn),
            )
            .await?;
        let (total, sold, paid, expired, resold, epoch, opens_at) = fields;
        let (sold, expired) = (sold.unwrap_or(0), expired.unwrap_or(0));
        Ok(SaleState {
            total,
            sold,
            paid: paid.unwrap_or(0),
            expired,
            resold: resold.unwrap_or(0),
            // Every order created is live or expired.
            orders: sold + expired,
            events,
            epoch: epoch.unwrap_or(0),
            opens_at,
            clock: clock.0 * 1000 + clock.1 / 1000,
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
            Err(_) => {
                self.conn.suspect();
                Err(StoreError::Timeout(self.timeout))
            }
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
        assert_eq!(keys.ledger, "spike:{g1234}:ledger");
        assert_eq!(keys.deadlines, "spike:{g1234}:deadlines");
        assert_eq!(keys.returned, "spike:{g1234}:returned");
    }

    #[test]
    fn a_ledger_record_is_read_whole_or_not_at_all() {
        let order = Order::parse("5-0", "paid|7|alice|node-1|1000|2000|1500").unwrap();
        assert_eq!(
            order,
            Order {
                id: "5-0".to_owned(),
                ticket: 7,
                buyer: Some("alice".to_owned()),
                node: "node-1".to_owned(),
                status: Status::Paid,
                created: 1000,
                pay_by: 2000,
                closed: Some(1500),
            }
        );
        let anonymous = Order::parse("6-0", "pending|8||node-2|1000|2000|").unwrap();
        assert_eq!((anonymous.buyer, anonymous.closed), (None, None));
        for bad in [
            "",
            "sold|1||n|1|2|",
            "pending|x||n|1|2|",
            "pending|1||n|1|2",
        ] {
            assert_eq!(Order::parse("1-0", bad), None, "{bad:?}");
        }
    }

    #[test]
    fn every_script_that_changes_an_order_shares_the_same_rules() {
        for script in [PURCHASE_SCRIPT, PAY_SCRIPT, EXPIRE_SCRIPT] {
            assert!(script.starts_with(ORDER_LUA));
        }
    }
}
