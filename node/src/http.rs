//! The node's HTTP interface: routing, the buyer id, and JSON replies.
//!
//! | request | reply |
//! |---|---|
//! | `GET`/`POST /buy/ticket[?user=ID]` | 200 order, 409 sold out, 503 store unavailable, 400 bad buyer id |
//! | `GET /health` | 200 while the node serves; the body says whether Redis answers |
//! | `GET /stats` | 200, the node's counters |
//! | anything else | 404, or 405 with `Allow` |

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;
use spike_http1::reply::{self, Failure, ReplyBody};
use spike_http1::server::{Handler, RequestBody};

use crate::sale::{Purchase, Sale, Unavailable};

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
    no_sale: Bytes,
}

#[derive(Serialize)]
struct Order<'a> {
    order_id: &'a str,
    node: &'a str,
    buyer: Option<&'a str>,
    /// True when the buyer already held this order and nothing was sold.
    existing: bool,
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
                    "redis did not answer the purchase, which may have been made: \
                     ask again with the same buyer id to learn its outcome",
                )
                .body(),
            no_sale: failure(StatusCode::SERVICE_UNAVAILABLE, "no_sale").body(),
            sale,
        }
    }

    pub async fn handle(&self, req: Request<RequestBody>) -> Response<ReplyBody> {
        let method = req.method();
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
        let (parts, body) = req.into_parts();
        if let Err(err) = body.collect().await {
            return Failure::new(err.status(), err.rejection().as_str())
                .detail(&err.to_string())
                .reply();
        }
        let req = Request::from_parts(parts, ());
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
            Purchase::Sold { order_id } => order(sale, &order_id, buyer, false),
            Purchase::AlreadyBought { order_id } => order(sale, &order_id, buyer, true),
            Purchase::SoldOut => reply::json(StatusCode::CONFLICT, self.sold_out.clone()),
            Purchase::Unavailable(why) => {
                let body = match why {
                    Unavailable::Store => self.unavailable.clone(),
                    Unavailable::Unknown => self.unknown.clone(),
                    Unavailable::NoSale => self.no_sale.clone(),
                };
                reply::retry_after(
                    reply::json(StatusCode::SERVICE_UNAVAILABLE, body),
                    RETRY_AFTER_SECS,
                )
            }
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

fn order(sale: &Sale, order_id: &str, buyer: Option<&str>, existing: bool) -> Response<ReplyBody> {
    let order = Order {
        order_id,
        node: sale.name(),
        buyer,
        existing,
    };
    reply::json(StatusCode::OK, reply::json_bytes(&order))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, header: Option<&str>) -> Request<()> {
        let mut req = Request::builder().uri(uri);
        if let Some(value) = header {
            req = req.header(BUYER_HEADER, value);
        }
        req.body(()).unwrap()
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
    fn bad_or_conflicting_buyers_are_refused() {
        assert!(buyer(&request("/buy/ticket?user=a", Some("b"))).is_err());
        assert!(buyer(&request("/buy/ticket?user=", None)).is_err());
        assert!(buyer(&request("/buy/ticket?user=a%20b", None)).is_err());
        assert!(buyer(&request("/buy/ticket?user=%0a", None)).is_err());
        let long = format!("/buy/ticket?user={}", "x".repeat(129));
        assert!(buyer(&request(&long, None)).is_err());
    }
}
