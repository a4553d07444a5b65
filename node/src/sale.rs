//! A node's side of the sale: the two deductions of a purchase, what the node
//! knows of the global stock, and the background task that keeps that
//! knowledge fresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::stock::LocalStock;
use crate::store::{Outcome, Store, StoreError};

/// How a purchase ended, as the client and the stat log see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purchase {
    Sold {
        order_id: String,
    },
    AlreadyBought {
        order_id: String,
    },
    SoldOut,
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
}

/// The node's state of the sale, shared by every connection.
#[derive(Debug)]
pub struct Sale {
    name: String,
    total: u64,
    stock: LocalStock,
    store: Store,
    pub counters: Counters,
    /// Set once the sale is known to exist in Redis (created by this node or
    /// another). Until then purchases answer 503 without asking Redis.
    ready: AtomicBool,
    /// Whether Redis answered the last command the node sent it.
    redis: RedisHealth,
    /// Set once Redis said the sale is sold out: later purchases answer from
    /// memory. Cleared when a sync sees tickets left again (a reset).
    sold_out: AtomicBool,
    /// The sale's epoch when the node last looked ([`UNKNOWN_EPOCH`] before
    /// the first look); a new one means the sale was started over, and the
    /// local stock is refilled.
    epoch: AtomicU64,
    /// Once the sale is sold out, every buyer and their order: the set is
    /// final then, and a buyer asking again is answered from memory, as
    /// everyone else is. Cleared when the sale is started over.
    buyers: ArcSwapOption<HashMap<String, String>>,
}

const UNKNOWN_EPOCH: u64 = u64::MAX;

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
pub struct Stats<'a> {
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
    pub redis_up: bool,
    pub global_sold_out: bool,
}

impl Sale {
    pub fn new(name: String, total: u64, local_stock: u64, store: Store) -> Self {
        Self {
            name,
            total,
            stock: LocalStock::new(local_stock),
            store,
            counters: Counters::default(),
            ready: AtomicBool::new(false),
            redis: RedisHealth::default(),
            sold_out: AtomicBool::new(false),
            epoch: AtomicU64::new(UNKNOWN_EPOCH),
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
        self.stock.capacity() - self.stock.remaining()
    }

    /// One purchase: local stock first, then the global stock in Redis.
    pub async fn buy(self: &Arc<Self>, buyer: Option<String>) -> Purchase {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if self.sold_out.load(Ordering::Relaxed) || self.stock.remaining() == 0 {
            // Nothing to sell here; a named buyer may hold a ticket already
            // (bought through another node, or by a purchase whose answer
            // was lost), and gets it.
            let purchase = match &buyer {
                Some(buyer) => self.held_by(buyer).await,
                None => Purchase::SoldOut,
            };
            return self.record(purchase);
        }
        if !self.ready.load(Ordering::Relaxed) {
            return self.record(Purchase::Unavailable(Unavailable::Store));
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

    /// The order `buyer` holds, when this node has nothing left to sell:
    /// from memory once the sale is sold out and its buyers are loaded,
    /// from Redis before (this node's share gone while others sell on).
    async fn held_by(&self, buyer: &str) -> Purchase {
        let held = |order: Option<&String>| match order {
            Some(order_id) => Purchase::AlreadyBought {
                order_id: order_id.clone(),
            },
            None => Purchase::SoldOut,
        };
        if self.sold_out.load(Ordering::Relaxed)
            && let Some(buyers) = self.buyers.load().as_deref()
        {
            return held(buyers.get(buyer));
        }
        match self.store.order_of(buyer).await {
            Ok(order) => {
                self.redis.answered();
                held(order.as_ref())
            }
            Err(err) => {
                self.redis.failed(&err);
                Purchase::Unavailable(Unavailable::Store)
            }
        }
    }

    async fn sell(&self, buyer: Option<&str>) -> Purchase {
        let Some(reservation) = self.stock.take() else {
            return Purchase::SoldOut;
        };
        // From here on, every path but a sale drops `reservation`, which
        // gives the unit back.
        match self.store.purchase(buyer, &self.name).await {
            Ok(outcome) => {
                self.redis.answered();
                match outcome {
                    Outcome::Sold { order_id } => {
                        reservation.commit();
                        Purchase::Sold { order_id }
                    }
                    Outcome::AlreadyBought { order_id } => Purchase::AlreadyBought { order_id },
                    Outcome::SoldOut => {
                        self.sold_out.store(true, Ordering::Relaxed);
                        Purchase::SoldOut
                    }
                    Outcome::NoSale => Purchase::Unavailable(Unavailable::NoSale),
                }
            }
            Err(err) => {
                self.redis.failed(&err);
                Purchase::Unavailable(Unavailable::Unknown)
            }
        }
    }

    /// Counts a purchase's result and writes its stat line: the seed's
    /// `stat.log`, with the result, the node and its sales so far.
    fn record(&self, purchase: Purchase) -> Purchase {
        let c = &self.counters;
        let (counter, result) = match purchase {
            Purchase::Sold { .. } => (&c.granted, "sold"),
            Purchase::AlreadyBought { .. } => (&c.already_bought, "already_bought"),
            Purchase::SoldOut => (&c.sold_out, "sold_out"),
            Purchase::Unavailable(Unavailable::Store) => (&c.errors, "store_unavailable"),
            Purchase::Unavailable(Unavailable::Unknown) => (&c.errors, "outcome_unknown"),
            Purchase::Unavailable(Unavailable::NoSale) => (&c.errors, "no_sale"),
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

    pub fn stats(&self) -> Stats<'_> {
        let c = &self.counters;
        Stats {
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
        match self.store.ensure_sale(self.total).await {
            Ok(created) => {
                if created {
                    tracing::info!(total = self.total, "created the sale");
                }
                self.ready.store(true, Ordering::Relaxed);
                self.refresh().await;
                tracing::info!("the sale exists; selling");
            }
            Err(err) => self.redis.failed(&err),
        }
    }

    /// Reads the sale's state: whether it is sold out, and whether it was
    /// started over since the last look.
    async fn refresh(&self) {
        match self.store.state().await {
            Ok(state) => {
                self.redis.answered();
                let previous = self.epoch.swap(state.epoch, Ordering::Relaxed);
                if previous != UNKNOWN_EPOCH && previous != state.epoch {
                    self.stock.refill();
                    tracing::info!(epoch = state.epoch, "the sale was started over");
                }
                let sold_out = state.total.is_some_and(|total| state.sold >= total);
                self.sold_out.store(sold_out, Ordering::Relaxed);
                if !sold_out {
                    self.buyers.store(None);
                } else if self.buyers.load().is_none() {
                    self.load_buyers().await;
                }
            }
            Err(err) => self.redis.failed(&err),
        }
    }

    /// Loads the buyers of a sold-out sale; until it succeeds (a later sync
    /// tries again), a named buyer's order is looked up in Redis.
    async fn load_buyers(&self) {
        match self.store.buyers().await {
            Ok(buyers) => {
                tracing::info!(
                    buyers = buyers.len(),
                    "sold out; buyers asking again are answered from memory"
                );
                self.buyers.store(Some(Arc::new(buyers)));
            }
            Err(err) => self.redis.failed(&err),
        }
    }
}
