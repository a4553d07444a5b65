//! The service's work: events from the stream into the database, each
//! acknowledged only once committed; what cannot be read, parked; and the
//! stream kept short.
//!
//! One task (`consume`) reads and writes, in this order each round: what
//! this consumer read before and did not acknowledge (after a start or a
//! failed acknowledgement), what another consumer left idle too long (at
//! most once per half `claim_idle`), and new events. A batch is written in
//! one transaction and retried, with a growing pause, until the database
//! takes it or the service stops; nothing is acknowledged before. Another
//! task (`observe`) reads the lag every quarter of a second and the
//! database's counts every second, for `/stats` and `/metrics`, and trims
//! the stream every `trim_interval`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use spike_config::OrdersConfig;
use tokio_util::sync::CancellationToken;

use crate::database::{Database, DatabaseError, OrderCounts};
use crate::event::{Event, Kind};
use crate::metrics::Metrics;
use crate::stream::{Entry, Lag, Stream, StreamError};

/// The first pause after a failure; it doubles up to `retry_max`.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// A failure that goes on is logged once per this long.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often the lag is read (a few cheap commands to Redis).
const LAG_EVERY: Duration = Duration::from_millis(250);
/// How often the database's orders are counted (a scan of the sale's
/// index) when nothing was written since the last count.
const COUNT_EVERY: Duration = Duration::from_secs(1);

/// The service's state, shared by its tasks and its admin.
#[derive(Debug)]
pub struct Service {
    pub config: OrdersConfig,
    pub stream: Stream,
    pub database: Database,
    pub metrics: Metrics,
    /// What `observe` last read.
    seen: Mutex<Seen>,
    redis_up: AtomicBool,
    database_up: AtomicBool,
    /// Set once the tables are ready.
    ready: AtomicBool,
    started: Instant,
}

/// The last lag and counts read.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    lag: Option<Lag>,
    counts: Option<OrderCounts>,
}

/// `/stats`.
#[derive(Debug, Serialize)]
pub struct Stats<'a> {
    pub event: &'a str,
    pub group: &'a str,
    pub consumer: &'a str,
    pub database: &'static str,
    pub redis_up: bool,
    pub database_up: bool,
    pub uptime_seconds: u64,
    /// Events not in the database yet, and how long the oldest has waited;
    /// `null` until Redis has answered.
    pub lag: Option<Lag>,
    /// The sale's orders in the database; `null` until it has answered.
    pub orders: Option<OrderCounts>,
    /// Events this service wrote for the first time, by kind.
    pub written: Written,
    /// Events delivered again (after a restart or a takeover) and found
    /// written already.
    pub written_again: u64,
    pub batches: u64,
    pub retries: u64,
    pub database_errors: u64,
    pub redis_errors: u64,
    /// Entries taken over from consumers idle too long.
    pub claimed: u64,
    /// Entries parked in the dead letter stream.
    pub dead_letters: u64,
    pub trimmed: u64,
}

#[derive(Debug, Serialize)]
pub struct Written {
    pub created: u64,
    pub paid: u64,
    pub expired: u64,
}

/// How writing a slice of a batch ended.
enum Write {
    Committed,
    /// The database refuses one of them, for good.
    Refused(String),
    /// It took longer than `database_timeout`: smaller slices may not.
    TooSlow,
    Stopped,
}

/// What a round of reading found.
enum Read {
    Entries(Vec<Entry>),
    /// Nothing to do.
    Idle,
}

impl Service {
    pub fn new(config: OrdersConfig, consumer: &str) -> anyhow::Result<Self> {
        let stream = Stream::new(
            &config.redis,
            &config.event,
            &config.group,
            consumer,
            (config.redis_timeout, config.read_wait),
            config.replica_acks,
        )?;
        let database =
            Database::open(&config.database_url, &config.event, config.database_timeout)?;
        Ok(Self {
            config,
            stream,
            database,
            metrics: Metrics::new(),
            seen: Mutex::new(Seen::default()),
            redis_up: AtomicBool::new(false),
            database_up: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    pub fn database_kind(&self) -> &'static str {
        if self.config.database_url.starts_with("sqlite") {
            "sqlite"
        } else {
            "postgres"
        }
    }

    /// Reads events and writes them until `shutdown`.
    pub async fn consume(self: Arc<Self>, shutdown: CancellationToken) {
        // The group first: from then on the stream keeps what it has not
        // read, whoever trims it, while the tables are made ready.
        let mut redis = Failing::new("redis", self.config.retry_max);
        while let Err(err) = self.stream.join().await {
            self.redis_up.store(false, Ordering::Relaxed);
            let pause = redis.failed(&err);
            if pause_or_stop(pause, &shutdown).await {
                return;
            }
        }
        redis.recovered();
        let mut failing = Failing::new("the database", self.config.retry_max);
        while !self.ready.load(Ordering::Relaxed) {
            match self.database.prepare().await {
                Ok(()) => {
                    self.database_up.store(true, Ordering::Relaxed);
                    self.ready.store(true, Ordering::Relaxed);
                    failing.recovered();
                }
                Err(err) => {
                    self.database_up.store(false, Ordering::Relaxed);
                    let pause = failing.failed(&err);
                    if pause_or_stop(pause, &shutdown).await {
                        return;
                    }
                }
            }
        }
        // After a start, and after an acknowledgement failed: this
        // consumer's own unacknowledged entries come first.
        let mut own = true;
        let mut cursor = "0-0".to_owned();
        let mut next_claim = Instant::now();
        while !shutdown.is_cancelled() {
            let read = self.read(&mut own, &mut cursor, &mut next_claim, &shutdown);
            let entries = match read.await {
                Ok(Read::Entries(entries)) => {
                    redis.recovered();
                    self.redis_up.store(true, Ordering::Relaxed);
                    entries
                }
                Ok(Read::Idle) => {
                    redis.recovered();
                    self.redis_up.store(true, Ordering::Relaxed);
                    continue;
                }
                Err(err) => {
                    self.redis_up.store(false, Ordering::Relaxed);
                    self.metrics.redis_errors.inc();
                    // A Redis that lost its data lost the group too: join
                    // again before reading.
                    own = true;
                    let pause = redis.failed(&err);
                    if pause_or_stop(pause, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            if let Err(err) = self.handle(&entries, &shutdown).await {
                // Written but not acknowledged (or stopped before the
                // write): read again from this consumer's pending list.
                self.metrics.redis_errors.inc();
                self.redis_up.store(false, Ordering::Relaxed);
                own = true;
                let pause = redis.failed(&err);
                if pause_or_stop(pause, &shutdown).await {
                    return;
                }
            }
        }
    }

    /// The next entries to handle.
    async fn read(
        &self,
        own: &mut bool,
        cursor: &mut String,
        next_claim: &mut Instant,
        shutdown: &CancellationToken,
    ) -> Result<Read, StreamError> {
        let batch = self.config.batch;
        if *own {
            self.stream.join().await?;
            let entries = self.stream.read_own(batch).await?;
            if entries.is_empty() {
                *own = false;
                return Ok(Read::Idle);
            }
            return Ok(Read::Entries(entries));
        }
        if Instant::now() >= *next_claim {
            let (entries, next) = self
                .stream
                .claim(self.config.claim_idle, cursor, batch)
                .await?;
            if next == "0-0" {
                *next_claim = Instant::now() + self.config.claim_idle / 2;
            }
            *cursor = next;
            if !entries.is_empty() {
                self.metrics.claimed.inc_by(entries.len() as u64);
                tracing::info!(
                    entries = entries.len(),
                    "took over events another consumer left unacknowledged"
                );
                return Ok(Read::Entries(entries));
            }
        }
        let read = self.stream.read_new(batch, self.config.read_wait);
        tokio::select! {
            entries = read => {
                let entries = entries?;
                Ok(if entries.is_empty() { Read::Idle } else { Read::Entries(entries) })
            }
            () = shutdown.cancelled() => Ok(Read::Idle),
        }
    }

    /// Parks what is not an event, writes the rest, and acknowledges it
    /// once committed. `Err` only for Redis; the database is retried here
    /// until it takes the batch or the service stops. A batch the database
    /// refuses (a constraint, a value it cannot take) is split in halves
    /// until the event it refuses is alone, and that one is parked: one bad
    /// event never holds up the others.
    async fn handle(
        &self,
        entries: &[Entry],
        shutdown: &CancellationToken,
    ) -> Result<(), StreamError> {
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            match Event::parse(id, fields.as_deref()) {
                Ok(event) => events.push(event),
                Err(why) => self.park(id, fields.as_deref(), &why.to_string()).await?,
            }
        }
        // What is left to write, the next slice last.
        let mut slices = vec![&events[..]];
        while let Some(slice) = slices.pop() {
            if slice.is_empty() {
                continue;
            }
            match self.write(slice, shutdown).await {
                Write::Committed => {
                    let ids: Vec<&str> = slice.iter().map(|event| event.id.as_str()).collect();
                    self.stream.ack(&ids).await?;
                }
                // Stopped while the database was down: the events stay
                // pending, and are read again.
                Write::Stopped => return Ok(()),
                Write::Refused(why) if slice.len() == 1 => {
                    let id = &slice[0].id;
                    let fields = entries
                        .iter()
                        .find(|(entry, _)| entry == id)
                        .and_then(|(_, fields)| fields.as_deref());
                    self.park(id, fields, &format!("the database refuses it: {why}"))
                        .await?;
                }
                Write::Refused(_) | Write::TooSlow => {
                    let (first, rest) = slice.split_at(slice.len() / 2);
                    slices.push(rest);
                    slices.push(first);
                }
            }
        }
        Ok(())
    }

    /// Parks entry `id` in the dead letter stream.
    async fn park(
        &self,
        id: &str,
        fields: Option<&[(Vec<u8>, Vec<u8>)]>,
        why: &str,
    ) -> Result<(), StreamError> {
        tracing::warn!(entry = %id, reason = %why, stream = %self.stream.dead,
            "an entry that cannot be written as an order event is parked");
        self.stream.park(id, fields, why).await?;
        self.metrics.dead_letters.inc();
        Ok(())
    }

    /// Writes `events`, retrying while the database fails, until it
    /// commits them, refuses them, or takes too long for more than one of
    /// them, or the service stops.
    async fn write(&self, events: &[Event], shutdown: &CancellationToken) -> Write {
        let mut failing = Failing::new("the database", self.config.retry_max);
        loop {
            let err = match self.database.write(events).await {
                Ok(written) => {
                    failing.recovered();
                    self.database_up.store(true, Ordering::Relaxed);
                    for (kind, count) in Kind::ALL.into_iter().zip(written.new) {
                        self.metrics.written(kind).inc_by(count);
                    }
                    self.metrics.written_again.inc_by(written.again);
                    self.metrics.batches.inc();
                    return Write::Committed;
                }
                Err(err) => err,
            };
            self.metrics.database_errors.inc();
            if err.is_refusal() {
                return Write::Refused(err.to_string());
            }
            self.database_up.store(false, Ordering::Relaxed);
            if matches!(err, DatabaseError::Timeout(_)) && events.len() > 1 {
                return Write::TooSlow;
            }
            let pause = failing.failed(&err);
            if pause_or_stop(pause, shutdown).await {
                return Write::Stopped;
            }
            self.metrics.retries.inc();
        }
    }

    /// Reads the lag every [`LAG_EVERY`] and the database's counts every
    /// [`COUNT_EVERY`], and trims the stream every `trim_interval`, until
    /// `shutdown`.
    pub async fn observe(self: Arc<Self>, shutdown: CancellationToken) {
        let trim_interval = self.config.trim_interval;
        let mut next_trim = Instant::now() + trim_interval;
        let mut next_count = Instant::now();
        let mut counted_after = u64::MAX;
        loop {
            let lag = self.stream.lag().await.ok();
            // Counted after the lag is read, so that counts shown beside a
            // lag hold at least what it says is written.
            let batches = self.metrics.batches.get();
            let due = batches != counted_after || Instant::now() >= next_count;
            let counts = if self.ready.load(Ordering::Relaxed) && due {
                next_count = Instant::now() + COUNT_EVERY;
                counted_after = batches;
                self.database.counts().await.ok()
            } else {
                None
            };
            {
                let mut seen = self.seen.lock();
                seen.lag = lag.or(seen.lag);
                seen.counts = counts.or(seen.counts);
            }
            if let Some(lag) = lag {
                self.metrics.set_lag(&lag);
            }
            if !trim_interval.is_zero() && Instant::now() >= next_trim {
                next_trim = Instant::now() + trim_interval;
                match self.stream.trim().await {
                    Ok(0) => {}
                    Ok(trimmed) => {
                        self.metrics.trimmed.inc_by(trimmed);
                        tracing::debug!(
                            trimmed,
                            "trimmed the stream below what every group acknowledged"
                        );
                    }
                    Err(err) => tracing::debug!(error = %err, "cannot trim the stream now"),
                }
            }
            tokio::select! {
                () = tokio::time::sleep(LAG_EVERY) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    pub fn database_up(&self) -> bool {
        self.database_up.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> Stats<'_> {
        let seen = *self.seen.lock();
        let m = &self.metrics;
        Stats {
            event: &self.config.event,
            group: &self.stream.group,
            consumer: &self.stream.consumer,
            database: self.database_kind(),
            redis_up: self.redis_up(),
            database_up: self.database_up(),
            uptime_seconds: self.started.elapsed().as_secs(),
            lag: seen.lag,
            orders: seen.counts,
            written: Written {
                created: m.written(Kind::Created).get(),
                paid: m.written(Kind::Paid).get(),
                expired: m.written(Kind::Expired).get(),
            },
            written_again: m.written_again.get(),
            batches: m.batches.get(),
            retries: m.retries.get(),
            database_errors: m.database_errors.get(),
            redis_errors: m.redis_errors.get(),
            claimed: m.claimed.get(),
            dead_letters: m.dead_letters.get(),
            trimmed: m.trimmed.get(),
        }
    }
}

/// Sleeps `pause`; `true` if the service stopped meanwhile.
async fn pause_or_stop(pause: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => false,
        () = shutdown.cancelled() => true,
    }
}

/// A failure that may go on: logged when it starts and once per
/// [`LOG_EVERY`] while it lasts, its end logged too, with a pause that
/// doubles from [`FIRST_RETRY`] to `max`.
#[derive(Debug)]
struct Failing {
    what: &'static str,
    max: Duration,
    pause: Duration,
    since: Option<Instant>,
    logged: Option<Instant>,
}

impl Failing {
    fn new(what: &'static str, max: Duration) -> Self {
        Self {
            what,
            max,
            pause: FIRST_RETRY,
            since: None,
            logged: None,
        }
    }

    /// Notes a failure; returns how long to wait before the next attempt.
    fn failed(&mut self, err: &dyn std::fmt::Display) -> Duration {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if self
            .logged
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            self.logged = Some(now);
            tracing::warn!(
                error = %err,
                failing_for = ?now.duration_since(since),
                "{} fails; events wait in the stream and are tried again", self.what
            );
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(self.max);
        pause.min(self.max)
    }

    fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(after = ?since.elapsed(), "{} answers again", self.what);
        }
        self.pause = FIRST_RETRY;
        self.logged = None;
    }
}
