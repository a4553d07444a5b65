//! The parking lot: idle keep-alive connections reduced to their socket and
//! what their next request needs, watched together by one task per worker.
//!
//! A connection idle for [`super::phase::PARK_AFTER`] gives up its task,
//! its buffers, and its registration with tokio's reactor.
//! Its socket joins the lot's own epoll set, which tokio watches as one
//! descriptor, and its idle deadline joins the lot's queue of deadlines,
//! served by one timer. When the socket becomes readable (a next
//! request, or the client's close), it leaves the lot and gets a task
//! again; when its deadline passes first, it is closed. Parked, a
//! connection costs its socket and about a hundred bytes in the lot, no
//! allocation of its own: like nginx, which keeps a small struct for an
//! idle keep-alive connection and frees its buffers.

use std::collections::VecDeque;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::Arc;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use parking_lot::{Mutex, MutexGuard};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::counters::ConnectionCounts;

/// Readiness events taken from the lot's epoll set at a time.
const EVENTS: usize = 1024;

/// How many more deadlines than twice the parked connections the queue
/// holds before the items of connections that left are dropped from it.
const COMPACT_ABOVE: usize = 1024;

/// A connection handed to the lot: its socket, when it is to be closed if
/// the client stays silent, and `conn`, what it keeps between requests.
pub(super) struct Parked<T> {
    pub stream: StdTcpStream,
    pub deadline: Instant,
    pub conn: T,
}

/// The parked connections of one worker. Connections park themselves
/// through a [`Lot`]; [`Attendant::run`] watches them.
pub(super) struct Lot<T> {
    spaces: Mutex<Spaces<T>>,
    /// Told when a connection parks in a lot with no deadline queued.
    earliest: Notify,
}

/// The task that watches a lot.
pub(super) struct Attendant<T> {
    /// The epoll set of the parked sockets, itself watched by tokio.
    poll: AsyncFd<Poll>,
    lot: Arc<Lot<T>>,
}

/// The parked connections, by the token of their socket in the epoll set.
struct Spaces<T> {
    registry: Registry,
    parked: Slab<Parked<T>>,
    /// The deadline and token of every parked connection, earliest first.
    /// All come from the same idle timeout, and connections park in about
    /// the order of their deadlines (within the slack of the moment to
    /// park, [`super::phase::PARK_SLACK`]), so one is inserted near the
    /// back. Items of connections that left stay until they come up or the
    /// queue is compacted: parking costs no allocation of its own.
    deadlines: VecDeque<(Instant, usize)>,
    counts: Arc<ConnectionCounts>,
    /// Set once the attendant has stopped: nothing parks any more.
    closed: bool,
}

impl<T> Lot<T> {
    /// An empty lot, counting its connections in `counts`, and its
    /// attendant. Must be called within a tokio runtime, whose reactor
    /// watches the lot.
    pub fn new(counts: Arc<ConnectionCounts>) -> io::Result<(Arc<Self>, Attendant<T>)> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: `Poll` owns its epoll descriptor, returns that same one
        // from `as_raw_fd` for as long as it lives, and closes it only when
        // dropped, which the `AsyncFd` that owns it does after deregistering.
        #[allow(unsafe_code)]
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE)? };
        let lot = Arc::new(Self {
            spaces: Mutex::new(Spaces {
                registry,
                parked: Slab::new(),
                deadlines: VecDeque::new(),
                counts,
                closed: false,
            }),
            earliest: Notify::new(),
        });
        let attendant = Attendant {
            poll,
            lot: Arc::clone(&lot),
        };
        Ok((lot, attendant))
    }

    /// Parks a connection; if it cannot, the connection is closed.
    pub fn park(&self, parked: Parked<T>) {
        match self.spaces().park(parked) {
            Ok(true) => self.earliest.notify_one(),
            Ok(false) => {}
            Err(err) => {
                tracing::debug!(error = %err, "an idle connection could not be parked: closed");
            }
        }
    }

    fn spaces(&self) -> MutexGuard<'_, Spaces<T>> {
        self.spaces.lock()
    }
}

impl<T> Attendant<T> {
    /// Hands each parked connection whose client sends again back to
    /// `resume`, with its socket registered with tokio again; closes each
    /// one whose deadline passes first. On `shutdown`, closes all of them
    /// and returns.
    pub async fn run(mut self, mut resume: impl FnMut(T, TcpStream), shutdown: CancellationToken) {
        let mut events = Events::with_capacity(EVENTS);
        let mut sleep = pin!(tokio::time::sleep_until(Instant::now()));
        let mut woken = Vec::new();
        loop {
            // Expired here as well as when the timer fires: while clients
            // keep sending, the readable branch below may win every time.
            let next = {
                let mut spaces = self.lot.spaces();
                spaces.expire(Instant::now());
                spaces.deadlines.front().map(|&(deadline, _)| deadline)
            };
            if let Some(deadline) = next
                && sleep.deadline() != deadline
            {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ready = self.poll.readable_mut() => {
                    let mut guard = match ready {
                        Ok(guard) => guard,
                        Err(err) => {
                            tracing::error!(error = %err, "parked connections can no longer be watched: closed");
                            break;
                        }
                    };
                    match guard.get_inner_mut().poll(&mut events, Some(std::time::Duration::ZERO)) {
                        Ok(()) => {}
                        Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                        Err(err) => {
                            tracing::error!(error = %err, "parked connections can no longer be watched: closed");
                            break;
                        }
                    }
                    if events.is_empty() {
                        guard.clear_ready();
                        continue;
                    }
                    let mut spaces = self.lot.spaces();
                    woken.extend(events.iter().filter_map(|event| spaces.unpark(event.token().0)));
                    drop(spaces);
                    for (conn, stream) in woken.drain(..) {
                        resume(conn, stream);
                    }
                }
                _ = self.lot.earliest.notified() => {}
                _ = sleep.as_mut(), if next.is_some() => {}
            }
        }
    }
}

impl<T> Drop for Attendant<T> {
    /// However the attendant stops (shutdown, an error of its epoll set, a
    /// panic), the lot's connections are closed and no more park.
    fn drop(&mut self) {
        self.lot.spaces().close_all();
    }
}

impl<T> Spaces<T> {
    /// Parks a connection; true if its deadline is now the earliest
    /// queued, which the attendant's timer is then not set for.
    fn park(&mut self, parked: Parked<T>) -> io::Result<bool> {
        if self.closed {
            return Err(io::Error::other("the server is shutting down"));
        }
        let space = self.parked.vacant_entry();
        let token = space.key();
        let fd = parked.stream.as_raw_fd();
        // Edge-triggered: data that came before this call is reported too.
        self.registry
            .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)?;
        let at = self
            .deadlines
            .partition_point(|&(deadline, _)| deadline <= parked.deadline);
        self.deadlines.insert(at, (parked.deadline, token));
        space.insert(parked);
        self.counts.parked_one();
        if self.deadlines.len() > 2 * self.parked.len() + COMPACT_ABOVE {
            // One item per parked connection: its own.
            let parked = &self.parked;
            let mut kept = vec![false; parked.capacity()];
            self.deadlines.retain(|&(deadline, token)| {
                let own = parked.get(token).is_some_and(|p| p.deadline == deadline);
                own && !std::mem::replace(&mut kept[token], true)
            });
        }
        Ok(at == 0)
    }

    /// Takes the connection of `token` out of the lot, its socket out of
    /// the epoll set and back into tokio's reactor.
    fn unpark(&mut self, token: usize) -> Option<(T, TcpStream)> {
        let parked = self.leave(token)?;
        match TcpStream::from_std(parked.stream) {
            Ok(stream) => Some((parked.conn, stream)),
            Err(err) => {
                tracing::debug!(error = %err, "a parked connection could not be served again: closed");
                None
            }
        }
    }

    /// Closes the connections whose deadline is not after `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            // The connection parked in this space now, if its own deadline
            // has passed too (the item may be that of one that left).
            if self.parked.get(token).is_some_and(|p| p.deadline <= now) {
                self.leave(token);
            }
        }
    }

    /// Takes the connection of `token` out of the lot and its socket out of
    /// the epoll set (explicitly: closing it would not, were the socket
    /// open elsewhere too, and its events would then wake whichever
    /// connection parks in its space next).
    fn leave(&mut self, token: usize) -> Option<Parked<T>> {
        let parked = self.parked.try_remove(token)?;
        let fd = parked.stream.as_raw_fd();
        if let Err(err) = self.registry.deregister(&mut SourceFd(&fd)) {
            tracing::debug!(error = %err, "a parked socket could not leave the epoll set");
        }
        self.counts.unparked_one();
        Some(parked)
    }

    /// Closes every parked connection, and parks none from now on.
    fn close_all(&mut self) {
        self.closed = true;
        let tokens: Vec<usize> = self.parked.iter().map(|(token, _)| token).collect();
        for token in tokens {
            self.leave(token);
        }
        self.deadlines.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;

    /// A lot's spaces, and a socket to park in them.
    fn spaces() -> (Spaces<&'static str>, impl FnMut() -> StdTcpStream) {
        let poll = Poll::new().unwrap();
        let spaces = Spaces {
            registry: poll.registry().try_clone().unwrap(),
            parked: Slab::new(),
            deadlines: VecDeque::new(),
            counts: Arc::default(),
            closed: false,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let socket = move || {
            let _held = (poll.registry(), &listener);
            StdTcpStream::connect(addr).unwrap()
        };
        (spaces, socket)
    }

    fn parked(stream: StdTcpStream, deadline: Instant, conn: &'static str) -> Parked<&'static str> {
        Parked {
            stream,
            deadline,
            conn,
        }
    }

    fn names(spaces: &Spaces<&'static str>) -> Vec<&'static str> {
        let mut names: Vec<_> = spaces.parked.iter().map(|(_, p)| p.conn).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn connections_close_at_their_deadline_and_not_before() {
        let (mut spaces, mut socket) = spaces();
        let now = Instant::now();
        let second = Duration::from_secs(1);
        spaces.park(parked(socket(), now + second, "a")).unwrap();
        spaces
            .park(parked(socket(), now + 2 * second, "b"))
            .unwrap();
        assert_eq!(spaces.counts.parked(), 2);
        spaces.expire(now);
        assert_eq!(names(&spaces), ["a", "b"]);
        spaces.expire(now + second);
        assert_eq!(names(&spaces), ["b"]);
        spaces.expire(now + 2 * second);
        assert!(names(&spaces).is_empty());
        assert_eq!(spaces.counts.parked(), 0);
    }

    #[test]
    fn one_parked_after_another_with_an_earlier_deadline_closes_at_its_own() {
        let (mut spaces, mut socket) = spaces();
        let now = Instant::now();
        let second = Duration::from_secs(1);
        assert!(
            spaces
                .park(parked(socket(), now + 2 * second, "late"))
                .unwrap()
        );
        // Busy until then, it parked later, with an earlier deadline: the
        // attendant is told, its timer being set for the later one.
        assert!(
            spaces
                .park(parked(socket(), now + second, "early"))
                .unwrap()
        );
        assert!(
            !spaces
                .park(parked(socket(), now + 3 * second, "last"))
                .unwrap()
        );
        spaces.expire(now + second);
        assert_eq!(names(&spaces), ["last", "late"]);
        spaces.expire(now + 2 * second);
        assert_eq!(names(&spaces), ["last"]);
    }

    #[test]
    fn the_deadline_of_one_that_left_does_not_close_the_next_in_its_space() {
        let (mut spaces, mut socket) = spaces();
        let now = Instant::now();
        let second = Duration::from_secs(1);
        spaces.park(parked(socket(), now + second, "a")).unwrap();
        let left = spaces.leave(0).expect("parked in space 0");
        assert_eq!(left.conn, "a");
        spaces
            .park(parked(socket(), now + 3 * second, "b"))
            .unwrap();
        assert_eq!(
            spaces.parked.get(0).map(|p| p.conn),
            Some("b"),
            "same space"
        );
        spaces.expire(now + second);
        assert_eq!(names(&spaces), ["b"]);
        spaces.expire(now + 3 * second);
        assert!(names(&spaces).is_empty());
    }

    #[test]
    fn the_queue_drops_the_items_of_connections_that_left() {
        let (mut spaces, mut socket) = spaces();
        let now = Instant::now();
        let stream = socket();
        let mut stream = Some(stream);
        for _ in 0..4 * COMPACT_ABOVE {
            let deadline = now + Duration::from_secs(60);
            spaces
                .park(parked(stream.take().unwrap(), deadline, "a"))
                .unwrap();
            stream = Some(spaces.leave(0).unwrap().stream);
        }
        assert!(
            spaces.deadlines.len() <= COMPACT_ABOVE + 1,
            "{}",
            spaces.deadlines.len()
        );
        spaces
            .park(parked(stream.take().unwrap(), now, "b"))
            .unwrap();
        assert_eq!(names(&spaces), ["b"]);
    }

    #[test]
    fn a_closed_lot_takes_no_more() {
        let (mut spaces, mut socket) = spaces();
        let now = Instant::now();
        spaces.park(parked(socket(), now, "a")).unwrap();
        spaces.close_all();
        assert_eq!(spaces.counts.parked(), 0);
        assert!(spaces.park(parked(socket(), now, "b")).is_err());
        assert!(names(&spaces).is_empty());
    }
}
