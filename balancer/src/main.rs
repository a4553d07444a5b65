//! `balancer`: the spike load balancer.

use std::process::ExitCode;

/// jemalloc, with its background thread: memory freed after a burst (the
/// buffers of thousands of connections that then go idle) goes back to
/// the system within seconds. glibc's allocator keeps most of it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    balancer::cli::main(std::env::args_os())
}
