//! How long an upstream may keep an exchange waiting.

use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// How long an upstream may keep an exchange waiting: `limit` for the
/// response head, then between two reads of the body. The clock stops
/// while the exchange waits for the client's request body, and starts
/// afresh after.
#[derive(Debug, Default)]
pub(super) struct Patience {
    limit: Duration,
    /// Kept with the connection from one exchange to the next: moving a
    /// deadline later is cheap, registering a new timer is not.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer is set for a wait under way.
    waiting: bool,
}

impl Patience {
    /// A new exchange, which the upstream may keep waiting `limit` at a
    /// time.
    pub fn start(&mut self, limit: Duration) {
        self.limit = limit;
        self.waiting = false;
    }

    /// The exchange has to wait: whether it has waited on the upstream for
    /// `limit` since this wait began (registering to be woken when it has).
    /// A wait on the client's request body does not count.
    pub fn poll_expired(&mut self, on_client: bool, cx: &mut Context<'_>) -> bool {
        if on_client {
            self.reset();
            return false;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = Instant::now() + self.limit;
            match &mut self.timer {
                Some(timer) => timer.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        self.timer
            .as_mut()
            .is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }

    /// The upstream sent something, or the exchange waits on the client:
    /// the next wait on the upstream starts afresh.
    pub fn reset(&mut self) {
        self.waiting = false;
    }
}
