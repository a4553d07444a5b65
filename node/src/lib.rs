//! A ticket node of the spike flash sale.
//!
//! A purchase is two deductions: first from the node's local stock (an
//! atomic counter, [`stock`]), then from the global stock in Redis (one Lua
//! script, [`store`]). A node never sells more than its local stock, and the
//! cluster never sells more than the global total, because Redis alone
//! decides whether a ticket is sold. [`sale`] ties the two together,
//! [`http`] answers requests and [`server`] runs the listener.

pub mod cli;
pub mod commit;
pub mod http;
pub mod link;
pub mod sale;
pub mod server;
pub mod stock;
pub mod store;

pub use server::run;
