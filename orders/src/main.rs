//! `orders`: the order service.

use std::process::ExitCode;

/// jemalloc: decoding Redis replies and binding rows allocate many small
/// values per event, which glibc's allocator serves more slowly.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    orders::cli::main(std::env::args_os())
}
