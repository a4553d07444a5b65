//! Configuration of the spike system: the TOML files of the node, the
//! balancer and the order service, and the validated, typed settings they
//! parse into ([`server`] is the `[server]` section of the node and the
//! balancer), plus the logging every binary sets up from them. Nothing here opens a socket or runs a
//! task: the servers that use these settings are in `spike-http1`, the
//! node, the balancer and the order service.
//!
//! Problems in a file are reported with its path, line and column, all of
//! them at once (see [`source`]).

pub mod balancer;
pub mod health;
pub mod logging;
pub mod node;
pub mod orders;
pub mod redis;
pub mod server;
pub mod source;

pub use balancer::BalancerConfig;
pub use node::NodeConfig;
pub use orders::OrdersConfig;
pub use source::{ConfigError, Problem, Source};
