//! The node's HTTP interface: routing, the buyer id, and JSON replies.
//!
//! | request | reply |
//! |---|---|
//! | `GET`/`POST /buy/ticket[?user=ID]` | 200 order, 409 sold out, 403 not open, 503 store unavailable, 400 bad buyer id |
//! | `POST /orders/ID/pay[?user=ID]` | 200 the order, paid; 409 expired; 404 no such order; 403 another buyer's; 400 a malformed id |
//! | `GET /orders/ID` | 200 the order; 404; 400 |
//! | `GET /health` | 200 while the node serves; the body says whether Redis answers |
//! | `GET /stats` | 200, the node's counters |
//! | anything else | 404, or 405 with `Allow` |

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use spike_http1::message::{Request, Response};
use spike_http1::reply::{self, Failure, ReplyBody};
use spike_http1::server::{Handler, RequestBody};

use crate::sale::{Pay, Purchase, Sale, Unavailable};
use crate::store::{self, Payment, Status, Ticket};

/// The header that carries a buyer id, as an alternative to `?user=`.
pub const BUYER_HEADER: &str = "x-user-id";
const MAX_BUYER_LEN: usize = 128;
/// Seconds a client should wait before retrying when Redis is unavailable.
const RETRY_AFTER_SECS: u64 = 1;

/// The node's HTTP interface, shared by every connection.
#[derive(Debug)]
pub struct Api {
    sale: Arc<Sale>,
    /// Replies that never change, rendered once: the sold-out reply is the
    /// hot path once a sale is over.
    sold_out: Bytes,
    unavailable: Bytes,
    unknown: Bytes,
    unknown_payment: Bytes,
    no_sale: Bytes,
    too_few_replicas: Bytes,
}

/// What a purchase answers.
#[derive(Serialize)]
struct Bought<'a> {
    order_id: &'a str,
    node: &'a str,
    buyer: Option<&'a str>,
    /// True when the buyer already held this order and nothing was sold.
    existing: bool,
    ticket: u64,
    /// RFC 3339, UTC.
    pay_by: String,
}

/// An order, as payments and look-ups answer it.
#[derive(Serialize)]
struct OrderReply<'a> {
    order_id: &'a str,
    ticket: u64,
    buyer: Option<&'a str>,
    /// The node that sold it.
    node: &'a str,
    status: Status,
    created: String,
    pay_by: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    paid_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expired_at: Option<String>,
}

impl<'a> From<&'a store::Order> for OrderReply<'a> {
    fn from(order: &'a store::Order) -> Self {
        let closed = order.closed.map(rfc3339);
        let (paid_at, expired_at) = match order.status {
            Status::Paid => (closed, None),
            Status::Expired => (None, closed),
            Status::Pending => (None, None),
        };
        Self {
            order_id: &order.id,
            ticket: order.ticket,
            buyer: order.buyer.as_deref(),
            node: &order.node,
            status: order.status,
            created: rfc3339(order.created),
            pay_by: rfc3339(order.pay_by),
            paid_at,
            expired_at,
        }
    }
}

/// What `/health` answers.
#[derive(Serialize)]
struct HealthReply<'a> {
    status: &'static str,
    node: &'a str,
    redis: &'static str,
}

impl Api {
    pub fn new(sale: Arc<Sale>) -> Self {
        let failure = |status, error| Failure::new(status, error).node(sale.name());
        Self {
            sold_out: failure(StatusCode::CONFLICT, "sold_out").body(),
            unavailable: failure(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable").body(),
            unknown: failure(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
                .detail(
                    "redis did not answer or confirm the purchase, which may have been made: \
                     ask again with the same buyer id to learn its outcome",
                )
                .body(),
            unknown_payment: failure(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
                .detail(
                    "redis did not answer or confirm the payment, which may have been made: \
                     pay again to learn its outcome",
                )
                .body(),
            no_sale: failure(StatusCode::SERVICE_UNAVAILABLE, "no_sale").body(),
            too_few_replicas: failure(StatusCode::SERVICE_UNAVAILABLE, "too_few_replicas")
                .detail(
                    "fewer replicas than replica_acks follow the master, so a sale could be \
                     lost in a failover: nothing was sold",
                )
                .body(),
            sale,
        }
    }

    pub async fn handle(&self, req: Request<RequestBody>) -> Response<ReplyBody> {
        let method = req.method();
        if let Some(rest) = req.uri().path().strip_prefix("/orders/") {
            return match rest.split_once('/') {
                None => match *method {
                    Method::GET | Method::HEAD => self.look_up(rest).await,
                    _ => reply::method_not_allowed("GET, HEAD"),
                },
                Some((id, "pay")) => match *method {
                    Method::POST => {
                        let id = id.to_owned();
                        self.pay(&id, req).await
                    }
                    _ => reply::method_not_allowed("POST"),
                },
                Some(_) => Failure::new(StatusCode::NOT_FOUND, "not_found").reply(),
            };
        }
        match req.uri().path() {
            "/buy/ticket" => match *method {
                Method::GET | Method::POST => self.buy(req).await,
                _ => reply::method_not_allowed("GET, POST"),
            },
            "/health" => match *method {
                Method::GET | Method::HEAD => self.health(),
                _ => reply::method_not_allowed("GET, HEAD"),
            },
            "/stats" => match *method {
                Method::GET | Method::HEAD => {
                    reply::json(StatusCode::OK, reply::json_bytes(&self.sale.stats()))
                }
                _ => reply::method_not_allowed("GET, HEAD"),
            },
            _ => Failure::new(StatusCode::NOT_FOUND, "not_found").reply(),
        }
    }

    /// A purchase, made only once the whole request has arrived: a body cut
    /// short or trickling past the body timeout buys nothing (and the
    /// server has counted it as refused).
    async fn buy(&self, req: Request<RequestBody>) -> Response<ReplyBody> {
        let sale = &self.sale;
        let req = match whole(req).await {
            Ok(req) => req,
            Err(refused) => return refused,
        };
        let buyer = match buyer(&req) {
            Ok(buyer) => buyer,
            Err(detail) => {
                sale.counters.rejected();
                return Failure::new(StatusCode::BAD_REQUEST, "bad_buyer_id")
                    .detail(detail)
                    .reply();
            }
        };
        let purchase = sale.buy(buyer.clone()).await;
        let buyer = buyer.as_deref();
        match purchase {
            Purchase::Sold(ticket) => bought(sale, &ticket, buyer, false),
            Purchase::AlreadyBought(ticket) => bought(sale, &ticket, buyer, true),
            Purchase::SoldOut => reply::json(StatusCode::CONFLICT, self.sold_out.clone()),
            Purchase::NotOpen { opens_at } => {
                let wait = opens_at.saturating_sub(sale.redis_now()).div_ceil(1000);
                let opens_at = rfc3339(opens_at);
                let reply = Failure::new(StatusCode::FORBIDDEN, "not_open")
                    .node(sale.name())
                    .field("opens_at", &opens_at)
                    .reply();
                reply::retry_after(reply, wait)
            }
            Purchase::Unavailable(why) => self.unavailable(why, &self.unknown),
        }
    }

    /// 503, with `Retry-After`, saying whether the change may have been
    /// made (`unknown`) or not.
    fn unavailable(&self, why: Unavailable, unknown: &Bytes) -> Response<ReplyBody> {
        let body = match why {
            Unavailable::Store => self.unavailable.clone(),
            Unavailable::Unknown => unknown.clone(),
            Unavailable::NoSale => self.no_sale.clone(),
            Unavailable::Replicas => self.too_few_replicas.clone(),
        };
        reply::retry_after(
            reply::json(StatusCode::SERVICE_UNAVAILABLE, body),
            RETRY_AFTER_SECS,
        )
    }

    /// `POST /orders/ID/pay`: the payment of a provider's callback, made
    /// only once the whole request has arrived, as a purchase is.
    async fn pay(&self, id: &str, req: Request<RequestBody>) -> Response<ReplyBody> {
        if !valid_order_id(id) {
            return bad_order_id();
        }
        let req = match whole(req).await {
            Ok(req) => req,
            Err(refused) => return refused,
        };
        let payer = match buyer(&req) {
            Ok(payer) => payer,
            Err(detail) => {
                self.sale.counters.rejected();
                return Failure::new(StatusCode::BAD_REQUEST, "bad_buyer_id")
                    .detail(detail)
                    .reply();
            }
        };
        match self.sale.pay(id, payer.as_deref()).await {
            Pay::Done(Payment::Paid(order) | Payment::AlreadyPaid(order)) => order_reply(&order),
            Pay::Done(Payment::Expired(order)) => {
                let body = reply::json_bytes(&ExpiredReply {
                    error: "expired",
                    order: OrderReply::from(&order),
                });
                reply::json(StatusCode::CONFLICT, body)
            }
            Pay::Done(Payment::NoSuchOrder) => no_such_order(),
            Pay::Done(Payment::NotYours) => Failure::new(StatusCode::FORBIDDEN, "not_your_order")
                .detail("the order was bought by another buyer id")
                .reply(),
            Pay::Unavailable(why) => self.unavailable(why, &self.unknown_payment),
        }
    }

    /// `GET /orders/ID`.
    async fn look_up(&self, id: &str) -> Response<ReplyBody> {
        if !valid_order_id(id) {
            return bad_order_id();
        }
        match self.sale.order(id).await {
            Ok(Some(order)) => order_reply(&order),
            Ok(None) => no_such_order(),
            Err(why) => self.unavailable(why, &self.unavailable),
        }
    }

    fn health(&self) -> Response<ReplyBody> {
        let redis = if self.sale.redis_up() { "up" } else { "down" };
        let health = HealthReply {
            status: "serving",
            node: self.sale.name(),
            redis,
        };
        reply::json(StatusCode::OK, reply::json_bytes(&health))
    }
}

impl Handler for Api {
    type Body = ReplyBody;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<ReplyBody>> + Send {
        self.handle(req)
    }
}

/// The request once its whole body has arrived (and been let go: neither a
/// purchase nor a payment reads one), or the refusal of a body cut short
/// or too slow.
async fn whole(req: Request<RequestBody>) -> Result<Request<()>, Response<ReplyBody>> {
    let (head, body) = req.into_parts();
    match body.collect().await {
        Ok(_) => Ok(head),
        Err(err) => Err(Failure::new(err.status(), err.rejection().as_str())
            .detail(&err.to_string())
            .reply()),
    }
}

/// The buyer id from `?user=ID` or the `X-User-Id` header; both may be given
/// only if they agree. `None` for an anonymous purchase.
fn buyer<B>(req: &Request<B>) -> Result<Option<String>, &'static str> {
    let from_query = req.uri().query().and_then(|query| {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "user")
            .map(|(_, value)| value.into_owned())
    });
    let from_header = match req.headers().get(BUYER_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| "the X-User-Id header is not plain text")?
                .to_owned(),
        ),
    };
    let buyer = match (from_query, from_header) {
        (Some(query), Some(header)) if query != header => {
            return Err("?user= and X-User-Id name different buyers");
        }
        (query, header) => query.or(header),
    };
    match buyer {
        Some(id) if !valid_buyer(&id) => {
            Err("a buyer id is 1 to 128 characters of letters, digits and . _ - @ : +")
        }
        buyer => Ok(buyer),
    }
}

fn valid_buyer(id: &str) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._-@:+".contains(&b);
    !id.is_empty() && id.len() <= MAX_BUYER_LEN && id.bytes().all(allowed)
}

fn bought(
    sale: &Sale,
    ticket: &Ticket,
    buyer: Option<&str>,
    existing: bool,
) -> Response<ReplyBody> {
    let bought = Bought {
        order_id: &ticket.order_id,
        node: sale.name(),
        buyer,
        existing,
        ticket: ticket.ticket,
        pay_by: rfc3339(ticket.pay_by),
    };
    reply::json(StatusCode::OK, reply::json_bytes(&bought))
}

/// An expired order, as a payment too late answers it: the error and the
/// order.
#[derive(Serialize)]
struct ExpiredReply<'a> {
    error: &'static str,
    order: OrderReply<'a>,
}

fn order_reply(order: &store::Order) -> Response<ReplyBody> {
    reply::json(StatusCode::OK, reply::json_bytes(&OrderReply::from(order)))
}

fn no_such_order() -> Response<ReplyBody> {
    Failure::new(StatusCode::NOT_FOUND, "no_such_order").reply()
}

fn bad_order_id() -> Response<ReplyBody> {
    Failure::new(StatusCode::BAD_REQUEST, "bad_order_id")
        .detail("an order id is two numbers joined by '-', as the purchase gave it")
        .reply()
}

/// Whether `id` is an order id: a stream entry id, `MILLISECONDS-SEQUENCE`.
fn valid_order_id(id: &str) -> bool {
    let number = |part: &str| {
        !part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit())
    };
    id.split_once('-')
        .is_some_and(|(ms, sequence)| number(ms) && number(sequence))
}

/// `ms` milliseconds since the epoch in RFC 3339, UTC.
fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(i64::try_from(ms).unwrap_or(i64::MAX))
        .map_or_else(|_| ms.to_string(), |time| time.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, header: Option<&str>) -> Request<()> {
        let mut req = http::Request::builder().uri(uri);
        if let Some(value) = header {
            req = req.header(BUYER_HEADER, value);
        }
        req.body(()).unwrap().into()
    }

    #[test]
    fn the_buyer_comes_from_the_query_or_the_header() {
        assert_eq!(buyer(&request("/buy/ticket", None)), Ok(None));
        assert_eq!(
            buyer(&request("/buy/ticket?user=alice", None)),
            Ok(Some("alice".into()))
        );
        assert_eq!(
            buyer(&request("/buy/ticket", Some("bob@example.com"))),
            Ok(Some("bob@example.com".into()))
        );
        assert_eq!(
            buyer(&request("/buy/ticket?x=1&user=u%2B1", Some("u+1"))),
            Ok(Some("u+1".into()))
        );
    }

    #[test]
    fn an_order_id_is_a_stream_entry_id() {
        for good in ["1764590000000-0", "1-12"] {
            assert!(valid_order_id(good), "{good}");
        }
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "1-2-3",
            "a-1",
            "1-0x",
            "1 -0",
            &"9".repeat(21),
        ] {
            assert!(!valid_order_id(bad), "{bad}");
        }
        assert_eq!(rfc3339(1_797_076_800_123), "2026-12-12T12:00:00.123Z");
    }

    #[test]
    fn bad_or_conflicting_buyers_are_refused() {
        assert!(buyer(&request("/buy/ticket?user=a", Some("b"))).is_err());
        assert!(buyer(&request("/buy/ticket?user=", None)).is_err());
        assert!(buyer(&request("/buy/ticket?user=a%20b", None)).is_err());
        assert!(buyer(&request("/buy/ticket?user=%0a", None)).is_err());
        let long = format!("/buy/ticket?user={}", "x".repeat(129));
        assert!(buyer(&request(&long, None)).is_err());
    }
}
