//! A connection's one timer, for deadlines that move at every exchange.
//!
//! Moving a registered tokio timer to a later deadline, and polling it
//! again, each take atomic operations on the timer wheel's entry, at every
//! request of a keep-alive connection. Most deadlines never pass: a
//! request comes, or a response, long before. So the timer is left where
//! it is when the deadline moves later, and set again only if it fires
//! before the deadline of the moment; and it is polled only when it has
//! no waker of this task yet or when it has fired.
//!
//! A timer that fires before its deadline wakes its task for nothing, once
//! per length of the deadline while the connection stays busy: with a
//! short deadline (the moment to park an idle connection, 100 ms) and a
//! thousand clients each sending a request every 15 ms, a wake every
//! eight requests. A deadline that may pass late says by how much (its
//! slack), and a timer that fired early is set again that much past it:
//! a busy connection is then woken once per slack.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A timer set no later than the deadline it is asked about; its tokio
/// timer is made for the first deadline asked about.
#[derive(Debug, Default)]
pub(crate) struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker `sleep` holds, if it has not fired or moved since.
    waker: LastWaker,
}

impl Timer {
    /// Whether `deadline` has passed; if not, the task is woken when it
    /// does, or before (and then asks again).
    pub fn poll_passed(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        self.poll_passed_within(deadline, Duration::ZERO, cx)
    }

    /// Whether `deadline` has passed, as a timer that may find it up to
    /// `slack` late sees it; if not, the task is woken when it is found to
    /// have passed, or before (and then asks again).
    pub fn poll_passed_within(
        &mut self,
        deadline: Instant,
        slack: Duration,
        cx: &mut Context<'_>,
    ) -> bool {
        let latest = deadline + slack;
        let sleep = match &mut self.sleep {
            Some(sleep) if latest < sleep.deadline() => {
                sleep.as_mut().reset(deadline);
                self.waker.forget();
                sleep
            }
            Some(sleep) => sleep,
            None => self
                .sleep
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        loop {
            if self.waker.is(cx) && !sleep.is_elapsed() {
                return false;
            }
            // Out of tokio's budget, a sleep would answer `Pending` without
            // taking the waker: polled unconstrained, it always takes it.
            let mut unconstrained = tokio::task::unconstrained(sleep.as_mut());
            if Pin::new(&mut unconstrained).poll(cx) == Poll::Pending {
                self.waker.set(cx);
                return false;
            }
            // Fired, at the deadline it was set for: tokio's timers never
            // fire early.
            if sleep.deadline() >= deadline {
                return true;
            }
            sleep.as_mut().reset(latest);
            self.waker.forget();
        }
    }
}

/// The waker a future took when last polled, as far as its owner knows:
/// a future that keeps it until it is ready need not be polled again by
/// the same task to wake it.
#[derive(Debug, Default)]
pub(crate) struct LastWaker(Option<Waker>);

impl LastWaker {
    /// Whether it is the waker of the task polling with `cx`.
    pub fn is(&self, cx: &Context<'_>) -> bool {
        self.0
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
    }

    /// The future was polled with `cx` and kept its waker.
    pub fn set(&mut self, cx: &Context<'_>) {
        self.0 = Some(cx.waker().clone());
    }

    /// The future let its waker go (it fired, or was moved).
    pub fn forget(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_later_is_kept_and_one_moved_earlier_is_set() {
        let woken = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let start = Instant::now();
        let mut timer = Timer::default();
        assert!(!timer.poll_passed(start + Duration::from_secs(1), &mut cx));
        // Moved later: the timer stays where it was and fires early...
        assert!(!timer.poll_passed(start + Duration::from_secs(3), &mut cx));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        // ...and is set again for the deadline of the moment.
        assert!(!timer.poll_passed(start + Duration::from_secs(3), &mut cx));
        tokio::time::advance(Duration::from_millis(1_999)).await;
        assert!(!timer.poll_passed(start + Duration::from_secs(3), &mut cx));
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        assert!(timer.poll_passed(start + Duration::from_secs(3), &mut cx));
        // Moved earlier than it is set: it wakes at the earlier deadline.
        let now = Instant::now();
        assert!(!timer.poll_passed(now + Duration::from_secs(10), &mut cx));
        assert!(!timer.poll_passed(now + Duration::from_secs(2), &mut cx));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(woken.0.load(Ordering::SeqCst), 3);
        assert!(timer.poll_passed(now + Duration::from_secs(2), &mut cx));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_out_of_its_budget_is_still_woken() {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut timer = Timer::default();
        // First asked once the task has spent tokio's budget, where tokio's
        // own sleep answers `Pending` without taking the waker.
        std::future::poll_fn(|cx| {
            while tokio::task::coop::has_budget_remaining() {
                let _ = pin!(tokio::task::coop::consume_budget()).poll(cx);
            }
            assert!(!timer.poll_passed(deadline, cx));
            Poll::Ready(())
        })
        .await;
        let passed = std::future::poll_fn(|cx| {
            if timer.poll_passed(deadline, cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(Duration::from_secs(60), passed)
            .await
            .expect("the timer never woke the task");
        assert_eq!(Instant::now(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_deadline_with_slack_wakes_its_task_once_per_slack() {
        const LENGTH: Duration = Duration::from_millis(100);
        const SLACK: Duration = Duration::from_millis(900);
        const STEP: Duration = Duration::from_millis(10);
        // wakes(slack): how often a deadline LENGTH away, moved later every
        // STEP for three seconds (a busy connection's moment to park), wakes
        // its task.
        async fn wakes(slack: Duration) -> usize {
            let woken = Arc::new(Count::default());
            let waker = Waker::from(Arc::clone(&woken));
            let mut cx = Context::from_waker(&waker);
            let mut timer = Timer::default();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                let deadline = Instant::now() + LENGTH;
                assert!(!timer.poll_passed_within(deadline, slack, &mut cx));
                tokio::time::advance(STEP).await;
            }
            woken.0.load(Ordering::SeqCst)
        }
        assert_eq!(wakes(Duration::ZERO).await, 30);
        assert_eq!(wakes(SLACK).await, 3);

        // Once it stops moving, a deadline with slack is found passed no
        // later than its slack after it; one never moved, at once.
        let woken = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&woken));
        let mut cx = Context::from_waker(&waker);
        let mut timer = Timer::default();
        let first = Instant::now() + LENGTH;
        assert!(!timer.poll_passed_within(first, SLACK, &mut cx));
        tokio::time::advance(STEP).await;
        let last = Instant::now() + LENGTH;
        assert!(!timer.poll_passed_within(last, SLACK, &mut cx));
        tokio::time::advance(LENGTH - STEP).await;
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "woken at the first");
        assert!(!timer.poll_passed_within(last, SLACK, &mut cx));
        tokio::time::advance(STEP + SLACK).await;
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        assert!(timer.poll_passed_within(last, SLACK, &mut cx));
        assert_eq!(Instant::now(), last + SLACK);

        let mut timer = Timer::default();
        let deadline = Instant::now() + LENGTH;
        assert!(!timer.poll_passed_within(deadline, SLACK, &mut cx));
        tokio::time::advance(LENGTH).await;
        assert_eq!(woken.0.load(Ordering::SeqCst), 3);
        assert!(timer.poll_passed_within(deadline, SLACK, &mut cx));
    }

    #[tokio::test(start_paused = true)]
    async fn another_waker_is_registered() {
        let first = Arc::new(Count::default());
        let second = Arc::new(Count::default());
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1);
        let mut timer = Timer::default();
        let waker = Waker::from(Arc::clone(&first));
        assert!(!timer.poll_passed(deadline, &mut Context::from_waker(&waker)));
        let waker = Waker::from(Arc::clone(&second));
        assert!(!timer.poll_passed(deadline, &mut Context::from_waker(&waker)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
