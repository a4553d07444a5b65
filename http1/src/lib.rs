//! HTTP/1.1 for the spike system, both ways: the server that faces the
//! clients of the node and of the balancer, and the client the balancer
//! speaks to its upstreams with.
//!
//! Both directions read and write the wire with the same pieces:
//!
//! - [`framing`]: where a message's body ends and whether its connection
//!   stays open (RFC 9112, 6 and 9.3), one rule set for requests and
//!   responses;
//! - [`fields`]: a message's header fields, kept where they were read;
//! - [`message`]: requests and responses, heads and bodies;
//! - [`decode`]: heads parsed into messages, bodies decoded by their
//!   framing;
//! - [`encode`]: heads written, bodies framed on their way out;
//! - [`reply`]: every reply the software makes up itself, with one JSON
//!   error shape;
//! - [`server`]: the client-facing server: accepting, one task per
//!   connection, the per-request checks, request bodies, parking idle
//!   connections, refusals and their counts;
//! - [`client`]: one connection to an upstream and its exchanges;
//! - [`task`]: the shutdown signal, and background tasks that cannot die
//!   silently.

pub mod client;
pub mod decode;
pub mod encode;
pub mod fields;
pub mod framing;
mod io;
pub mod message;
pub mod reply;
pub mod server;
pub mod task;
#[cfg(test)]
mod testing;
mod timer;
