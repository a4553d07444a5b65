//! The parking lot: idle keep-alive connections reduced to their socket and
//! what their next request needs, watched together by one task per worker.
//!
//! A connection idle for [`super::conn::PARK_AFTER`] gives up its task,
//! hyper's state and buffers, and its registration with tokio's reactor.
//! Its socket joins the lot's own epoll set, which tokio watches as one
//! descriptor, and its idle deadline joins the lot's ordered set of
//! deadlines, served by one timer. When the socket becomes readable (a next
//! request, or the client's close), it leaves the lot and gets a task
//! again; when its deadline passes first, it is closed. Parked, a
//! connection costs its socket and about a hundred bytes in the lot, no
//! allocation of its own: like nginx, which keeps a small struct for an
//! idle keep-alive connection and frees its buffers.

use std::collections::BTreeSet;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn::ConnectionCounts;

/// Readiness events taken from the lot's epoll set at a time.
const EVENTS: usize = 1024;

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
    /// Told when a connection parks with the earliest deadline in the lot.
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
    deadlines: BTreeSet<(Instant, usize)>,
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
                deadlines: BTreeSet::new(),
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
        let mut spaces = self.spaces.lock().unwrap_or_else(PoisonError::into_inner);
        match spaces.park(parked) {
            Ok(true) => self.earliest.notify_one(),
            Ok(false) => {}
            Err(err) => {
                tracing::debug!(error = %err, "an idle connection could not be parked: closed");
            }
        }
    }

    fn spaces(&self) -> MutexGuard<'_, Spaces<T>> {
        self.spaces.lock().unwrap_or_else(PoisonError::into_inner)
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
            let next = self
                .lot
                .spaces()
                .deadlines
                .first()
                .map(|&(deadline, _)| deadline);
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
                _ = sleep.as_mut(), if next.is_some() => self.lot.spaces().expire(Instant::now()),
            }
        }
        self.lot.spaces().close_all();
    }
}

impl<T> Spaces<T> {
    /// Parks a connection; true if its deadline is now the earliest.
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
        let earliest = self
            .deadlines
            .first()
            .is_none_or(|&(first, _)| parked.deadline < first);
        self.deadlines.insert((parked.deadline, token));
        space.insert(parked);
        self.counts.parked.fetch_add(1, Ordering::Relaxed);
        Ok(earliest)
    }

    /// Takes the connection of `token` out of the lot, its socket out of
    /// the epoll set and back into tokio's reactor.
    fn unpark(&mut self, token: usize) -> Option<(T, TcpStream)> {
        let parked = self.leave(token)?;
        let fd = parked.stream.as_raw_fd();
        let registered = self
            .registry
            .deregister(&mut SourceFd(&fd))
            .and_then(|()| TcpStream::from_std(parked.stream));
        match registered {
            Ok(stream) => Some((parked.conn, stream)),
            Err(err) => {
                tracing::debug!(error = %err, "a parked connection could not be served again: closed");
                None
            }
        }
    }

    /// Closes the connections whose deadline is not after `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(deadline, token)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            // Dropped: closing the socket also takes it out of the set.
            self.leave(token);
        }
    }

    fn leave(&mut self, token: usize) -> Option<Parked<T>> {
        let parked = self.parked.try_remove(token)?;
        self.deadlines.remove(&(parked.deadline, token));
        self.counts.parked.fetch_sub(1, Ordering::Relaxed);
        Some(parked)
    }

    /// Closes every parked connection, and parks none from now on.
    fn close_all(&mut self) {
        self.closed = true;
        let parked = self.parked.len() as u64;
        self.counts.parked.fetch_sub(parked, Ordering::Relaxed);
        self.parked.clear();
        self.deadlines.clear();
    }
}
