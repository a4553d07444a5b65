//! `spike`: the whole flash sale in one command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spike::plan::Plan;
use spike::status::Observer;
use spike::up::UpOptions;

/// The balancer's allocator, since this executable also runs the balancer
/// (see `balancer/src/main.rs`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The ticket flash sale in one command: Redis, one node per upstream of
/// the balancer, and the balancer, started, watched and stopped together.
#[derive(Debug, Parser)]
#[command(name = "spike", version)]
struct Cli {
    /// The directory holding balancer.toml and node.toml.
    #[arg(long, global = true, value_name = "DIR", default_value = "config")]
    config_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start Redis (if none answers), the nodes and the balancer; show the
    /// sale live; stop everything on Ctrl-C or SIGTERM.
    Up {
        /// Start the sale over instead of joining a running one.
        #[arg(long)]
        reset: bool,
        /// Tickets in a new sale (default: total_stock of node.toml).
        #[arg(long, value_name = "N")]
        total: Option<u64>,
        /// Restart a node that dies.
        #[arg(long)]
        restart_nodes: bool,
        /// Where the processes' logs go.
        #[arg(long, value_name = "DIR", default_value = "log")]
        log_dir: PathBuf,
    },
    /// Print the sale's summary: tickets, orders, requests per node.
    Status,
    /// Start the sale over: nothing sold, no buyers, no orders.
    Reset {
        /// Tickets in the new sale (default: total_stock of node.toml).
        #[arg(long, value_name = "N")]
        total: Option<u64>,
    },
}

fn main() -> ExitCode {
    // `spike node ...` and `spike balancer ...` are how `spike up` starts
    // its children: the same command lines as the `node` and `balancer`
    // binaries, so that one executable runs the whole sale.
    match std::env::args_os()
        .nth(1)
        .as_deref()
        .and_then(|a| a.to_str())
    {
        Some("node") => {
            spike::supervised_by_parent();
            return node::cli::main(std::env::args_os().skip(1));
        }
        Some("balancer") => {
            spike::supervised_by_parent();
            return balancer::cli::main(std::env::args_os().skip(1));
        }
        _ => {}
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("spike: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Up {
                reset,
                total,
                restart_nodes,
                log_dir,
            } => {
                let shutdown =
                    spike_http1::task::shutdown_on_signal().context("cannot handle signals")?;
                let options = UpOptions {
                    config_dir: cli.config_dir,
                    log_dir,
                    reset,
                    total,
                    restart_nodes,
                };
                spike::up::up(options, shutdown).await
            }
            Command::Status => {
                let plan = Plan::read(&cli.config_dir, None)?;
                let snapshot = Observer::new(&plan)?.look().await;
                print!("{}", snapshot.summary());
                if snapshot.sale.is_none() {
                    anyhow::bail!("no sale `{}` at {}", plan.node.event, plan.node.redis_url);
                }
                Ok(())
            }
            Command::Reset { total } => {
                let plan = Plan::read(&cli.config_dir, total)?;
                Observer::new(&plan)?
                    .store()
                    .reset(plan.total)
                    .await
                    .with_context(|| format!("cannot reach Redis at {}", plan.node.redis_url))?;
                println!(
                    "sale `{}` started over with {} tickets",
                    plan.node.event, plan.total
                );
                Ok(())
            }
        }
    })
}
