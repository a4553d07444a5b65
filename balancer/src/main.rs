//! `balancer`: the spike load balancer.

use std::process::ExitCode;

fn main() -> ExitCode {
    balancer::cli::main(std::env::args_os())
}
