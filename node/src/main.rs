//! `node`: serve a ticket node, or inspect and reset a sale in Redis.

use std::process::ExitCode;

fn main() -> ExitCode {
    node::cli::main(std::env::args_os())
}
