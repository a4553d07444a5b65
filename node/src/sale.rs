//! A node's side of the sale: the two deductions of a purchase, payments
//! and look-ups of orders, what the node knows of the global stock, and the
//! background tasks that keep that knowledge fresh and expire unpaid
//! orders.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::stock::LocalStock;
use crate::store::{Order, Outcome, Payment, SaleState, Status, Store, StoreError, Ticket};

/// How a purchase ended, as the client and the stat log see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purchase {
    Sold(Ticket),
    AlreadyBought(Ticket),
    SoldOut,
    /// The sale opens at this time (ms since the epoch).
    NotOpen {
        opens_at: u64,
    },
    /// Redis failed or timed out, or holds no sale; the local unit was given
    /// back.
    Unavailable(Unavailable),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Redis did not answer, or has not answered yet since start-up, before
    /// anything was asked of it: nothing was granted.
    Store,
    /// Redis did not answer the purchase itself: it may have run it, and
    /// the buyer may hold a ticket. Asking again with the same buyer id
    /// tells.
    Unknown,
    /// Redis answers but holds no such sale.
    NoSale,
    /// Fewer replicas follow the master than `replica_acks` asks: nothing
    /// was asked of Redis.
    Replicas,
}

/// Counters of purchase requests and their results. Each is a relaxed
/// atomic: they are read only for `/stats`, never to decide anything.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub granted: AtomicU64,
    pub already_bought: AtomicU64,
    pub sold_out: AtomicU64,
    pub errors: AtomicU64,
    pub rejected: AtomicU64,
    /// Purchases before the sale opened.
    pub not_open: AtomicU64,
    /// Purchase scripts sent to Redis: about the local stock (and the
    /// tickets returned), whatever the number of requests.
    pub purchase_scripts: AtomicU64,
    /// Orders paid through this node.
    pub paid: AtomicU64,
    /// Orders this node's sweeps expired.
    pub expired: AtomicU64,
}

impl Counters {
    /// Counts a request refused as malformed, whatever refused it.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
}

/// The node's state of the sale, shared by every connection.
#[derive(Debug)]
pub struct Sale {
    name: String,
    total: u64,
    stock: LocalStock,
    store: Store,
    /// How long a buyer has to pay for an order this node sells.
    pay_window: Duration,
    /// When the sale opens (ms since the epoch, by Redis's clock), 0 if it
    /// has no time set: this node's own, for a sale it creates, then
    /// Redis's.
    opens_at: AtomicU64,
    /// Redis's clock minus this node's (ms), as last measured: the sale
    /// opens by Redis's clock, and a node whose clock runs ahead must not
    /// send the flood of the opening moment to Redis early.
    clock_offset: AtomicI64,
    /// Pending orders, as the node last read them plus those it sold since:
    /// with none, there is nothing to expire, and the sweep asks nothing
    /// of Redis.
    pending: AtomicU64,
    /// The sale's count of expired orders when the node last looked
    /// ([`UNKNOWN`] before the first look): each one since is a ticket
    /// back on sale, which the local stock makes room for.
    expired_seen: AtomicU64,
    pub counters: Counters,
    /// Set once the sale is known to exist in Redis (created by this node or
    /// another). Until then purchases answer 503 without asking Redis.
    ready: AtomicBool,
    /// Whether Redis answered the last command the node sent it.
    redis: RedisHealth,
    /// Set once Redis said the sale is sold out: later purchases answer from
    /// memory. Cleared when a sync sees tickets left again (a reset).
    sold_out: AtomicBool,
    /// Set while fewer replicas follow the master than `replica_acks`
    /// asks (by the last sync, or a change they did not acknowledge):
    /// purchases answer 503 without asking Redis.
    replicas_short: AtomicBool,
    /// The sale's epoch when the node last looked ([`UNKNOWN`] before the
    /// first look); a new one means the sale was started over, and the
    /// local stock is refilled.
    epoch: AtomicU64,
    /// While the sale is sold out, every buyer and their order, so that a
    /// buyer asking again is answered from memory, as everyone else is.
    /// Kept with the sale's [`Generation`] it was read at: an order that
    /// expires, or a ticket sold again, makes a new one, and the node
    /// reads the buyers again at its next sync; once the node has seen the
    /// sale started over, it no longer answers from the last one's buyers.
    buyers: ArcSwapOption<Buyers>,
}

/// The buyers of a sold-out sale, by buyer id, with their orders.
#[derive(Debug)]
struct Buyers {
    generation: Generation,
    orders: HashMap<String, Ticket>,
}

/// What tells one set of buyers from another: the sale's epoch, the orders
/// created and the orders expired in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Generation {
    epoch: u64,
    orders: u64,
    expired: u64,
}

impl Generation {
    fn of(state: &SaleState) -> Self {
        Self {
            epoch: state.epoch,
            orders: state.orders,
            expired: state.expired,
        }
    }
}

/// A count not read from Redis yet.
const UNKNOWN: u64 = u64::MAX;

/// Whether Redis answered the node's last command, kept so that only a change
/// is logged: a dead Redis cannot flood the log.
#[derive(Debug, Default)]
struct RedisHealth {
    /// 0 before the first command, then [`Self::UP`] or [`Self::DOWN`].
    state: AtomicU8,
}

impl RedisHealth {
    const UP: u8 = 1;
    const DOWN: u8 = 2;

    fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == Self::UP
    }

    fn answered(&self) {
        if self.state.swap(Self::UP, Ordering::Relaxed) == Self::DOWN {
            tracing::info!("redis answers again");
        }
    }

    fn failed(&self, err: &StoreError) {
        if self.state.swap(Self::DOWN, Ordering::Relaxed) != Self::DOWN {
            tracing::warn!(error = %err, "redis is unreachable; purchases answer 503 until it is back");
        }
    }
}

/// What `/stats` shows.
#[derive(Debug, Serialize)]
pub struct NodeStats<'a> {
    pub node: &'a str,
    pub local_stock: u64,
    pub local_remaining: u64,
    pub local_sold: u64,
    pub requests: u64,
    pub granted: u64,
    pub already_bought: u64,
    pub sold_out: u64,
    pub errors: u64,
    pub rejected: u64,
    pub not_open: u64,
    pub purchase_scripts: u64,
    pub paid: u64,
    pub expired: u64,
    pub redis_up: bool,
    pub global_sold_out: bool,
}

/// How a payment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pay {
    Done(Payment),
    /// Redis failed: before the script was sent (nothing happened), or
    /// while it ran (it may have been paid: looking it up tells).
    Unavailable(Unavailable),
}

/// What a node sells: its name, the sale's size should it create it, its
/// own stock, and the terms of its orders.
#[derive(Debug, Clone)]
pub struct Terms {
    pub name: String,
    pub total: u64,
    pub local_stock: u64,
    pub pay_window: Duration,
    /// When a sale this node creates opens (ms since the epoch).
    pub opens_at: Option<u64>,
}

impl Sale {
    pub fn new(terms: Terms, store: Store) -> Self {
        // Replicas are counted before the first sale.
        let replicas_short = store.replica_acks() > 0;
        Self {
            name: terms.name,
            total: terms.total,
            stock: LocalStock::new(terms.local_stock),
            store,
            pay_window: terms.pay_window,
            opens_at: AtomicU64::new(terms.opens_at.unwrap_or(0)),
            clock_offset: AtomicI64::new(0),
            pending: AtomicU64::new(0),
            expired_seen: AtomicU64::new(UNKNOWN),
            counters: Counters::default(),
            ready: AtomicBool::new(false),
            redis: RedisHealth::default(),
            sold_out: AtomicBool::new(false),
            replicas_short: AtomicBool::new(replicas_short),
            epoch: AtomicU64::new(UNKNOWN),
            buyers: ArcSwapOption::empty(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn redis_up(&self) -> bool {
        self.redis.is_up()
    }

    /// Tickets this node sold and kept (for the stat line).
    pub fn local_sold(&self) -> u64 {
        self.stock.sold()
    }

    /// The time by Redis's clock (ms since the epoch), as this node's
    /// clock and the last measured offset tell.
    pub fn redis_now(&self) -> u64 {
        now_ms().saturating_add_signed(self.clock_offset.load(Ordering::Relaxed))
    }

    /// Notes Redis's clock read as `redis_now`, just now.
    fn clock_read(&self, redis_now: u64) {
        let offset = i64::try_from(redis_now).unwrap_or(i64::MAX)
            - i64::try_from(now_ms()).unwrap_or(i64::MAX);
        self.clock_offset.store(offset, Ordering::Relaxed);
    }

    /// When the sale opens (ms since the epoch), if it is not open yet.
    fn opens_after(&self) -> Option<u64> {
        let opens_at = self.opens_at.load(Ordering::Relaxed);
        (opens_at > self.redis_now()).then_some(opens_at)
    }

    /// One purchase: local stock first, then the global stock in Redis.
    pub async fn buy(self: &Arc<Self>, buyer: Option<String>) -> Purchase {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if self.sold_out.load(Ordering::Relaxed) || self.stock.remaining() == 0 {
            // Nothing to sell here, and nothing asked of Redis; a named buyer
            // who holds a ticket (bought through another node, or by a
            // purchase whose answer was lost) gets it once the sale's buyers
            // are known.
            let purchase = match buyer.as_deref().map(|b| (b, self.held_by(b))) {
                Some((buyer, Some(ticket))) if self.store.replica_acks() > 0 => {
                    self.confirm_held(buyer, ticket).await
                }
                Some((_, Some(ticket))) => Purchase::AlreadyBought(ticket),
                _ => Purchase::SoldOut,
            };
            return self.record(purchase);
        }
        if !self.ready.load(Ordering::Relaxed) {
            return self.record(Purchase::Unavailable(Unavailable::Store));
        }
        // Safety before availability: a sale too few replicas would have
        // could be lost in a failover, so none is made.
        if self.replicas_short.load(Ordering::Relaxed) {
            return self.record(Purchase::Unavailable(Unavailable::Replicas));
        }
        // Before the opening, from memory: the flood that starts before it
        // never reaches Redis.
        if let Some(opens_at) = self.opens_after() {
            return self.record(Purchase::NotOpen { opens_at });
        }
        // The rest runs in a task of its own: a client that hangs up must not
        // cancel a purchase that Redis may already have made, or the node
        // would lose count of what it sold.
        let sale = Arc::clone(self);
        let task = tokio::spawn(async move {
            let purchase = sale.sell(buyer.as_deref()).await;
            sale.record(purchase)
        });
        match task.await {
            Ok(purchase) => purchase,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            // The runtime is shutting down.
            Err(_) => Purchase::Unavailable(Unavailable::Store),
        }
    }

    /// The order `buyer` holds, from the buyers of the sale as loaded once
    /// it sold out (`None` before).
    fn held_by(&self, buyer: &str) -> Option<Ticket> {
        let buyers = self.buyers.load();
        let epoch = self.epoch.load(Ordering::Relaxed);
        let buyers = buyers
            .as_deref()
            .filter(|buyers| buyers.generation.epoch == epoch)?;
        buyers.orders.get(buyer).cloned()
    }

    /// `buyer`'s order from memory, told only once the replicas hold it
    /// (the buyers were read from the master, which may have had it
    /// alone): gone, the sale is sold out for them.
    async fn confirm_held(&self, buyer: &str, ticket: Ticket) -> Purchase {
        match self.store.confirmed_order(&ticket.order_id).await {
            Ok(Some(order))
                if order.buyer.as_deref() == Some(buyer) && order.status != Status::Expired =>
            {
                Purchase::AlreadyBought(ticket)
            }
            Ok(_) => Purchase::SoldOut,
            Err(err) => Purchase::Unavailable(self.unanswered(&err)),
        }
    }

    async fn sell(&self, buyer: Option<&str>) -> Purchase {
        let Some(reservation) = self.stock.take() else {
            return Purchase::SoldOut;
        };
        // From here on, every path but a sale drops `reservation`, which
        // gives the unit back.
        self.counters
            .purchase_scripts
            .fetch_add(1, Ordering::Relaxed);
        match self
            .store
            .purchase(buyer, &self.name, self.pay_window)
            .await
        {
            Ok(outcome) => {
                self.redis.answered();
                match outcome {
                    Outcome::Sold(ticket) => {
                        reservation.commit();
                        self.pending.fetch_add(1, Ordering::Relaxed);
                        Purchase::Sold(ticket)
                    }
                    Outcome::AlreadyBought(ticket) => Purchase::AlreadyBought(ticket),
                    Outcome::SoldOut => {
                        self.sold_out.store(true, Ordering::Relaxed);
                        Purchase::SoldOut
                    }
                    Outcome::NoSale => Purchase::Unavailable(Unavailable::NoSale),
                    Outcome::NotOpen { opens_at, now } => {
                        // The node had not heard, or its clock runs ahead
                        // of Redis's: it holds the next ones itself.
                        self.clock_read(now);
                        self.opens_at.store(opens_at, Ordering::Relaxed);
                        Purchase::NotOpen { opens_at }
                    }
                }
            }
            Err(err) => Purchase::Unavailable(self.unanswered(&err)),
        }
    }

    /// What a failed change tells: nothing, if it never reached Redis.
    fn unanswered(&self, err: &StoreError) -> Unavailable {
        if let StoreError::NotReplicated { .. } = err {
            // Until the next sync counts them again.
            if !self.replicas_short.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %err, "purchases answer 503 until enough replicas follow");
            }
        } else {
            self.redis.failed(err);
        }
        if err.never_sent() {
            Unavailable::Store
        } else {
            Unavailable::Unknown
        }
    }

    /// Counts a purchase's result and writes its stat line: the seed's
    /// `stat.log`, with the result, the node and its sales so far.
    fn record(&self, purchase: Purchase) -> Purchase {
        let c = &self.counters;
        let (counter, result) = match purchase {
            Purchase::Sold(_) => (&c.granted, "sold"),
            Purchase::AlreadyBought(_) => (&c.already_bought, "already_bought"),
            Purchase::SoldOut => (&c.sold_out, "sold_out"),
            Purchase::NotOpen { .. } => (&c.not_open, "not_open"),
            Purchase::Unavailable(Unavailable::Store) => (&c.errors, "store_unavailable"),
            Purchase::Unavailable(Unavailable::Unknown) => (&c.errors, "outcome_unknown"),
            Purchase::Unavailable(Unavailable::NoSale) => (&c.errors, "no_sale"),
            Purchase::Unavailable(Unavailable::Replicas) => (&c.errors, "too_few_replicas"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            target: "stat",
            result,
            node = %self.name,
            local_sales = self.local_sold(),
        );
        purchase
    }

    /// Pays order `id` for `payer`.
    pub async fn pay(&self, id: &str, payer: Option<&str>) -> Pay {
        match self.store.pay(id, payer).await {
            Ok(payment) => {
                self.redis.answered();
                if matches!(payment, Payment::Paid(_)) {
                    self.counters.paid.fetch_add(1, Ordering::Relaxed);
                }
                Pay::Done(payment)
            }
            Err(err) => Pay::Unavailable(self.unanswered(&err)),
        }
    }

    /// The order `id`, `Err` if Redis did not answer.
    pub async fn order(&self, id: &str) -> Result<Option<Order>, Unavailable> {
        match self.store.order(id).await {
            Ok(order) => {
                self.redis.answered();
                Ok(order)
            }
            Err(err) => {
                self.redis.failed(&err);
                Err(Unavailable::Store)
            }
        }
    }

    /// Expires the unpaid orders past their deadline, every `interval`,
    /// until `shutdown`; right away again while more are due. Every node
    /// does: each expiry is one atomic script, so their sweeps never expire
    /// an order twice, and expiry goes on while any node runs. While no
    /// order is pending, as far as the node knows, it asks nothing of Redis.
    pub async fn expire(&self, interval: Duration, shutdown: CancellationToken) {
        /// The most orders one script expires: a burst of deadlines is
        /// taken in slices, so no call holds Redis up.
        const SLICE: u64 = 200;
        loop {
            if self.pending.load(Ordering::Relaxed) > 0 {
                match self.store.sweep(SLICE).await {
                    Ok((expired, more)) => {
                        self.redis.answered();
                        if expired > 0 {
                            self.counters.expired.fetch_add(expired, Ordering::Relaxed);
                            tracing::debug!(expired, "expired unpaid orders");
                        }
                        if more {
                            continue;
                        }
                    }
                    Err(err) => self.redis.failed(&err),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    pub fn stats(&self) -> NodeStats<'_> {
        let c = &self.counters;
        NodeStats {
            node: &self.name,
            local_stock: self.stock.capacity(),
            local_remaining: self.stock.remaining(),
            local_sold: self.local_sold(),
            requests: c.requests.load(Ordering::Relaxed),
            granted: c.granted.load(Ordering::Relaxed),
            already_bought: c.already_bought.load(Ordering::Relaxed),
            sold_out: c.sold_out.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            not_open: c.not_open.load(Ordering::Relaxed),
            purchase_scripts: c.purchase_scripts.load(Ordering::Relaxed),
            paid: c.paid.load(Ordering::Relaxed),
            expired: c.expired.load(Ordering::Relaxed),
            redis_up: self.redis_up(),
            global_sold_out: self.sold_out.load(Ordering::Relaxed),
        }
    }

    /// Keeps the node's knowledge of the sale fresh until `shutdown`: first
    /// makes sure the sale exists (retrying while Redis is unreachable), then
    /// reads its state every `interval`.
    pub async fn sync(&self, interval: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if !self.ready.load(Ordering::Relaxed) {
                self.prepare().await;
            } else {
                self.refresh().await;
            }
        }
    }

    /// Creates the sale unless it exists. Done once per process: after a
    /// Redis restart that lost the data, recreating it would sell again the
    /// tickets already sold, so the node answers "no sale" instead.
    async fn prepare(&self) {
        let opens_at = Some(self.opens_at.load(Ordering::Relaxed)).filter(|&at| at > 0);
        match self.store.ensure_sale(self.total, opens_at).await {
            Ok(created) => {
                if created {
                    tracing::info!(total = self.total, "created the sale");
                }
                self.ready.store(true, Ordering::Relaxed);
                self.refresh().await;
                tracing::info!("the sale exists; selling");
            }
            Err(err) => _ = self.unanswered(&err),
        }
    }

    /// Reads the sale's state: whether it is sold out, when it opens,
    /// whether tickets came back, and whether it was started over since
    /// the last look.
    async fn refresh(&self) {
        let wanted = self.store.replica_acks();
        if wanted > 0 {
            match self.store.replicas().await {
                Ok((is_master, replicas)) => {
                    let short = !is_master || replicas < u64::from(wanted);
                    if self.replicas_short.swap(short, Ordering::Relaxed) != short {
                        if short {
                            tracing::warn!(
                                replicas,
                                wanted,
                                "too few replicas: purchases answer 503"
                            );
                        } else {
                            tracing::info!(replicas, "enough replicas follow the master: selling");
                        }
                    }
                }
                Err(err) => self.redis.failed(&err),
            }
        }
        match self.store.state().await {
            Ok(state) => {
                self.redis.answered();
                self.clock_read(state.clock);
                self.opens_at
                    .store(state.opens_at.unwrap_or(0), Ordering::Relaxed);
                self.pending.store(state.pending(), Ordering::Relaxed);
                let previous = self.epoch.swap(state.epoch, Ordering::Relaxed);
                let started_over = previous != UNKNOWN && previous != state.epoch;
                if started_over {
                    self.stock.refill();
                    tracing::info!(epoch = state.epoch, "the sale was started over");
                }
                // Tickets that expired since the last look are on sale
                // again: room for them, on every node.
                let seen = self.expired_seen.swap(state.expired, Ordering::Relaxed);
                if seen != UNKNOWN && !started_over && state.expired > seen {
                    self.stock.add(state.expired - seen);
                }
                let sold_out = state.total.is_some_and(|total| state.sold >= total);
                self.sold_out.store(sold_out, Ordering::Relaxed);
                let generation = Generation::of(&state);
                let loaded = self
                    .buyers
                    .load()
                    .as_deref()
                    .is_some_and(|buyers| buyers.generation == generation);
                if !sold_out {
                    self.buyers.store(None);
                } else if !loaded {
                    self.load_buyers(generation).await;
                }
            }
            Err(err) => self.redis.failed(&err),
        }
    }

    /// Loads the buyers of the sold-out sale at `generation`, and keeps
    /// them only if no order was created or expired meanwhile; until then
    /// (a later sync tries again), buyers asking again are answered "sold
    /// out".
    async fn load_buyers(&self, generation: Generation) {
        let loaded = async {
            let orders = self.store.buyers().await?;
            let state = self.store.state().await?;
            Ok::<_, StoreError>((Generation::of(&state) == generation).then_some(orders))
        };
        match loaded.await {
            Ok(Some(orders)) => {
                tracing::info!(
                    buyers = orders.len(),
                    "sold out; buyers asking again are answered from memory"
                );
                self.buyers
                    .store(Some(Arc::new(Buyers { generation, orders })));
            }
            Ok(None) => {}
            Err(err) => self.redis.failed(&err),
        }
    }
}

/// Milliseconds since the epoch, by this node's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}
