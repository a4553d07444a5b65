//! Reading and writing a TCP socket through a shared reference, so that a
//! connection and the request body reading from it can both hold it: the
//! readiness of tokio's reactor, then the system call, again while the
//! socket turns out not to be ready after all.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
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
        let read = stream.try_io(Interest::READABLE, || match stream.try_read_buf(buf) {
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

/// Data on its way out: a message's head, then its body's pieces (chunk
/// size lines, data, CRLFs) as they came, written together with one
/// `writev` where the socket takes them (no copy of a body).
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    queue: VecDeque<Bytes>,
    /// The bytes queued.
    queued: usize,
}

/// The most pieces one `writev` takes.
const MAX_SLICES: usize = 16;

impl Outgoing {
    pub fn push(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.queued += bytes.len();
            self.queue.push_back(bytes);
        }
    }

    /// Takes the first piece queued, as a test reads what would be sent.
    #[cfg(test)]
    pub fn pop(&mut self) -> Option<Bytes> {
        let bytes = self.queue.pop_front()?;
        self.queued -= bytes.len();
        Some(bytes)
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The bytes queued.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Writes what is queued to `stream` until all of it went out (`Ok`),
    /// the socket failed, or it has to wait.
    pub fn poll_write(&mut self, stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            let count = self.queue.len().min(MAX_SLICES);
            for (slice, bytes) in slices.iter_mut().zip(&self.queue) {
                *slice = IoSlice::new(bytes);
            }
            let mut written = loop {
                ready!(stream.poll_write_ready(cx))?;
                match stream.try_write_vectored(&slices[..count]) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    written => break written?,
                }
            };
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= written;
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
