//! What the end-to-end tests share: a real `redis-server` and a real
//! PostgreSQL on ephemeral ports, the workspace's built binaries started
//! as processes, in-process
//! HTTP backends that record what reaches them, an HTTP client, and
//! ApacheBench.
//!
//! Every helper that starts something stops it on drop, so a failing test
//! leaves no process behind. Readiness is waited for by polling the real
//! thing (a PING, a health check, a line on standard output), never by a
//! fixed sleep.

pub mod ab;
pub mod backend;
pub mod balancer;
pub mod browser;
pub mod buyers;
pub mod client;
pub mod nodes;
pub mod order_service;
pub mod postgres;
pub mod process;
pub mod raw;
pub mod redis;
pub mod replicated;
pub mod traffic;

use std::time::{Duration, Instant};

/// Polls `condition` every few milliseconds until it holds, panicking with
/// `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The async twin of [`wait_until`].
pub async fn wait_until_async<F: Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
