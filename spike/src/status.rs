//! The state of a sale, from Redis (the truth about tickets), from the
//! balancer's admin API (the traffic per node) and from the order
//! service's (the orders in the database), as the live status line and as
//! the summary that `spike status` and a stopping `spike up` print.

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use node::store::Store;

use crate::plan::Plan;

/// How long a look at Redis or the admin API may take.
const LOOK_TIMEOUT: Duration = Duration::from_secs(2);

/// One look at the sale.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// `None` when Redis did not answer or holds no such sale.
    pub sale: Option<SaleFigures>,
    /// `None` when the balancer did not answer.
    pub upstreams: Option<Vec<UpstreamView>>,
    /// `None` when the order service did not answer.
    pub orders: Option<OrdersView>,
}

/// The orders in the database, as the order service's `/stats` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OrdersView {
    pub orders: u64,
    pub paid: u64,
    pub pending: u64,
    pub expired: u64,
    /// Events of the stream not in the database yet.
    pub lag: u64,
    /// How long the oldest of them has waited (ms).
    pub lag_ms: u64,
    /// Entries in the order stream when the lag was read.
    pub stream: u64,
}

/// What Redis holds of a sale: its tickets, those held by live orders
/// (sold), paid or pending, those returned by expired orders and sold
/// again, and the orders created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaleFigures {
    pub total: u64,
    pub sold: u64,
    pub paid: u64,
    pub expired: u64,
    pub resold: u64,
    pub orders: u64,
    /// Entries in the order stream.
    pub events: u64,
}

impl SaleFigures {
    pub fn pending(&self) -> u64 {
        self.sold.saturating_sub(self.paid)
    }
}

/// One upstream as the balancer's `/stats` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamView {
    pub addr: SocketAddr,
    pub weight: u64,
    pub requests: u64,
    pub state: String,
    /// While it rests after failures, the seconds until a request may try
    /// it again.
    pub rest_left: Option<f64>,
}

impl UpstreamView {
    /// Its state as the live line and the summary show it: `resting 7s`
    /// while it rests.
    pub fn state_text(&self) -> String {
        match self.rest_left {
            Some(left) => format!("{} {:.0}s", self.state, left.ceil()),
            None => self.state.clone(),
        }
    }
}

/// Reads the sale and the traffic.
#[derive(Debug)]
pub struct Observer {
    store: Store,
    admin: SocketAddr,
    orders_admin: SocketAddr,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Observer {
    pub fn new(plan: &Plan) -> anyhow::Result<Self> {
        let store = Store::new(&plan.node.redis, &plan.node.event, LOOK_TIMEOUT)?;
        Ok(Self {
            store,
            admin: plan.balancer.admin,
            orders_admin: plan.orders.admin,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Waits until the node at `addr` answers its health check and has
    /// reached Redis.
    pub async fn wait_for_node(&self, addr: SocketAddr, within: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let health = self.get_json(&format!("http://{addr}/health")).await;
            if health.is_some_and(|h| h["redis"] == "up") {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("no healthy answer from {addr} within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get_json(&self, url: &str) -> Option<serde_json::Value> {
        let response = tokio::time::timeout(LOOK_TIMEOUT, self.client.get(url.parse().ok()?))
            .await
            .ok()?
            .ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        serde_json::from_slice(&body).ok()
    }

    pub async fn look(&self) -> Snapshot {
        let (sale, upstreams, orders) = tokio::join!(self.sale(), self.upstreams(), self.orders());
        Snapshot {
            sale,
            upstreams,
            orders,
        }
    }

    async fn orders(&self) -> Option<OrdersView> {
        let stats = self
            .get_json(&format!("http://{}/stats", self.orders_admin))
            .await?;
        let (orders, lag) = (&stats["orders"], &stats["lag"]);
        Some(OrdersView {
            orders: orders["orders"].as_u64()?,
            paid: orders["paid"].as_u64()?,
            pending: orders["pending"].as_u64()?,
            expired: orders["expired"].as_u64()?,
            lag: lag["events"].as_u64()?,
            lag_ms: lag["oldest_ms"].as_u64()?,
            stream: lag["stream"].as_u64()?,
        })
    }

    async fn sale(&self) -> Option<SaleFigures> {
        let state = self.store.state().await.ok()?;
        Some(SaleFigures {
            total: state.total?,
            sold: state.sold,
            paid: state.paid,
            expired: state.expired,
            resold: state.resold,
            orders: state.orders,
            events: state.events,
        })
    }

    async fn upstreams(&self) -> Option<Vec<UpstreamView>> {
        let stats = self
            .get_json(&format!("http://{}/stats", self.admin))
            .await?;
        stats["upstreams"]
            .as_array()?
            .iter()
            .map(|u| {
                Some(UpstreamView {
                    addr: u["addr"].as_str()?.parse().ok()?,
                    weight: u["weight"].as_u64()?,
                    requests: u["requests"].as_u64()?,
                    state: u["state"].as_str()?.to_owned(),
                    rest_left: u["rest_seconds_left"].as_f64(),
                })
            })
            .collect()
    }
}

impl Snapshot {
    /// Whether the order service has written every event the stream holds,
    /// as it last looked.
    pub fn orders_written(&self) -> bool {
        match (self.orders, self.sale) {
            (Some(orders), Some(sale)) => orders.lag == 0 && orders.stream == sale.events,
            _ => false,
        }
    }

    /// Requests the balancer has routed, over all upstreams.
    pub fn requests(&self) -> Option<u64> {
        self.upstreams
            .as_ref()
            .map(|upstreams| upstreams.iter().map(|u| u.requests).sum())
    }

    /// One line: tickets sold, requests per second (from `previous`, taken
    /// `elapsed` earlier), and each node's share of the traffic against its
    /// weight's, with its health.
    pub fn line(&self, previous: Option<&Snapshot>, elapsed: Duration) -> String {
        let mut line = match self.sale {
            Some(sale) => format!(
                "sold {}/{} (paid {}, pending {}) | expired {}, resold {}",
                sale.sold,
                sale.total,
                sale.paid,
                sale.pending(),
                sale.expired,
                sale.resold
            ),
            None => "sale: redis does not answer".to_owned(),
        };
        if let Some(orders) = self.orders {
            let _ = write!(line, " | db {} orders, lag {}", orders.orders, orders.lag);
        }
        match (self.requests(), previous.and_then(Snapshot::requests)) {
            (Some(now), Some(before)) if elapsed > Duration::ZERO => {
                let rate = now.saturating_sub(before) as f64 / elapsed.as_secs_f64();
                let _ = write!(line, " | {rate:.0} req/s");
            }
            _ => {}
        }
        match &self.upstreams {
            None => line.push_str(" | balancer does not answer"),
            Some(upstreams) => {
                let (requests, weights) = totals(upstreams);
                for u in upstreams {
                    let _ = write!(
                        line,
                        " | {} {} {:.0}%/{:.0}%",
                        u.addr.port(),
                        u.state_text(),
                        percent(u.requests, requests),
                        percent(u.weight, weights),
                    );
                }
            }
        }
        line
    }

    /// The summary: tickets sold (held by live orders) of the total, paid
    /// and pending; orders created, expired and resold; oversold (which
    /// must be 0); requests per node against its weight.
    pub fn summary(&self) -> String {
        let mut text = String::new();
        match self.sale {
            Some(sale) => {
                // More tickets held than the sale has, or more orders alive
                // than were created and not expired.
                let live = sale.orders.saturating_sub(sale.expired);
                let oversold = sale.sold.max(live).saturating_sub(sale.total);
                let _ = writeln!(
                    text,
                    "tickets sold: {} of {} (paid {}, pending {})",
                    sale.sold,
                    sale.total,
                    sale.paid,
                    sale.pending()
                );
                let _ = writeln!(
                    text,
                    "orders: {} created, {} expired unpaid, {} tickets sold again",
                    sale.orders, sale.expired, sale.resold
                );
                let _ = writeln!(text, "oversold: {oversold}");
            }
            None => text.push_str("sale: Redis does not answer, or holds no such sale\n"),
        }
        match self.orders {
            Some(orders) => {
                let _ = writeln!(
                    text,
                    "orders in the database: {} (paid {}, pending {}, expired {}), {} events behind{}",
                    orders.orders,
                    orders.paid,
                    orders.pending,
                    orders.expired,
                    orders.lag,
                    if orders.lag > 0 {
                        format!(" (the oldest by {:.1} s)", orders.lag_ms as f64 / 1e3)
                    } else {
                        String::new()
                    }
                );
            }
            None => text.push_str("orders in the database: the order service does not answer\n"),
        }
        match &self.upstreams {
            None => text.push_str("requests per node: the balancer does not answer\n"),
            Some(upstreams) => {
                let (requests, weights) = totals(upstreams);
                let _ = writeln!(
                    text,
                    "requests per node (share of requests / share of weight):"
                );
                for u in upstreams {
                    let _ = writeln!(
                        text,
                        "  node-{} {:>10} {:>6.2}% / {:>6.2}%  weight {}, {}",
                        u.addr.port(),
                        u.requests,
                        percent(u.requests, requests),
                        percent(u.weight, weights),
                        u.weight,
                        u.state_text(),
                    );
                }
            }
        }
        text
    }
}

fn totals(upstreams: &[UpstreamView]) -> (u64, u64) {
    (
        upstreams.iter().map(|u| u.requests).sum(),
        upstreams.iter().map(|u| u.weight).sum(),
    )
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let view = |port, weight, requests, state: &str| UpstreamView {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight,
            requests,
            state: state.to_owned(),
            rest_left: None,
        };
        Snapshot {
            sale: Some(SaleFigures {
                total: 100,
                sold: 40,
                paid: 10,
                expired: 5,
                resold: 3,
                orders: 42,
                events: 50,
            }),
            upstreams: Some(vec![view(3001, 1, 250, "up"), view(3002, 3, 750, "down")]),
            orders: Some(OrdersView {
                orders: 42,
                paid: 10,
                pending: 27,
                expired: 5,
                lag: 3,
                lag_ms: 120,
                stream: 50,
            }),
        }
    }

    #[test]
    fn the_line_shows_sales_rate_and_shares() {
        let mut before = snapshot();
        before.upstreams.as_mut().unwrap()[0].requests = 50;
        let line = snapshot().line(Some(&before), Duration::from_secs(2));
        assert_eq!(
            line,
            "sold 40/100 (paid 10, pending 30) | expired 5, resold 3 | db 42 orders, lag 3 | 100 req/s | 3001 up 25%/25% | 3002 down 75%/75%"
        );
    }

    #[test]
    fn a_resting_upstream_shows_when_it_may_be_tried_again() {
        let mut resting = snapshot();
        let upstream = &mut resting.upstreams.as_mut().unwrap()[0];
        upstream.state = "resting".to_owned();
        upstream.rest_left = Some(6.2);
        let line = resting.line(None, Duration::ZERO);
        assert!(line.contains("| 3001 resting 7s 25%/25% |"), "{line}");
        assert!(resting.summary().contains("weight 1, resting 7s\n"));
    }

    #[test]
    fn the_summary_counts_oversold_tickets() {
        let summary = snapshot().summary();
        assert!(
            summary.contains(
                "tickets sold: 40 of 100 (paid 10, pending 30)\n\
                 orders: 42 created, 5 expired unpaid, 3 tickets sold again\noversold: 0\n\
                 orders in the database: 42 (paid 10, pending 27, expired 5), 3 events behind \
                 (the oldest by 0.1 s)\n"
            ),
            "{summary}"
        );
        assert!(
            summary.contains("node-3002        750  75.00% /  75.00%  weight 3, down"),
            "{summary}"
        );
        let mut over = snapshot();
        over.sale = Some(SaleFigures {
            total: 100,
            sold: 101,
            paid: 0,
            expired: 0,
            resold: 0,
            orders: 101,
            events: 101,
        });
        assert!(over.summary().contains("oversold: 1\n"));
    }
}
