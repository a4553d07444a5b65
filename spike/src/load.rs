//! `spike load`: named buyers who buy a ticket and then, some of them, pay
//! for it: the life of orders, driven from outside, as `ab` cannot (it
//! cannot pay).
//!
//! Each of `concurrency` clients keeps one keep-alive connection and takes
//! the next buyer (`PREFIX-0`, `PREFIX-1`...): `GET /buy/ticket?user=...`.
//! A buyer who got a new order pays for it with probability `pay`, `pay
//! after` later (`POST /orders/ID/pay?user=...`), through the same
//! clients, which send due payments before new purchases. The others walk
//! away, and their orders expire at the end of the pay window. The report
//! counts what the clients were told, and the latency of every request,
//! failed ones included.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde::Serialize;
use spike_http1::client::{Connection, SendError};
use spike_http1::message::Request;

/// How long one request may take before it counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What `spike load` is asked to do.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The balancer's (or a node's) address.
    pub url: Uri,
    pub buyers: u64,
    pub concurrency: usize,
    /// The share of buyers with a new order who pay for it.
    pub pay: f64,
    /// How long after buying a payer pays.
    pub pay_after: Duration,
    /// The buyers are `PREFIX-0`, `PREFIX-1`...
    pub prefix: String,
    /// Whether to draw a progress bar.
    pub progress: bool,
}

/// What the clients were told.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub buyers: u64,
    pub requests: u64,
    /// From the first request to the last answer, the payments waited for
    /// at the end included.
    pub seconds: f64,
    pub requests_per_second: f64,
    /// From the first request to the last purchase's answer: how long the
    /// buyers took, without the wait for payments due after them.
    pub buying_seconds: f64,
    pub purchases_per_second: f64,
    /// New orders.
    pub bought: u64,
    /// Buyers told they held an order already.
    pub already: u64,
    pub sold_out: u64,
    pub not_open: u64,
    /// Orders paid.
    pub paid: u64,
    /// Payments too late: the order had expired.
    pub expired: u64,
    /// Orders left unpaid, which expire at the end of their window.
    pub unpaid: u64,
    /// New orders for a ticket number another of these buyers had held:
    /// tickets returned by an expired order and sold again.
    pub resold: u64,
    /// Requests that failed or got another answer (5xx, a reset...).
    pub errors: u64,
    pub latency_ms: Latency,
}

/// Request latency percentiles, in milliseconds.
#[derive(Debug, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The counts the clients share while they run.
#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    purchases: AtomicU64,
    bought: AtomicU64,
    already: AtomicU64,
    sold_out: AtomicU64,
    not_open: AtomicU64,
    paid: AtomicU64,
    expired: AtomicU64,
    unpaid: AtomicU64,
    resold: AtomicU64,
    errors: AtomicU64,
}

/// A payment due at `due`: the order, and its buyer.
#[derive(Debug)]
struct Due {
    due: Instant,
    order: String,
    buyer: u64,
}

/// What the clients share.
#[derive(Debug)]
struct Shared {
    options: LoadOptions,
    addr: SocketAddr,
    host: HeaderValue,
    /// The next buyer to buy.
    next_buyer: AtomicU64,
    /// Purchases under way, which may add a payment.
    buying: AtomicU64,
    /// Payments to make, earliest first (all come `pay_after` after a
    /// purchase).
    payments: Mutex<VecDeque<Due>>,
    /// Ticket numbers held by these buyers' orders so far.
    tickets: Mutex<HashSet<u64>>,
    counts: Counts,
    /// When the last purchase was answered.
    bought_by: Mutex<Option<Instant>>,
}

/// Runs the load of `options` to its end and reports it.
pub async fn run(options: LoadOptions) -> anyhow::Result<Report> {
    let authority = options
        .url
        .authority()
        .context("the URL needs a host and port, such as http://127.0.0.1:8080")?
        .clone();
    let port = authority.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((authority.host(), port))
        .await
        .with_context(|| format!("cannot resolve {authority}"))?
        .next()
        .with_context(|| format!("{authority} has no address"))?;
    let shared = Arc::new(Shared {
        host: HeaderValue::from_str(authority.as_str())?,
        addr,
        next_buyer: AtomicU64::new(0),
        buying: AtomicU64::new(0),
        payments: Mutex::new(VecDeque::new()),
        tickets: Mutex::new(HashSet::new()),
        counts: Counts::default(),
        bought_by: Mutex::new(None),
        options,
    });
    let bar = shared.options.progress.then(|| {
        let bar = ProgressBar::new(shared.options.buyers);
        if let Ok(style) = ProgressStyle::with_template("{bar:30} {pos}/{len} buyers {msg}") {
            bar.set_style(style.progress_chars("##-"));
        }
        bar
    });
    let started = Instant::now();
    let clients: Vec<_> = (0..shared.options.concurrency.max(1))
        .map(|_| tokio::spawn(client(Arc::clone(&shared))))
        .collect();
    let progress = bar.clone().map(|bar| {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let counts = &shared.counts;
                let taken = shared.next_buyer.load(Ordering::Relaxed);
                bar.set_position(taken.min(shared.options.buyers));
                bar.set_message(format!(
                    "| bought {} paid {} sold out {} errors {}",
                    counts.bought.load(Ordering::Relaxed),
                    counts.paid.load(Ordering::Relaxed),
                    counts.sold_out.load(Ordering::Relaxed),
                    counts.errors.load(Ordering::Relaxed),
                ));
            }
        })
    });
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let buying_seconds = shared
        .bought_by
        .lock()
        .map_or(seconds, |at| at.duration_since(started).as_secs_f64());
    if let Some(progress) = progress {
        progress.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(report(&shared, (seconds, buying_seconds), latencies))
}

fn report(
    shared: &Shared,
    (seconds, buying_seconds): (f64, f64),
    mut latencies: Vec<u32>,
) -> Report {
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let counts = &shared.counts;
    let requests = load(&counts.requests);
    let purchases = shared.options.buyers.min(load(&counts.purchases));
    latencies.sort_unstable();
    let percentile = |p: f64| {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len().max(1)) - 1;
        latencies.get(i).map_or(0.0, |&us| f64::from(us) / 1e3)
    };
    Report {
        buyers: shared.options.buyers,
        requests,
        seconds,
        requests_per_second: requests as f64 / seconds.max(f64::EPSILON),
        buying_seconds,
        purchases_per_second: purchases as f64 / buying_seconds.max(f64::EPSILON),
        bought: load(&counts.bought),
        already: load(&counts.already),
        sold_out: load(&counts.sold_out),
        not_open: load(&counts.not_open),
        paid: load(&counts.paid),
        expired: load(&counts.expired),
        unpaid: load(&counts.unpaid),
        resold: load(&counts.resold),
        errors: load(&counts.errors),
        latency_ms: Latency {
            p50: percentile(0.5),
            p90: percentile(0.9),
            p99: percentile(0.99),
            p999: percentile(0.999),
            max: latencies.last().map_or(0.0, |&us| f64::from(us) / 1e3),
        },
    }
}

/// One client: due payments first, then the next buyer, until every buyer
/// has bought and every payment is made. Returns its requests' latencies
/// (microseconds).
async fn client(shared: Arc<Shared>) -> Vec<u32> {
    let mut connection: Option<Connection> = None;
    let mut latencies = Vec::new();
    loop {
        let due = {
            let mut payments = shared.payments.lock();
            match payments.front() {
                Some(first) if first.due <= Instant::now() => payments.pop_front(),
                _ => None,
            }
        };
        if let Some(due) = due {
            let path = format!(
                "/orders/{}/pay?user={}-{}",
                due.order, shared.options.prefix, due.buyer
            );
            let answer = exchange(
                &shared,
                &mut connection,
                Method::POST,
                &path,
                &mut latencies,
            )
            .await;
            let counter = match answer.map(|(status, _)| status) {
                Some(StatusCode::OK) => &shared.counts.paid,
                Some(StatusCode::CONFLICT) => &shared.counts.expired,
                _ => &shared.counts.errors,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        shared.buying.fetch_add(1, Ordering::Relaxed);
        let buyer = shared.next_buyer.fetch_add(1, Ordering::Relaxed);
        if buyer < shared.options.buyers {
            buy(&shared, &mut connection, buyer, &mut latencies).await;
            shared.buying.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        shared.buying.fetch_sub(1, Ordering::Relaxed);
        // Every buyer has bought: wait for the payments still due.
        let next = shared.payments.lock().front().map(|first| first.due);
        match next {
            Some(due) => tokio::time::sleep_until(due.into()).await,
            None if shared.buying.load(Ordering::Relaxed) > 0 => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            None => return latencies,
        }
    }
}

/// One buyer's purchase, and the payment it decides on.
async fn buy(
    shared: &Shared,
    connection: &mut Option<Connection>,
    buyer: u64,
    latencies: &mut Vec<u32>,
) {
    let path = format!("/buy/ticket?user={}-{buyer}", shared.options.prefix);
    let counts = &shared.counts;
    let answer = exchange(shared, connection, Method::GET, &path, latencies).await;
    counts.purchases.fetch_add(1, Ordering::Relaxed);
    {
        let now = Instant::now();
        let mut bought_by = shared.bought_by.lock();
        *bought_by = Some(bought_by.map_or(now, |at| at.max(now)));
    }
    let (status, body) = match answer {
        Some(answer) => answer,
        None => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let order: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    match (status, order) {
        (StatusCode::OK, Some(order)) if order["existing"] == false => {
            counts.bought.fetch_add(1, Ordering::Relaxed);
            if let Some(ticket) = order["ticket"].as_u64()
                && !shared.tickets.lock().insert(ticket)
            {
                counts.resold.fetch_add(1, Ordering::Relaxed);
            }
            match order["order_id"].as_str() {
                Some(id) if pays(buyer, shared.options.pay) => {
                    shared.payments.lock().push_back(Due {
                        due: Instant::now() + shared.options.pay_after,
                        order: id.to_owned(),
                        buyer,
                    });
                }
                _ => {
                    counts.unpaid.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (StatusCode::OK, Some(_)) => {
            counts.already.fetch_add(1, Ordering::Relaxed);
        }
        (StatusCode::CONFLICT, _) => {
            counts.sold_out.fetch_add(1, Ordering::Relaxed);
        }
        (StatusCode::FORBIDDEN, _) => {
            counts.not_open.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether `buyer` pays, drawn with probability `pay`: the same every run.
fn pays(buyer: u64, pay: f64) -> bool {
    // splitmix64: an even spread from consecutive numbers.
    let mut z = buyer.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    pay >= 1.0 || (z as f64) < pay * (u64::MAX as f64)
}

/// One request on the client's connection (made anew if it has none, or
/// if the server has closed it): the status and the body, or `None` if it
/// failed. Its latency is recorded either way.
async fn exchange(
    shared: &Shared,
    connection: &mut Option<Connection>,
    method: Method,
    path: &str,
    latencies: &mut Vec<u32>,
) -> Option<(StatusCode, Bytes)> {
    let started = Instant::now();
    shared.counts.requests.fetch_add(1, Ordering::Relaxed);
    let answer = send(shared, connection, method, path).await;
    latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
    answer
}

async fn send(
    shared: &Shared,
    connection: &mut Option<Connection>,
    method: Method,
    path: &str,
) -> Option<(StatusCode, Bytes)> {
    let mut request = Request::new(method, path.parse().ok()?, Empty::<Bytes>::new());
    request.headers_mut().insert(HOST, shared.host.clone());
    let mut request = Box::new(request);
    let mut reused = connection.take();
    if reused.as_mut().is_some_and(|conn| !conn.is_open()) {
        reused = None;
    }
    let response = loop {
        let fresh = reused.is_none();
        let conn = match reused.take() {
            Some(conn) => conn,
            None => Connection::connect(shared.addr, REQUEST_TIMEOUT)
                .await
                .ok()?,
        };
        match conn.send(request, REQUEST_TIMEOUT).await {
            Ok(response) => break response,
            // A kept-alive connection the server closed meanwhile: nothing
            // reached it, and the request goes again on a new one.
            Err(SendError::NotSent(unsent, _)) if !fresh => request = unsent,
            Err(_) => return None,
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame.ok()?.into_data() {
            data.extend_from_slice(&chunk);
        }
    }
    *connection = body.into_reusable();
    Some((status, Bytes::from(data)))
}

impl Report {
    /// The report for a person.
    pub fn text(&self) -> String {
        let l = &self.latency_ms;
        format!(
            "buyers: {}\nrequests: {} in {:.2} s, {:.0} req/s\n\
             purchases: {:.0} per second over {:.2} s\n\
             bought: {} (resold tickets among them: {})\nalready held: {}\nsold out: {}\nnot open: {}\n\
             paid: {}\npaid too late (expired): {}\nleft unpaid (expire at the end of their window): {}\n\
             errors: {}\nlatency ms: p50 {:.2}, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}\n",
            self.buyers,
            self.requests,
            self.seconds,
            self.requests_per_second,
            self.purchases_per_second,
            self.buying_seconds,
            self.bought,
            self.resold,
            self.already,
            self.sold_out,
            self.not_open,
            self.paid,
            self.expired,
            self.unpaid,
            self.errors,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_that_pays_is_the_one_asked_for_and_the_same_each_run() {
        let paying = (0..100_000).filter(|&b| pays(b, 0.7)).count();
        assert!((69_000..71_000).contains(&paying), "{paying}");
        assert_eq!((0..1_000).filter(|&b| pays(b, 0.0)).count(), 0);
        assert_eq!((0..1_000).filter(|&b| pays(b, 1.0)).count(), 1_000);
        let first: Vec<_> = (0..20).map(|b| pays(b, 0.5)).collect();
        let again: Vec<_> = (0..20).map(|b| pays(b, 0.5)).collect();
        assert_eq!(first, again);
    }
}
