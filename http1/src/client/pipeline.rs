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
//! - a response after which the upstream closes the connection (it said
//!   `close`, or its body ends with the connection) ends it cleanly: the
//!   upstream processes none of the requests after it (RFC 9112, section
//!   9.6), which are handed back ([`SendError::NotSent`]) to go elsewhere;
//! - any other failure (an error, a timeout, a response framed two ways,
//!   an exchange given up before its response was read) breaks it from
//!   that exchange on: the requests after it that were written may have
//!   reached the upstream, and fail; those not written are handed back,
//!   and never written. The exchanges before it go on to their responses.
//!
//! A response body let go before its end (its client went away) does not
//! break the connection: the next exchange passes over the rest of it, up
//! to [`SKIP_MAX`] bytes, before reading its own response.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body::Body;
use parking_lot::Mutex;

use super::response::UpstreamBody;
use super::{
    ConnectError, Connection, ExchangeError, Link, READ_SIZE, RequestFraming, Reuse, SendError,
};
use crate::decode::Decoder;
use crate::encode;
use crate::io::poll_read;
use crate::message::{Request, Response};

/// The most bytes of a body let go before its end that the next exchange
/// passes over; past them, the connection breaks.
pub const SKIP_MAX: u64 = 1024 * 1024;

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
    /// The exchanges under way, from `head` on: where each one's request
    /// begins among the bytes queued, and its waker while it waits for
    /// its turn.
    waiting: VecDeque<Waiting>,
    /// Exchanges waiting for what is queued to go out, while the socket
    /// is full.
    flushes: Vec<Waker>,
    /// Bytes of requests queued since the connection opened.
    queued: u64,
    /// The rest of a body let go before its end, to pass over before the
    /// next response, and how much more of it may be.
    skip: Option<(Decoder, u64)>,
    state: State,
}

#[derive(Debug)]
struct Waiting {
    start: u64,
    waker: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// The upstream closes the connection after the response to the
    /// exchange with this number, and processes nothing after it.
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
                waiting: VecDeque::new(),
                flushes: Vec::new(),
                queued: 0,
                skip: None,
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
        if !shared.link.is_open() {
            let head = shared.head;
            shared.break_from(head);
            return None;
        }
        Some(true)
    }

    /// Sends `req` (which [`Pipeline::takes`]) behind the requests already
    /// on the connection, and reads its response head once theirs have
    /// come. The upstream may keep the exchange waiting `timeout` once it
    /// is next (to write its request, then for its head), then between two
    /// reads of the body.
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
            let (start, unsent) = (shared.queued, shared.link.out.queued());
            shared
                .link
                .out
                .push_head(|head| encode::request_head(head, &req, false));
            shared.queued += (shared.link.out.queued() - unsent) as u64;
            let seq = shared.next;
            shared.next += 1;
            shared.waiting.push_back(Waiting { start, waker: None });
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
        let mut next = false;
        let head = std::future::poll_fn(|cx| {
            let mut shared = self.shared.lock();
            let shared = &mut *shared;
            let written = shared.written();
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
            let is_next = seq == shared.head;
            if is_next && !next {
                next = true;
                shared.link.patience.start(timeout);
            }
            if written < end {
                match shared.link.out.poll_write(&shared.link.stream, cx) {
                    Poll::Ready(Ok(())) => shared.flushes.drain(..).for_each(Waker::wake),
                    Poll::Ready(Err(error)) => {
                        // Nothing more can be read either.
                        let written = shared.written();
                        let head = shared.head;
                        shared.break_from(head);
                        return Poll::Ready(Err((written >= end).then_some(error.into())));
                    }
                    Poll::Pending => {
                        if !shared.flushes.iter().any(|w| w.will_wake(cx.waker())) {
                            shared.flushes.push(cx.waker().clone());
                        }
                        if is_next && shared.link.patience.poll_expired(false, cx) {
                            return Poll::Ready(Err(Some(ExchangeError::TimedOut)));
                        }
                        return Poll::Pending;
                    }
                }
            }
            if !is_next {
                let at = (seq - shared.head) as usize;
                shared.waiting[at].waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let read = match shared.poll_skip(cx) {
                Poll::Ready(Ok(())) => shared.link.poll_read_head(cx),
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                Poll::Pending => Poll::Pending,
            };
            match read {
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
        let (decoder, reuse) =
            super::body_decoder(&mut head, head_only).map_err(SendError::Failed)?;
        Ok(head.map(|()| UpstreamBody::in_turn(turn, decoder, reuse)))
    }
}

impl Shared {
    /// The bytes of requests written so far.
    fn written(&self) -> u64 {
        self.queued - self.link.out.queued() as u64
    }

    /// Of the bytes queued from `start` on, those not written yet.
    fn unsent(&self, start: u64) -> usize {
        (start - self.written()) as usize
    }

    /// Passes over the rest of a body let go before its end, if there is
    /// one, before the next response is read.
    fn poll_skip(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ExchangeError>> {
        while let Some((decoder, left)) = self.skip.as_mut() {
            match decoder.decode(&mut self.link.read)? {
                Some(frame) => {
                    let n = frame.data_ref().map_or(0, |data| data.len() as u64);
                    *left = left.checked_sub(n).ok_or(ExchangeError::Closed)?;
                    continue;
                }
                None if decoder.is_done() => {
                    self.skip = None;
                    continue;
                }
                None => {}
            }
            if ready!(poll_read(
                &self.link.stream,
                &mut self.link.read,
                READ_SIZE,
                cx
            ))? == 0
            {
                return Poll::Ready(Err(ExchangeError::Closed));
            }
            self.link.patience.reset();
        }
        Poll::Ready(Ok(()))
    }

    /// Breaks the connection from the exchange `from` on: what of their
    /// requests is not written never will be, and every exchange waiting
    /// is woken, those from `from` on to fail.
    fn break_from(&mut self, from: u64) {
        self.state = match self.state {
            State::Open => State::Broken(from),
            State::Closed(last) if from <= last => State::Broken(from),
            State::Broken(before) => State::Broken(before.min(from)),
            closed => closed,
        };
        self.drop_unsent_from(from);
        self.wake_all();
    }

    /// The upstream closes the connection after the response to `last`:
    /// the exchanges after it are handed back, and their requests not
    /// written never will be.
    fn closed_after(&mut self, last: u64) {
        self.state = match self.state {
            State::Open => State::Closed(last),
            State::Broken(from) if from > last => State::Closed(last),
            state => state,
        };
        self.drop_unsent_from(last + 1);
        self.wake_all();
    }

    /// Drops the bytes not written yet of the requests of the exchanges
    /// from `from` on.
    fn drop_unsent_from(&mut self, from: u64) {
        let Some(waiting) = from
            .checked_sub(self.head)
            .and_then(|at| self.waiting.get(at as usize))
        else {
            return;
        };
        let start = waiting.start.max(self.written());
        let keep = self.unsent(start);
        self.link.out.keep(keep);
        self.queued = start;
    }

    fn wake_all(&mut self) {
        self.waiting
            .iter_mut()
            .filter_map(|waiting| waiting.waker.take())
            .for_each(Waker::wake);
        self.flushes.drain(..).for_each(Waker::wake);
    }

    /// The exchange at the head has ended: the next one's turn.
    fn advance(&mut self) {
        self.head += 1;
        self.waiting.pop_front();
        if let Some(next) = self.waiting.front_mut().and_then(|w| w.waker.take()) {
            next.wake();
        }
    }
}

/// An exchange's turn to read its response from a [`Pipeline`]: it holds
/// the connection's reading side until it ends, and gives it to the next
/// exchange then (or, if it ends without its response read, breaks the
/// connection).
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

    /// The response was read to its end: the next exchange reads its own,
    /// if the connection goes on (`reuse`).
    pub(super) fn end(mut self, reuse: Reuse) {
        self.ended = true;
        let mut shared = self.shared.lock();
        shared.advance();
        match reuse {
            // Bytes beyond a response after which the upstream closes
            // are an upstream not to be trusted.
            Reuse::Closes if shared.link.read.is_empty() => shared.closed_after(self.seq),
            Reuse::Yes => {}
            Reuse::Closes | Reuse::No => shared.break_from(self.seq + 1),
        }
    }

    /// The body was let go before its end, `rest` of it unread: on a
    /// connection that goes on, the next exchange passes over it first.
    pub(super) fn abandon(mut self, rest: Decoder, reuse: Reuse) {
        self.ended = true;
        let mut shared = self.shared.lock();
        shared.advance();
        match reuse {
            Reuse::Yes => shared.skip = Some((rest, SKIP_MAX)),
            Reuse::Closes => shared.closed_after(self.seq),
            Reuse::No => shared.break_from(self.seq + 1),
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Ended with its response not read (or not all of it): what comes
        // next on the connection cannot be told from it.
        self.shared.lock().break_from(self.seq);
    }
}

#[cfg(test)]
mod tests;
