//! What a server counts: its refusals of client input, by reason, logged at
//! a rate that cannot itself flood the log (one line per reason per second,
//! with the number of refusals it stands for); and its client connections,
//! open and parked.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Why a request or connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// 400: malformed, or framed so that it could be read two ways.
    BadRequest,
    /// 501: a transfer coding other than chunked.
    NotImplemented,
    /// 431: the header block or the number of headers over the limit.
    HeadersTooLarge,
    /// The head did not arrive within the header timeout: closed.
    HeaderTimeout,
    /// 413: the body over the limit.
    BodyTooLarge,
    /// 408: the body did not arrive within the body timeout.
    BodyTimeout,
    /// 429: the client's address is over its rate.
    RateLimited,
    /// The connection limit was reached: new connections wait.
    ConnectionLimit,
}

impl Rejection {
    pub const ALL: [Rejection; 8] = [
        Rejection::BadRequest,
        Rejection::NotImplemented,
        Rejection::HeadersTooLarge,
        Rejection::HeaderTimeout,
        Rejection::BodyTooLarge,
        Rejection::BodyTimeout,
        Rejection::RateLimited,
        Rejection::ConnectionLimit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BadRequest => "bad_request",
            Rejection::NotImplemented => "not_implemented",
            Rejection::HeadersTooLarge => "headers_too_large",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::RateLimited => "rate_limited",
            Rejection::ConnectionLimit => "connection_limit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Hook = Box<dyn Fn(Rejection) + Send + Sync>;

/// The refusals of one process.
pub struct Rejections {
    counts: [AtomicU64; Rejection::ALL.len()],
    /// The second (since the process started) each reason was last logged.
    logged: [AtomicU64; Rejection::ALL.len()],
    /// Refusals not logged since the last line of each reason.
    unlogged: [AtomicU64; Rejection::ALL.len()],
    /// Called on every refusal, e.g. to count it in `/metrics`.
    hook: Option<Hook>,
}

impl fmt::Debug for Rejections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts: Vec<_> = Rejection::ALL
            .iter()
            .map(|&r| (r.as_str(), self.count(r)))
            .collect();
        f.debug_struct("Rejections")
            .field("counts", &counts)
            .finish_non_exhaustive()
    }
}

impl Default for Rejections {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            logged: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            unlogged: Default::default(),
            hook: None,
        }
    }
}

impl Rejections {
    /// Refusals that also call `hook`.
    pub fn with_hook(hook: impl Fn(Rejection) + Send + Sync + 'static) -> Self {
        Self {
            hook: Some(Box::new(hook)),
            ..Self::default()
        }
    }

    /// Counts one refusal of `client`, and logs it unless a line for the
    /// same reason was written this second.
    pub fn reject(&self, reason: Rejection, client: SocketAddr, detail: &dyn fmt::Display) {
        let i = reason.index();
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        if let Some(hook) = &self.hook {
            hook(reason);
        }
        let second = process_seconds();
        let last = self.logged[i].load(Ordering::Relaxed);
        if last != second
            && self.logged[i]
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let unlogged_before = self.unlogged[i].swap(0, Ordering::Relaxed);
            tracing::warn!(%reason, %client, %detail, unlogged_before, "refused");
        } else {
            self.unlogged[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refusals of `reason` so far.
    pub fn count(&self, reason: Rejection) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }
}

/// The client connections of a server.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    open: AtomicU64,
    parked: AtomicU64,
}

impl ConnectionCounts {
    /// Connections open now, parked ones included.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Idle connections parked now: only their socket is held.
    pub fn parked(&self) -> u64 {
        self.parked.load(Ordering::Relaxed)
    }

    pub(super) fn parked_one(&self) {
        self.parked.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn unparked_one(&self) {
        self.parked.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One open connection in a server's count, until dropped.
#[derive(Debug)]
pub(super) struct Open(Arc<ConnectionCounts>);

impl Open {
    pub fn new(counts: &Arc<ConnectionCounts>) -> Self {
        counts.open.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(counts))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn process_seconds() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_counted_and_hooked() {
        let hooked = Arc::new(AtomicU64::new(0));
        let rejections = Rejections::with_hook({
            let hooked = Arc::clone(&hooked);
            move |reason| {
                assert_eq!(reason, Rejection::BodyTooLarge);
                hooked.fetch_add(1, Ordering::Relaxed);
            }
        });
        let client = "127.0.0.1:9".parse().unwrap();
        for _ in 0..1_000 {
            rejections.reject(Rejection::BodyTooLarge, client, &"too big");
        }
        assert_eq!(rejections.count(Rejection::BodyTooLarge), 1_000);
        assert_eq!(rejections.count(Rejection::BadRequest), 0);
        assert_eq!(hooked.load(Ordering::Relaxed), 1_000);
        // One line was written; the rest wait to be mentioned by the next.
        let unlogged = rejections.unlogged[Rejection::BodyTooLarge.index()].load(Ordering::Relaxed);
        assert!(unlogged >= 998, "{unlogged}");
    }
}
