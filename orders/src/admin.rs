//! The admin address:
//!
//! | request | reply |
//! |---|---|
//! | `GET /health` | 200 while the service runs; the body says whether Redis and the database answer |
//! | `GET /stats` | JSON: lag, orders in the database, events written, retries, errors |
//! | `GET /metrics` | the same in the Prometheus (OpenMetrics) text format |

use std::sync::Arc;

use http::{Method, StatusCode};
use serde::Serialize;
use spike_http1::message::{Request, Response};
use spike_http1::reply::{self, Failure, ReplyBody};
use spike_http1::server::{Handler, RequestBody};

use crate::service::Service;

#[derive(Debug)]
pub struct Admin {
    service: Arc<Service>,
}

#[derive(Debug, Serialize)]
struct Health {
    status: &'static str,
    redis: &'static str,
    database: &'static str,
}

fn up(up: bool) -> &'static str {
    if up { "up" } else { "down" }
}

impl Admin {
    pub fn new(service: Arc<Service>) -> Self {
        Self { service }
    }

    fn handle(&self, req: &Request<RequestBody>) -> Response<ReplyBody> {
        let service = &self.service;
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/health") => {
                let health = Health {
                    status: "serving",
                    redis: up(service.redis_up()),
                    database: up(service.database_up()),
                };
                reply::json(StatusCode::OK, reply::json_bytes(&health))
            }
            (&Method::GET | &Method::HEAD, "/stats") => {
                reply::json(StatusCode::OK, reply::json_bytes(&service.stats()))
            }
            (&Method::GET | &Method::HEAD, "/metrics") => reply::typed(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                service.metrics.encode().into(),
            ),
            (_, "/health" | "/stats" | "/metrics") => reply::method_not_allowed("GET, HEAD"),
            _ => Failure::new(StatusCode::NOT_FOUND, "not_found").reply(),
        }
    }
}

impl Handler for Admin {
    type Body = ReplyBody;

    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Response<ReplyBody>> + Send {
        std::future::ready(self.handle(&req))
    }
}
