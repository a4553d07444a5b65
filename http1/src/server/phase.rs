//! Where a client connection is in its request cycle, and which deadline
//! holds it there.
//!
//! | phase | from | deadline |
//! |---|---|---|
//! | head | the connection opened, or a first byte arrived after a reply | `header_timeout`, then closed (a slowloris ends here) |
//! | busy | the head was read | none here: the body has its own ([`super::body`]), the upstream its own |
//! | idle | the reply was written out | [`PARK_AFTER`], then parked; `idle_timeout`, then closed |
//!
//! In every phase, a write that waits for the client longer than
//! `send_timeout` closes the connection.

use std::time::Duration;

use spike_config::server::ServerSettings;
use tokio::time::Instant;

/// How long a keep-alive connection stays idle before it is parked
/// ([`super::park`]): its task and its buffers are freed, and only the
/// socket is watched until the next request comes (nginx frees its buffers
/// the same way). Setting that state up again costs a little of a proxied
/// request's CPU, so a connection whose next request follows at once keeps
/// it.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

/// How much later than [`PARK_AFTER`] an idle connection may be parked
/// (never past its idle timeout). A busy connection's moment to park moves
/// later at every request, and its timer, left behind (see
/// [`crate::timer`]), would wake its task for nothing every `PARK_AFTER`;
/// with this slack, about once a second. So a connection idle after a
/// single request is parked after 100 ms, and one idle after being busy
/// within at most a second.
pub const PARK_SLACK: Duration = Duration::from_millis(900);

/// Where a connection waits for its client's next bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// A request's head is under way.
    Head,
    /// No request is under way: the last reply went out.
    Idle,
}

/// What happens when a phase's deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// The head did not arrive whole within `header_timeout`: closed.
    HeaderTimeout,
    /// Idle for [`PARK_AFTER`]: parked.
    Park,
    /// Idle for `idle_timeout`: closed.
    IdleTimeout,
}

/// The deadline of `phase`, begun at `since`, how late it may be found to
/// have passed, and what its passing means; `parking` says whether an idle
/// connection may still be parked.
pub(super) fn deadline(
    phase: Phase,
    since: Instant,
    settings: &ServerSettings,
    parking: bool,
) -> (Instant, Duration, Expiry) {
    match phase {
        Phase::Head => (
            since + settings.header_timeout,
            Duration::ZERO,
            Expiry::HeaderTimeout,
        ),
        Phase::Idle if parking && PARK_AFTER < settings.idle_timeout => (
            since + PARK_AFTER,
            PARK_SLACK.min(settings.idle_timeout - PARK_AFTER),
            Expiry::Park,
        ),
        Phase::Idle => (
            since + settings.idle_timeout,
            Duration::ZERO,
            Expiry::IdleTimeout,
        ),
    }
}

/// Since when a write has been waiting for the client to read, for the
/// send timeout.
#[derive(Debug, Default)]
pub(super) struct Stall {
    since: Option<Instant>,
}

impl Stall {
    /// A write has to wait: when the send timeout runs out if it goes on.
    pub fn waiting(&mut self, send_timeout: Duration) -> Instant {
        *self.since.get_or_insert_with(Instant::now) + send_timeout
    }

    /// A write went through.
    pub fn cleared(&mut self) {
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_has_its_deadline() {
        let settings = ServerSettings {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            ..ServerSettings::default()
        };
        let since = Instant::now();
        let none = Duration::ZERO;
        assert_eq!(
            deadline(Phase::Head, since, &settings, true),
            (since + Duration::from_secs(2), none, Expiry::HeaderTimeout)
        );
        assert_eq!(
            deadline(Phase::Idle, since, &settings, true),
            (since + PARK_AFTER, PARK_SLACK, Expiry::Park)
        );
        assert_eq!(
            deadline(Phase::Idle, since, &settings, false),
            (since + Duration::from_secs(5), none, Expiry::IdleTimeout)
        );
        // An idle timeout shorter than the moment to park: closed, not
        // parked.
        let brief = ServerSettings {
            idle_timeout: Duration::from_millis(50),
            ..settings
        };
        assert_eq!(
            deadline(Phase::Idle, since, &brief, true),
            (since + Duration::from_millis(50), none, Expiry::IdleTimeout)
        );
        // One shorter than the moment to park and its slack: parked no
        // later than it.
        let short = ServerSettings {
            idle_timeout: Duration::from_millis(300),
            ..settings
        };
        assert_eq!(
            deadline(Phase::Idle, since, &short, true),
            (since + PARK_AFTER, Duration::from_millis(200), Expiry::Park)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_does_not_take_is_timed_from_its_first_wait() {
        let timeout = Duration::from_secs(60);
        let mut stall = Stall::default();
        let first = stall.waiting(timeout);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(stall.waiting(timeout), first, "from the first wait");
        stall.cleared();
        assert_eq!(stall.waiting(timeout), Instant::now() + timeout);
    }
}
