//! `orders`: the order service.

use std::process::ExitCode;

fn main() -> ExitCode {
    orders::cli::main(std::env::args_os())
}
