//! Configuration of the spike system: the TOML files of the node and the
//! balancer, the validated types they parse into, and what every binary
//! sets up from them: its logging, and its client-facing HTTP/1 listener
//! ([`server::serve`]).
//!
//! Problems in a file are reported with its path, line and column, all of
//! them at once (see [`source`]).

pub mod balancer;
pub mod health;
pub mod logging;
pub mod node;
pub mod server;
pub mod source;

pub use balancer::BalancerConfig;
pub use node::NodeConfig;
pub use source::{ConfigError, Problem, Source};
