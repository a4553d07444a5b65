//! How long an upstream may keep an exchange waiting.

use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use crate::timer::Timer;

/// How long an upstream may keep an exchange waiting: `limit` for the
/// response head, then between two reads of the body. The clock stops
/// while the exchange waits for the client's request body, and starts
/// afresh after.
#[derive(Debug, Default)]
pub(super) struct Patience {
    limit: Duration,
    /// Kept with the connection from one exchange to the next (see
    /// [`Timer`]).
    timer: Timer,
    /// When the wait under way runs out, if one is.
    deadline: Option<Instant>,
}

impl Patience {
    /// A new exchange, which the upstream may keep waiting `limit` at a
    /// time.
    pub fn start(&mut self, limit: Duration) {
        self.limit = limit;
        self.deadline = None;
    }

    /// The exchange has to wait: whether it has waited on the upstream for
    /// `limit` since this wait began (registering to be woken when it has).
    /// A wait on the client's request body does not count.
    pub fn poll_expired(&mut self, on_client: bool, cx: &mut Context<'_>) -> bool {
        if on_client {
            self.reset();
            return false;
        }
        let limit = self.limit;
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + limit);
        self.timer.poll_passed(deadline, cx)
    }

    /// The upstream sent something, or the exchange waits on the client:
    /// the next wait on the upstream starts afresh.
    pub fn reset(&mut self) {
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn each_wait_runs_out_after_the_limit_from_its_own_start() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut patience = Patience::default();
        patience.start(Duration::from_secs(10));
        assert!(!patience.poll_expired(false, &mut cx));
        tokio::time::advance(Duration::from_secs(6)).await;
        // The upstream sent something: a new wait, with its own deadline,
        // later than the timer is set.
        patience.reset();
        assert!(!patience.poll_expired(false, &mut cx));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            !patience.poll_expired(false, &mut cx),
            "6 s into a wait of 10"
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(patience.poll_expired(false, &mut cx));
        // A wait on the client does not count, and the next exchange waits
        // afresh.
        assert!(!patience.poll_expired(true, &mut cx));
        patience.start(Duration::from_secs(1));
        assert!(!patience.poll_expired(false, &mut cx));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(patience.poll_expired(false, &mut cx));
    }
}
