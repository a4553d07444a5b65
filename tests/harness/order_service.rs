//! The order service (`orders`), started as a real process with its admin
//! address on an ephemeral port, and what its database holds, read by the
//! test itself.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use sqlx::Row;

use crate::client::Client;
use crate::process::Process;
use crate::redis::RedisServer;
use crate::wait_until_async;

/// Starts `orders` for the sale `ticket` at `redis`, writing to
/// `database`, with the settings `extra` (lines of `orders.toml`, written
/// to `dir`) and the flags `args`. The stream is never trimmed unless
/// `extra` sets `trim_interval`: the tests compare it with the database.
pub fn start_order_service(
    dir: &Path,
    redis: &RedisServer,
    database: &str,
    extra: &str,
    args: &[&str],
) -> Process {
    let config = dir.join("orders.toml");
    let trim = if extra.contains("trim_interval") {
        ""
    } else {
        "trim_interval = \"0s\"\n"
    };
    std::fs::write(&config, format!("event = \"ticket\"\n{trim}{extra}"))
        .expect("write orders.toml");
    let redis = redis.url();
    let mut all = vec![
        "--config",
        config.to_str().expect("a UTF-8 path"),
        "--redis",
        &redis,
        "--database",
        database,
        "--admin",
        "127.0.0.1:0",
    ];
    all.extend(args);
    Process::start("orders", &all, 1)
}

/// The service's `/stats`.
pub async fn stats(service: &Process) -> serde_json::Value {
    Client::new().get(&service.url("/stats")).await.json()
}

/// Waits until the service says every event of the stream is in the
/// database (its lag, as last read, is 0 with `events` entries in the
/// stream).
pub async fn wait_for_no_lag(service: &Process, events: u64, timeout: Duration) {
    wait_until_async(
        &format!("the order service to write {events} events"),
        timeout,
        || async {
            let stats = stats(service).await;
            stats["lag"]["events"] == 0 && stats["lag"]["stream"].as_u64() >= Some(events)
        },
    )
    .await;
}

/// An order as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderRow {
    pub order_id: String,
    pub ticket: i64,
    pub buyer: String,
    pub node: String,
    pub status: String,
    pub created_at: i64,
    pub pay_by: i64,
    pub paid_at: Option<i64>,
    pub expired_at: Option<i64>,
}

/// What the database at `url` holds for the sale `ticket`: its orders by
/// id, and the ids of its events (one row each).
pub async fn database_rows(url: &str) -> (HashMap<String, OrderRow>, Vec<String>) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url)
        .await
        .expect("connect to the database");
    let orders = sqlx::query(
        "SELECT order_id, ticket, buyer, node, status, created_at, pay_by, paid_at, expired_at \
         FROM orders WHERE sale = 'ticket'",
    )
    .fetch_all(&pool)
    .await
    .expect("read the orders")
    .into_iter()
    .map(|row| {
        let order = OrderRow {
            order_id: row.get("order_id"),
            ticket: row.get("ticket"),
            buyer: row.get("buyer"),
            node: row.get("node"),
            status: row.get("status"),
            created_at: row.get("created_at"),
            pay_by: row.get("pay_by"),
            paid_at: row.get("paid_at"),
            expired_at: row.get("expired_at"),
        };
        (order.order_id.clone(), order)
    })
    .collect();
    let events = sqlx::query_scalar("SELECT event_id FROM order_events WHERE sale = 'ticket'")
        .fetch_all(&pool)
        .await
        .expect("read the events");
    pool.close().await;
    (orders, events)
}

/// Runs `sql` on the database at `url`, as its administrator would.
pub async fn execute(url: &str, sql: &str) {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url)
        .await
        .expect("connect to the database");
    sqlx::query(sql).execute(&pool).await.expect(sql);
    pool.close().await;
}
