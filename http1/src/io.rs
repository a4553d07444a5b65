//! Reading and writing a TCP socket through a shared reference, so that a
//! connection and the request body reading from it can both hold it: the
//! readiness of tokio's reactor, then the system call, again while the
//! socket turns out not to be ready after all. A write, which nearly always
//! finds room, makes the call first and asks for readiness only when the
//! socket is full.
//!
//! The system calls go to the kernel directly (rustix), not through the C
//! library: its `recv` and `writev` are thread cancellation points, and in
//! a process with more than one thread each call sets and clears the
//! thread's cancellation type with two atomic compare-and-swaps, four
//! calls per proxied request.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Reads what `stream` has into `buf`, making room for about `room` bytes
/// first; `Ok(0)` at the end of the stream.
///
/// A read that leaves room in the buffer has drained the socket (epoll
/// reports it again when more arrives), so the socket's readiness is
/// cleared then, as tokio's own `AsyncRead` does: otherwise the next read
/// on the connection, or the pool's check that an idle connection is still
/// open, would first make a system call only to learn that nothing is
/// there. Clearing goes through `try_io`, which leaves the readiness alone
/// if an event came in since it was read.
pub(crate) fn poll_read(
    stream: &TcpStream,
    buf: &mut BytesMut,
    room: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < room / 4 {
        buf.reserve(room);
    }
    loop {
        ready!(stream.poll_read_ready(cx))?;
        let spare = buf.capacity() - buf.len();
        let mut drained = None;
        let read = stream.try_io(Interest::READABLE, || match recv(stream, buf) {
            Ok(n) if n > 0 && n < spare => {
                drained = Some(n);
                Err(io::ErrorKind::WouldBlock.into())
            }
            read => read,
        });
        match (read, drained) {
            (_, Some(n)) => return Poll::Ready(Ok(n)),
            (Err(err), None) if err.kind() == io::ErrorKind::WouldBlock => {}
            (read, None) => return Poll::Ready(read),
        }
    }
}

/// One `recv` into the spare room of `buf`, which grows by what it read.
fn recv(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let ((read, _), _) = rustix::net::recv(stream, buf.spare_capacity_mut(), RecvFlags::empty())?;
    let n = read.len();
    // SAFETY: `recv` initialized the first `n` bytes of the spare room.
    #[allow(unsafe_code)]
    unsafe {
        buf.advance_mut(n);
    }
    Ok(n)
}

/// Data on its way out: a message's head, then its body's pieces (chunk
/// size lines, data, CRLFs) as they came, written together with one
/// `writev` where the socket takes them (no copy of a body, but of one
/// small enough to join its head, [`JOIN_MAX`]).
///
/// A head is encoded in place, into room that the next head reuses: it is
/// never shared, so writing it takes no reference count.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    /// The head being written, then the room for the next one.
    head: BytesMut,
    /// How much of `head` went out.
    head_sent: usize,
    queue: VecDeque<Bytes>,
    /// The bytes queued, `head` included.
    queued: usize,
}

/// The most pieces one `writev` takes.
const MAX_SLICES: usize = 16;

/// The most bytes of a body copied after its head, rather than written
/// from where they are: a copy this small costs less than the kernel's
/// walk through a second piece.
const JOIN_MAX: usize = 1024;

impl Outgoing {
    /// Queues a head that `encode` writes, in the reused room after what
    /// is there still to go (pipelined messages: one buffer, one `send`),
    /// or, behind a body's pieces, in room of its own.
    pub fn push_head(&mut self, encode: impl FnOnce(&mut BytesMut)) {
        if self.queued == 0 {
            self.head.clear();
            self.head_sent = 0;
        }
        if self.queue.is_empty() {
            let before = self.head.len();
            encode(&mut self.head);
            self.queued += self.head.len() - before;
        } else {
            let mut head = BytesMut::new();
            encode(&mut head);
            self.push(head.freeze());
        }
    }

    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        self.queued += bytes.len();
        if self.queue.is_empty() && self.head_sent < self.head.len() && bytes.len() <= JOIN_MAX {
            // A small body joins its head: one buffer, one `send`.
            self.head.extend_from_slice(&bytes);
        } else {
            self.queue.push_back(bytes);
        }
    }

    /// Takes the first piece queued, as a test reads what would be sent.
    #[cfg(test)]
    pub fn pop(&mut self) -> Option<Bytes> {
        if self.head_sent < self.head.len() {
            let head = Bytes::copy_from_slice(&self.head[self.head_sent..]);
            self.queued -= head.len();
            self.head_sent = self.head.len();
            return Some(head);
        }
        let bytes = self.queue.pop_front()?;
        self.queued -= bytes.len();
        Some(bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Drops what is queued beyond its first `n` bytes: messages that must
    /// not go out after all (a pipeline's requests behind a break).
    pub fn keep(&mut self, n: usize) {
        if n >= self.queued {
            return;
        }
        let in_head = self.head.len() - self.head_sent;
        if n <= in_head {
            self.head.truncate(self.head_sent + n);
            self.queue.clear();
        } else {
            let mut left = n - in_head;
            let mut pieces = 0;
            for piece in &mut self.queue {
                if left == 0 {
                    break;
                }
                piece.truncate(left);
                left -= piece.len();
                pieces += 1;
            }
            self.queue.truncate(pieces);
        }
        self.queued = n;
    }

    /// The bytes queued.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Writes what is queued to `stream` until all of it went out (`Ok`),
    /// the socket failed, or it has to wait.
    pub fn poll_write(&mut self, stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.queued > 0 {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let head = &self.head[self.head_sent..];
            let mut count = 0;
            if !head.is_empty() {
                slices[0] = IoSlice::new(head);
                count = 1;
            }
            for (slice, bytes) in slices[count..].iter_mut().zip(&self.queue) {
                *slice = IoSlice::new(bytes);
                count += 1;
            }
            let send = || match &slices[..count] {
                // One piece goes out with `send`, which skips the file layer
                // `writev` goes through.
                [one] => rustix::net::send(stream, one, SendFlags::NOSIGNAL),
                slices => rustix::io::writev(stream, slices),
            };
            // A socket nearly always has room: the call is made first, and
            // tokio's record of the socket's readiness is consulted only
            // once the socket is found full (then `try_io` calls again and
            // clears the readiness, so that the task waits for the next
            // event).
            let mut written = match send() {
                Err(Errno::AGAIN | Errno::INTR) => loop {
                    ready!(stream.poll_write_ready(cx))?;
                    match stream.try_io(Interest::WRITABLE, || Ok(send()?)) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        written => break written?,
                    }
                },
                written => written?,
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= written;
            let of_head = written.min(head.len());
            self.head_sent += of_head;
            written -= of_head;
            while let Some(front) = self.queue.front_mut() {
                if written < front.len() {
                    front.advance(written);
                    break;
                }
                written -= front.len();
                self.queue.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `out` would send, piece by piece.
    fn pieces(out: &mut Outgoing) -> Vec<String> {
        std::iter::from_fn(|| out.pop())
            .map(|bytes| String::from_utf8(bytes.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn heads_queued_together_go_out_as_one_piece() {
        let mut out = Outgoing::default();
        out.push_head(|head| head.extend_from_slice(b"GET /1\r\n\r\n"));
        out.push(Bytes::from_static(b"body"));
        out.push_head(|head| head.extend_from_slice(b"GET /2\r\n\r\n"));
        assert_eq!(out.queued(), 24);
        assert_eq!(pieces(&mut out), ["GET /1\r\n\r\nbodyGET /2\r\n\r\n"]);
        assert!(out.is_empty());
    }

    #[test]
    fn what_is_kept_is_the_start_of_what_was_queued() {
        let large = "x".repeat(JOIN_MAX + 1);
        let queue = |out: &mut Outgoing| {
            out.push_head(|head| head.extend_from_slice(b"HEAD"));
            out.push(Bytes::from(large.clone()));
            out.push(Bytes::from_static(b"tail"));
        };
        for (n, expected) in [
            (0, vec![]),
            (2, vec!["HE".to_owned()]),
            (4, vec!["HEAD".to_owned()]),
            (6, vec!["HEAD".to_owned(), "xx".to_owned()]),
            (
                4 + large.len() + 2,
                vec!["HEAD".to_owned(), large.clone(), "ta".to_owned()],
            ),
            (
                100_000,
                vec!["HEAD".to_owned(), large.clone(), "tail".to_owned()],
            ),
        ] {
            let mut out = Outgoing::default();
            queue(&mut out);
            out.keep(n);
            assert_eq!(out.queued(), n.min(8 + large.len()), "keeping {n}");
            assert_eq!(pieces(&mut out), expected, "keeping {n}");
        }
    }
}
