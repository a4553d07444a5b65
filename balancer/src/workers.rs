//! Thread per core, as nginx's worker processes: the proxy listener is
//! served by `workers` threads, each running a single-threaded runtime and
//! accepting on a listening socket of its own bound to the same address
//! (`SO_REUSEPORT`: the kernel spreads new connections over them).
//!
//! A client connection, the upstream connections its requests use, and the
//! tasks that drive them all stay on one thread: no work stealing and no
//! wake-up of another thread on the request path. Under a thousand
//! concurrent clients that costs about a third less CPU per request than a
//! work-stealing runtime with as many threads. What the threads share (the
//! routing table, the upstreams, their pools and health) is behind `Arc`s,
//! atomics and short locks, as before.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use socket2::{Domain, Socket, Type};

thread_local! {
    /// The worker this thread is; 0 for every thread that is not a worker.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// How many workers serve the proxy.
static COUNT: AtomicUsize = AtomicUsize::new(1);

/// The number of workers (1 until [`set_count`]).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// The worker this thread is.
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// Fixes the number of workers, before any upstream is created.
pub fn set_count(workers: usize) {
    COUNT.store(workers.max(1), Ordering::Relaxed);
}

/// Marks this thread as worker `index`.
pub fn enter(index: usize) {
    INDEX.with(|cell| cell.set(index));
}

/// `count` listening sockets on `addr`, all with `SO_REUSEPORT`. If `addr`
/// has port 0, the first socket's port is used for the others.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// A single-threaded runtime, for one worker.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuseport_listeners_share_one_port() {
        let listeners = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<_> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0));
    }

    #[test]
    fn each_thread_knows_its_worker() {
        enter(2);
        assert_eq!(index(), 2);
        std::thread::spawn(|| assert_eq!(index(), 0))
            .join()
            .unwrap();
    }
}
