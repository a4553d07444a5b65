//! The order service: a sale's order stream, read through a Redis consumer
//! group, written into a real database (SQLite by default, PostgreSQL by
//! URL), every event exactly once whatever dies.
//!
//! - [`event`]: a stream entry read as a change of one order.
//! - [`stream`]: the consumer group: reading, taking over, acknowledging,
//!   parking, the lag, trimming.
//! - [`database`]: the tables and the idempotent, batched writes.
//! - [`service`]: the loop from one to the other, and its retries.
//! - [`admin`], [`metrics`]: `/health`, `/stats`, `/metrics`.
//! - [`cli`]: the `orders` command line (also `spike orders`).

pub mod admin;
pub mod cli;
pub mod database;
pub mod event;
pub mod metrics;
pub mod service;
pub mod stream;
