//! One connection to an upstream carrying several exchanges at once
//! (HTTP/1.1 pipelining, RFC 9112, section 9.3.2): requests without a body
//! are written ahead of the responses, those queued during one round of the
//! worker's tasks in one system call, and the responses come back in the
//! order the requests went, each read by its own exchange in turn.
//!
//! On loopback, a message's system call costs nearly the same whatever its
//! size, most of it the kernel's delivery to the receiver: requests that go
//! out together, and responses that come back together, cost one call for
//! many, at both ends.
//!
//! How the exchanges of a connection end together:
//! - a response that closes the connection (`Connection: close`, or a body
//!   read to the close) ends it cleanly: the upstream processed none of the
//!   requests after it (RFC 9112, section 9.6), which are handed back
//!   ([`SendError::NotSent`]) to go elsewhere, as are any never written;
//! - any other failure (an error, a timeout, a response cut short or left
//!   unread, an exchange given up before its response was read) breaks it
//!   from that exchange on: the requests after it that were written may
//!   have reached the upstream, and fail; those never written are handed
//!   back. The exchanges before it go on to their responses.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body::Body;
use parking_lot::Mutex;

use super::response::UpstreamBody;
use super::{ConnectError, Connection, ExchangeError, Link, RequestFraming, SendError};
use crate::encode;
use crate::message::{Request, Response};

/// A connection to an upstream that carries up to a given number of
/// exchanges at once; clones share it.
#[derive(Debug, Clone)]
pub struct Pipeline {
    shared: Arc<Mutex<Shared>>,
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) link: Link,
    /// The exchange whose response comes next, by the order of its request.
    head: u64,
    /// The number the next request gets.
    next: u64,
    /// The wakers of the exchanges after the head, waiting for their turn
    /// (front: `head + 1`).
    turns: VecDeque<Option<Waker>>,
    /// Exchanges waiting for what is queued to go out, while the socket
    /// is full.
    flushes: Vec<Waker>,
    /// Bytes of requests queued since the connection opened.
    queued: u64,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// A response closed the connection: the upstream processed nothing
    /// after the exchange with this number.
    Closed(u64),
    /// Broken from the exchange with this number on: its response, and
    /// those after it, cannot be read.
    Broken(u64),
}

impl Pipeline {
    /// Connects to `addr` within `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ConnectError> {
        let connection = Connection::connect(addr, timeout).await?;
        Ok(Self::new(connection))
    }

    pub fn new(connection: Connection) -> Self {
        Self {
            shared: Arc::new(Mutex::new(Shared {
                link: *connection.link,
                head: 0,
                next: 0,
                turns: VecDeque::new(),
                flushes: Vec::new(),
                queued: 0,
                state: State::Open,
            })),
        }
    }

    /// Whether `req` may go out on a pipeline: a request without a body, by
    /// a safe method (GET or HEAD; RFC 9112, section 9.3.2, advises against
    /// pipelining behind any other).
    pub fn takes<B: Body>(req: &Request<B>) -> bool {
        (req.method() == Method::GET || req.method() == Method::HEAD)
            && RequestFraming::of(req) == RequestFraming::None
    }

    /// The exchanges under way on the connection.
    pub fn in_flight(&self) -> u64 {
        let shared = self.shared.lock();
        shared.next - shared.head
    }

    /// Whether the connection may carry another exchange (`None` if it
    /// never will: closed, broken, or closed by the upstream while it
    /// carried nothing), and if so whether it has room for one with
    /// `depth` at most under way.
    pub fn room(&self, depth: u64) -> Option<bool> {
        let mut shared = self.shared.lock();
        if shared.state != State::Open {
            return None;
        }
        let in_flight = shared.next - shared.head;
        if in_flight > 0 {
            return Some(in_flight < depth);
        }
        // Carrying nothing, it may only have been closed by the upstream.
        let open = shared.link.is_open();
        if !open {
            shared.state = State::Broken(shared.head);
        }
        open.then_some(true)
    }

    /// Sends `req` (which [`Pipeline::takes`]) behind the requests already
    /// on the connection, and reads its response head once theirs have
    /// come. The upstream may keep the exchange waiting `timeout` for the
    /// head once it is next, then between two reads of the body.
    pub async fn send<B>(
        self,
        req: Box<Request<B>>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody<B>>, SendError<B>>
    where
        B: Body<Data = Bytes> + Unpin,
    {
        debug_assert!(Self::takes(&req));
        let (seq, end) = {
            let mut shared = self.shared.lock();
            if shared.state != State::Open {
                drop(shared);
                return Err(SendError::NotSent(req, ExchangeError::Closed));
            }
            let before = shared.link.out.queued();
            shared
                .link
                .out
                .push_head(|head| encode::request_head(head, &req, false));
            shared.queued += (shared.link.out.queued() - before) as u64;
            let seq = shared.next;
            shared.next += 1;
            if seq != shared.head {
                shared.turns.push_back(None);
            }
            (seq, shared.queued)
        };
        // From here on, however the exchange ends (the task cancelled
        // included), its turn ends with it.
        let turn = Turn {
            shared: Arc::clone(&self.shared),
            seq,
            ended: false,
        };
        // The other requests of this round of the worker's tasks join the
        // write: whichever of them comes back first writes them all.
        tokio::task::yield_now().await;
        let mut req = Some(req);
        let mut waiting = false;
        let head = std::future::poll_fn(|cx| {
            let mut shared = self.shared.lock();
            let shared = &mut *shared;
            let written = shared.queued - shared.link.out.queued() as u64;
            match shared.state {
                State::Closed(last) if seq > last => return Poll::Ready(Err(None)),
                State::Broken(from) if seq >= from && written < end => {
                    return Poll::Ready(Err(None));
                }
                State::Broken(from) if seq >= from => {
                    return Poll::Ready(Err(Some(ExchangeError::Closed)));
                }
                _ => {}
            }
            if written < end {
                match shared.link.out.poll_write(&shared.link.stream, cx) {
                    Poll::Ready(Ok(())) => {
                        shared.flushes.drain(..).for_each(Waker::wake);
                    }
                    Poll::Ready(Err(error)) => {
                        // Nothing more can be read either.
                        let written = shared.queued - shared.link.out.queued() as u64;
                        let head = shared.head;
                        shared.break_from(head);
                        return Poll::Ready(Err((written >= end).then_some(error.into())));
                    }
                    Poll::Pending => {
                        if !shared.flushes.iter().any(|w| w.will_wake(cx.waker())) {
                            shared.flushes.push(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            }
            if seq != shared.head {
                let turn = (seq - shared.head - 1) as usize;
                shared.turns[turn] = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if !waiting {
                waiting = true;
                shared.link.patience.start(timeout);
            }
            match shared.link.poll_read_head(cx) {
                Poll::Ready(head) => Poll::Ready(head.map_err(Some)),
                Poll::Pending if shared.link.patience.poll_expired(false, cx) => {
                    Poll::Ready(Err(Some(ExchangeError::TimedOut)))
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        let mut head = match head {
            Ok(head) => head,
            // Never written, or not processed: the request goes elsewhere.
            Err(None) => {
                let req = req.take().expect("the request is kept until answered");
                return Err(SendError::NotSent(req, ExchangeError::Closed));
            }
            // The response could not be read: nothing after it can be (the
            // turn, dropped, breaks the connection).
            Err(Some(error)) => return Err(SendError::Failed(error)),
        };
        self.shared.lock().link.patience.reset();
        let head_only = req.take().is_some_and(|req| req.method() == Method::HEAD);
        let (decoder, reusable) =
            super::body_decoder(&mut head, head_only).map_err(SendError::Failed)?;
        Ok(head.map(|()| UpstreamBody::in_turn(turn, decoder, reusable)))
    }
}

impl Shared {
    /// Breaks the connection from the exchange `from` on: every exchange
    /// waiting is woken, those from `from` on to fail.
    fn break_from(&mut self, from: u64) {
        self.state = match self.state {
            State::Open => State::Broken(from),
            State::Closed(last) if from <= last => State::Broken(from),
            State::Broken(before) => State::Broken(before.min(from)),
            closed => closed,
        };
        self.wake_all();
    }

    fn wake_all(&mut self) {
        self.turns
            .iter_mut()
            .filter_map(Option::take)
            .for_each(Waker::wake);
        self.flushes.drain(..).for_each(Waker::wake);
    }
}

/// An exchange's turn to read its response from a [`Pipeline`]: it holds
/// the connection's reading side until it ends, and gives it to the next
/// exchange then (or, if it ends without its response read to the end,
/// breaks the connection).
#[derive(Debug)]
pub(super) struct Turn {
    shared: Arc<Mutex<Shared>>,
    seq: u64,
    /// Whether the turn ended (see [`Turn::end`]).
    ended: bool,
}

impl Turn {
    /// The connection, to read the response from.
    pub(super) fn link(&self) -> parking_lot::MappedMutexGuard<'_, Link> {
        parking_lot::MutexGuard::map(self.shared.lock(), |shared| &mut shared.link)
    }

    /// The response was read to its end: the next exchange reads its own.
    /// If the response closed the connection (`reusable` false), the
    /// upstream processes none of the requests after this one.
    pub(super) fn end(mut self, reusable: bool) {
        self.ended = true;
        let mut shared = self.shared.lock();
        if !reusable && shared.state == State::Open {
            shared.state = State::Closed(self.seq);
        }
        shared.head += 1;
        if let Some(next) = shared.turns.pop_front().flatten() {
            next.wake();
        }
        if shared.state != State::Open {
            shared.wake_all();
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Ended with its response not read to the end (or not read at
        // all): what comes next on the connection cannot be told from it.
        let mut shared = self.shared.lock();
        shared.break_from(self.seq);
    }
}

#[cfg(test)]
mod tests;
