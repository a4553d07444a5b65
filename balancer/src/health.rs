//! Whether an upstream may take requests: the rules of active checks,
//! passive checks and slow start. The probes themselves run in
//! [`crate::check`]; nothing here does I/O or keeps time of its own.
//!
//! - Active checks (HAProxy's): a task per upstream probes `GET path` every
//!   `interval`. An up upstream goes down after `fall` failed probes in a
//!   row; a down one comes back up after `rise` good ones. A probe fails on a
//!   connect error, a timeout, or a status outside 2xx.
//! - Passive checks (nginx's `max_fails`, `fail_timeout`): a failure of live
//!   traffic (what `fail_on` names; by default a connection error or a
//!   timeout) lowers the upstream's effective weight by `weight /
//!   max_fails`, and `max_fails` of them with no success in between make the
//!   round-robin skip the upstream for `fail_timeout`: it rests. One request
//!   is let through after that; a success clears the count
//!   (`ngx_http_upstream_free_round_robin_peer`). A resting upstream that
//!   passes `rise` probes in a row after its last failure has its rest end
//!   at once, into that trial (a node restarted in a hurry need not wait
//!   out its rest), ramping up if slow start is on.
//! - Slow start: an upstream that comes back up ramps its weight linearly
//!   over `slow_start`, as `weight * elapsed / slow_start` in integers,
//!   never below 1, so even weight 1 gets requests while ramping.
//!
//! The state is kept in [`Health`], which takes the current time as an
//! argument (milliseconds on a process-wide monotonic clock, [`now_ms`]):
//! the rules are plain functions of their inputs, and the request path reads
//! atomics only.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;
use spike_config::health::HealthSettings;
use tokio::time::Instant;

/// Milliseconds since the process's first look at the clock, on tokio's
/// clock (which tests can pause).
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// `at` in the milliseconds of [`now_ms`].
pub fn ms_at(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| at);
    at.saturating_duration_since(epoch).as_millis() as u64
}

/// The state of an upstream, as the active checks see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Not checked yet (an upstream added to a running balancer): takes no
    /// requests until `rise` probes pass.
    Unknown,
    Up,
    Down,
}

impl State {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => State::Unknown,
            1 => State::Up,
            _ => State::Down,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            State::Unknown => 0,
            State::Up => 1,
            State::Down => 2,
        }
    }
}

/// The health of one upstream. Written by its checker task and by requests
/// that finish on it; read by every pick.
#[derive(Debug)]
pub struct Health {
    state: AtomicU8,
    /// When the upstream last came up (for slow start), in [`now_ms`].
    up_since: AtomicU64,
    /// nginx's `fails`, `checked` and `accessed`: failures of live traffic
    /// counted since the last success; when one was last counted or the
    /// upstream last picked after its rest; when one was last counted.
    fails: AtomicU32,
    checked: AtomicU64,
    accessed: AtomicU64,
    /// Good probes in a row since the last failure of live traffic.
    probes_since_failure: AtomicU32,
    /// Set when probes ended a rest before `fail_timeout`: the next pick is
    /// the trial.
    rest_ended: AtomicBool,
    /// What `/stats` shows of the active checks; written by the checker
    /// only, locked for a few instructions.
    checks: Mutex<CheckRecord>,
}

/// The recent history of the active checks.
#[derive(Debug, Clone, Default)]
pub struct CheckRecord {
    /// Consecutive good probes, and consecutive failed ones (one is 0).
    pub successes: u32,
    pub failures: u32,
    pub last_error: Option<String>,
    /// When the state last changed, in [`now_ms`].
    pub changed_at: u64,
    /// The last probe: whether it passed, how long it took, and when.
    pub last: Option<LastProbe>,
}

/// One probe, as `/stats` shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastProbe {
    pub passed: bool,
    pub latency_ms: f64,
    /// In [`now_ms`].
    pub at: u64,
}

/// A change decided by a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
    /// Up all along, but resting after failures of live traffic: `rise`
    /// good probes since the last one end the rest.
    Recovered,
}

impl Health {
    pub fn new(initial: State, now: u64) -> Self {
        Self {
            state: AtomicU8::new(initial.as_u8()),
            up_since: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            checked: AtomicU64::new(0),
            accessed: AtomicU64::new(0),
            probes_since_failure: AtomicU32::new(0),
            rest_ended: AtomicBool::new(false),
            checks: Mutex::new(CheckRecord {
                changed_at: now,
                ..CheckRecord::default()
            }),
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn checks(&self) -> CheckRecord {
        self.checks.lock().clone()
    }

    /// Notes a probe's outcome and duration, for `/stats` (the state is
    /// [`Health::record_probe`]'s).
    pub fn note_probe(&self, passed: bool, latency: std::time::Duration, now: u64) {
        self.checks.lock().last = Some(LastProbe {
            passed,
            latency_ms: latency.as_secs_f64() * 1e3,
            at: now,
        });
    }

    /// Whether the round-robin may pick this upstream at `now`: it is up,
    /// and not resting after `max_fails` passive failures.
    pub fn available(&self, settings: &HealthSettings, now: u64) -> bool {
        self.state() == State::Up && !self.resting(settings, now)
    }

    fn resting(&self, settings: &HealthSettings, now: u64) -> bool {
        self.rest_left(settings, now).is_some()
    }

    /// Milliseconds left of the rest after `max_fails` passive failures at
    /// `now`, if the upstream rests (counted from the last failure, or from
    /// the last trial request).
    pub fn rest_left(&self, settings: &HealthSettings, now: u64) -> Option<u64> {
        if settings.max_fails == 0
            || self.fails.load(Ordering::Relaxed) < settings.max_fails
            || self.rest_ended.load(Ordering::Relaxed)
        {
            return None;
        }
        let ends = self.checked.load(Ordering::Relaxed) + millis(settings.fail_timeout);
        (now <= ends).then(|| ends - now)
    }

    /// `up`, `ramping` (slow start under way), `resting` (after failures of
    /// live traffic), `down` or `unknown` at `now`.
    pub fn state_name(&self, settings: &HealthSettings, now: u64) -> &'static str {
        match self.state() {
            State::Up if self.resting(settings, now) => "resting",
            State::Up if self.ramping(settings, now) => "ramping",
            State::Up => "up",
            State::Down => "down",
            State::Unknown => "unknown",
        }
    }

    /// The picked upstream's rest, if over, starts its one trial request
    /// (nginx: `checked = now` when a peer is chosen after `fail_timeout`).
    pub fn picked(&self, settings: &HealthSettings, now: u64) {
        if self.fails.load(Ordering::Relaxed) == 0 {
            return;
        }
        let checked = self.checked.load(Ordering::Relaxed);
        if now.saturating_sub(checked) > millis(settings.fail_timeout)
            || self.rest_ended.swap(false, Ordering::Relaxed)
        {
            self.checked.store(now, Ordering::Relaxed);
        }
    }

    /// The weight the round-robin gives this upstream at `now`: `None` if it
    /// may not be picked (not up, or resting unless `despite_rest`);
    /// `weight`, or less while it ramps up after coming back. The common
    /// case, an upstream up, not ramping, with no recent failure, reads
    /// three atomics and not the settings.
    pub fn weight_now(
        &self,
        weight: u32,
        settings: &HealthSettings,
        now: u64,
        despite_rest: bool,
    ) -> Option<u32> {
        if self.state() != State::Up {
            return None;
        }
        if self.fails.load(Ordering::Relaxed) == 0 && self.up_since.load(Ordering::Relaxed) == 0 {
            return Some(weight);
        }
        if !despite_rest && self.resting(settings, now) {
            return None;
        }
        Some(self.ramped_weight(weight, settings, now))
    }

    /// `weight`, or less while ramping up after coming back.
    pub fn ramped_weight(&self, weight: u32, settings: &HealthSettings, now: u64) -> u32 {
        match self.ramp(settings, now) {
            Some((elapsed, period)) if weight > 0 => {
                ((u64::from(weight) * elapsed / period) as u32).max(1)
            }
            _ => {
                // Past the ramp: later picks need not look at it again.
                if self.up_since.load(Ordering::Relaxed) != 0 && weight > 0 {
                    self.up_since.store(0, Ordering::Relaxed);
                }
                weight
            }
        }
    }

    /// Whether the upstream is up and still ramping at `now`.
    pub fn ramping(&self, settings: &HealthSettings, now: u64) -> bool {
        self.state() == State::Up && self.ramp(settings, now).is_some()
    }

    /// `(elapsed, period)` of the slow start under way at `now`, if any.
    fn ramp(&self, settings: &HealthSettings, now: u64) -> Option<(u64, u64)> {
        let period = millis(settings.slow_start);
        let up_since = self.up_since.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(up_since);
        (period > 0 && up_since != 0 && elapsed < period).then_some((elapsed, period))
    }

    /// Counts a failure of live traffic; returns whether it made the
    /// upstream rest.
    pub fn passive_failure(&self, settings: &HealthSettings, now: u64) -> bool {
        if settings.max_fails == 0 {
            return false;
        }
        let fails = self.fails.fetch_add(1, Ordering::Relaxed) + 1;
        self.probes_since_failure.store(0, Ordering::Relaxed);
        self.rest_ended.store(false, Ordering::Relaxed);
        self.accessed.store(now, Ordering::Relaxed);
        self.checked.store(now, Ordering::Relaxed);
        fails == settings.max_fails
    }

    /// Counts a success of live traffic: a request picked after the last
    /// failure went well, so the failures are forgiven.
    pub fn passive_success(&self) {
        if self.accessed.load(Ordering::Relaxed) < self.checked.load(Ordering::Relaxed) {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    /// Failures of live traffic counted since the last success.
    pub fn passive_fails(&self) -> u32 {
        self.fails.load(Ordering::Relaxed)
    }

    /// Records a probe's result at `now`; returns the change it caused, if
    /// any.
    pub fn record_probe(
        &self,
        result: Result<(), String>,
        settings: &HealthSettings,
        now: u64,
    ) -> Option<Transition> {
        let mut checks = self.checks.lock();
        let state = self.state();
        let next = match result {
            Ok(()) => {
                checks.successes += 1;
                checks.failures = 0;
                let since_failure = self.probes_since_failure.fetch_add(1, Ordering::Relaxed) + 1;
                if state == State::Up
                    && since_failure >= settings.rise
                    && self.resting(settings, now)
                {
                    // The rest ends here, as if `fail_timeout` had passed:
                    // one trial request may go, and its success forgives
                    // the failures (or its failure rests it again). It
                    // ramps up as an upstream coming back does.
                    self.rest_ended.store(true, Ordering::Relaxed);
                    self.up_since.store(now.max(1), Ordering::Relaxed);
                    return Some(Transition::Recovered);
                }
                (state != State::Up && checks.successes >= settings.rise).then_some(State::Up)
            }
            Err(error) => {
                checks.failures += 1;
                checks.successes = 0;
                checks.last_error = Some(error);
                self.probes_since_failure.store(0, Ordering::Relaxed);
                (state != State::Down && checks.failures >= settings.fall).then_some(State::Down)
            }
        }?;
        checks.changed_at = now;
        if next == State::Up {
            // Slow start counts from here; a failure count from before the
            // upstream went down no longer says anything.
            self.up_since.store(now.max(1), Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
        }
        self.state.store(next.as_u8(), Ordering::Relaxed);
        Some(if next == State::Up {
            Transition::WentUp
        } else {
            Transition::WentDown
        })
    }

    /// Marks the upstream up without probing (active checks are off).
    pub fn assume_up(&self, now: u64) {
        if self.state() != State::Up {
            self.state.store(State::Up.as_u8(), Ordering::Relaxed);
            self.checks.lock().changed_at = now;
        }
    }
}

fn millis(duration: std::time::Duration) -> u64 {
    duration.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settings() -> HealthSettings {
        HealthSettings {
            rise: 2,
            fall: 3,
            max_fails: 2,
            fail_timeout: Duration::from_secs(10),
            slow_start: Duration::from_secs(10),
            ..HealthSettings::default()
        }
    }

    const FAIL: fn() -> Result<(), String> = || Err("status 500".to_owned());

    #[test]
    fn fall_failed_probes_in_a_row_take_it_down_and_rise_good_ones_bring_it_back() {
        let (health, s) = (Health::new(State::Up, 0), settings());
        assert_eq!(health.record_probe(FAIL(), &s, 1), None);
        assert_eq!(health.record_probe(FAIL(), &s, 2), None);
        // A success in between starts the count over.
        assert_eq!(health.record_probe(Ok(()), &s, 3), None);
        assert_eq!(health.record_probe(FAIL(), &s, 4), None);
        assert_eq!(health.record_probe(FAIL(), &s, 5), None);
        assert_eq!(
            health.record_probe(FAIL(), &s, 6),
            Some(Transition::WentDown)
        );
        assert!(!health.available(&s, 7));
        assert_eq!(health.checks().last_error.as_deref(), Some("status 500"));
        assert_eq!(health.checks().changed_at, 6);

        assert_eq!(health.record_probe(Ok(()), &s, 8), None);
        assert_eq!(health.record_probe(Ok(()), &s, 9), Some(Transition::WentUp));
        assert!(health.available(&s, 10));
        assert_eq!(health.checks().successes, 2);
    }

    #[test]
    fn an_unknown_upstream_serves_only_after_rise_probes() {
        let (health, s) = (Health::new(State::Unknown, 0), settings());
        assert!(!health.available(&s, 1));
        health.record_probe(Ok(()), &s, 1);
        assert!(!health.available(&s, 2));
        assert_eq!(health.record_probe(Ok(()), &s, 2), Some(Transition::WentUp));
        assert!(health.available(&s, 3));
    }

    #[test]
    fn max_fails_rest_the_upstream_for_fail_timeout_then_one_trial() {
        let (health, s) = (Health::new(State::Up, 0), settings());
        assert!(!health.passive_failure(&s, 1_000));
        assert!(health.available(&s, 1_000));
        assert!(health.passive_failure(&s, 1_500));
        assert!(!health.available(&s, 1_501));
        assert!(!health.available(&s, 11_500));
        // The rest is over: a trial request may go.
        assert!(health.available(&s, 11_501));
        health.picked(&s, 11_501);
        // While the trial is out, the upstream rests again.
        assert!(!health.available(&s, 11_502));
        // The trial succeeded: the failures are forgiven.
        health.passive_success();
        assert_eq!(health.passive_fails(), 0);
        assert!(health.available(&s, 11_503));
    }

    #[test]
    fn a_trial_that_fails_rests_the_upstream_again() {
        let (health, s) = (Health::new(State::Up, 0), settings());
        health.passive_failure(&s, 0);
        health.passive_failure(&s, 0);
        health.picked(&s, 10_001);
        health.passive_failure(&s, 10_002);
        assert!(!health.available(&s, 15_000));
        health.passive_success();
        assert_eq!(
            health.passive_fails(),
            3,
            "a later failure is not forgiven by an earlier success"
        );
    }

    #[test]
    fn slow_start_ramps_linearly_in_integers_and_never_starves_weight_1() {
        let (health, s) = (Health::new(State::Down, 0), settings());
        health.record_probe(Ok(()), &s, 1_000);
        health.record_probe(Ok(()), &s, 2_000);
        // Time only moves forward: each look is later than the one before.
        assert_eq!(health.ramped_weight(1, &s, 2_000), 1);
        assert_eq!(health.ramped_weight(4, &s, 2_001), 1);
        assert_eq!(health.ramped_weight(4, &s, 4_500), 1);
        assert!(health.ramping(&s, 5_000));
        assert_eq!(health.ramped_weight(4, &s, 7_000), 2);
        assert_eq!(health.ramped_weight(4, &s, 11_999), 3);
        assert!(!health.ramping(&s, 12_000));
        assert_eq!(health.ramped_weight(4, &s, 12_000), 4);
        let no_ramp = HealthSettings {
            slow_start: Duration::ZERO,
            ..settings()
        };
        assert_eq!(health.ramped_weight(4, &no_ramp, 2_000), 4);
    }

    #[test]
    fn weight_now_skips_what_may_not_be_picked() {
        let s = settings();
        let health = Health::new(State::Up, 0);
        assert_eq!(health.weight_now(3, &s, 5, false), Some(3));
        health.passive_failure(&s, 10);
        health.passive_failure(&s, 10);
        assert_eq!(health.weight_now(3, &s, 20, false), None);
        assert_eq!(health.state_name(&s, 20), "resting");
        assert_eq!(health.rest_left(&s, 20), Some(9_990));
        // When no other upstream can take a request, a resting one may.
        assert_eq!(health.weight_now(3, &s, 20, true), Some(3));
        for state in [State::Down, State::Unknown] {
            assert_eq!(Health::new(state, 0).weight_now(3, &s, 5, true), None);
        }
    }

    #[test]
    fn rise_good_probes_after_the_last_failure_end_a_rest_into_a_trial() {
        let s = HealthSettings {
            slow_start: Duration::ZERO,
            ..settings()
        };
        let health = Health::new(State::Up, 0);
        // A good probe before the failures counts for nothing after them.
        health.record_probe(Ok(()), &s, 500);
        health.passive_failure(&s, 1_000);
        health.passive_failure(&s, 1_000);
        assert_eq!(health.state_name(&s, 1_001), "resting");
        assert_eq!(health.record_probe(Ok(()), &s, 2_000), None);
        assert!(!health.available(&s, 2_001), "one probe is not rise");
        assert_eq!(
            health.record_probe(Ok(()), &s, 3_000),
            Some(Transition::Recovered)
        );
        assert!(health.available(&s, 3_001), "long before fail_timeout");
        // One trial goes; while it is out, the upstream rests again.
        health.picked(&s, 3_001);
        assert!(!health.available(&s, 3_002));
        // It went well: the failures are forgiven.
        health.passive_success();
        assert_eq!(health.passive_fails(), 0);
        assert!(health.available(&s, 3_003));

        // A failed probe in between starts the count over.
        health.passive_failure(&s, 4_000);
        health.passive_failure(&s, 4_000);
        health.record_probe(Ok(()), &s, 5_000);
        health.record_probe(Err("status 500".to_owned()), &s, 6_000);
        assert_eq!(health.record_probe(Ok(()), &s, 7_000), None);
        assert!(!health.available(&s, 7_001));
    }

    #[test]
    fn probes_after_a_failure_short_of_a_rest_change_nothing() {
        let (health, s) = (Health::new(State::Up, 0), settings());
        health.passive_failure(&s, 1_000);
        health.record_probe(Ok(()), &s, 2_000);
        assert_eq!(health.record_probe(Ok(()), &s, 3_000), None);
        assert_eq!(health.passive_fails(), 1);
        assert!(!health.ramping(&s, 3_001), "no slow start for one failure");
    }

    #[test]
    fn an_upstream_back_from_a_rest_ramps_up_when_slow_start_is_on() {
        let (health, s) = (Health::new(State::Up, 0), settings());
        health.passive_failure(&s, 0);
        health.passive_failure(&s, 0);
        health.record_probe(Ok(()), &s, 1_000);
        health.record_probe(Ok(()), &s, 2_000);
        assert_eq!(health.state_name(&s, 2_001), "ramping");
        assert_eq!(health.weight_now(4, &s, 7_000, false), Some(2));
    }
}
