//! `spike`: the whole flash sale in one command.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spike::load::LoadOptions;
use spike::plan::Plan;
use spike::status::Observer;
use spike::up::UpOptions;
use std::io::IsTerminal;

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
        /// Where the order service's SQLite database goes (unless
        /// orders.toml names another database).
        #[arg(long, value_name = "DIR", default_value = "data")]
        data_dir: PathBuf,
        /// When a sale created or started over opens, RFC 3339 (default:
        /// node.toml's opens_at, or at once).
        #[arg(long, value_name = "TIME", value_parser = parse_instant)]
        opens_at: Option<SystemTime>,
        /// Run the sale on a local Redis Sentinel setup that spike starts
        /// and stops (a master, two replicas, three sentinels; their files
        /// in the data dir), with replica_acks at least 1: kill the master
        /// mid-sale and the sale goes on.
        #[arg(long)]
        sentinel: bool,
    },
    /// Print the sale's summary: tickets, orders, requests per node.
    Status,
    /// Send named buyers who buy a ticket, and some of whom pay for it;
    /// report what they were told.
    Load(LoadArgs),
    /// Start the sale over: nothing sold, no buyers, no orders.
    Reset {
        /// Tickets in the new sale (default: total_stock of node.toml).
        #[arg(long, value_name = "N")]
        total: Option<u64>,
        /// When the new sale opens, RFC 3339 (default: node.toml's
        /// opens_at, or at once).
        #[arg(long, value_name = "TIME", value_parser = parse_instant)]
        opens_at: Option<SystemTime>,
    },
}

/// `spike load`'s flags.
#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The balancer (or a node) to buy from.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    url: http::Uri,
    /// How many buyers, each buying once.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    buyers: u64,
    /// Clients at once, each with its own keep-alive connection.
    #[arg(long, value_name = "N", default_value_t = 100)]
    concurrency: usize,
    /// The share of buyers with a new order who pay for it, from 0 to 1.
    #[arg(long, value_name = "P", default_value_t = 0.7, value_parser = share)]
    pay: f64,
    /// How long after buying a buyer pays.
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = duration)]
    pay_after: std::time::Duration,
    /// Buyers are PREFIX-0, PREFIX-1... (default: load-SECONDS, new each run).
    #[arg(long, value_parser = buyer_prefix)]
    prefix: Option<String>,
    /// Threads sending the load (like ab, one by default).
    #[arg(long, value_name = "N", default_value_t = 1)]
    threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
        Some("orders") => {
            spike::supervised_by_parent();
            return orders::cli::main(std::env::args_os().skip(1));
        }
        // `spike exec PROGRAM ARGS...`: another program (redis-server),
        // made to stop with spike as the others, then run in this process.
        Some("exec") => {
            spike::supervised_by_parent();
            let mut args = std::env::args_os().skip(2);
            let Some(program) = args.next() else {
                eprintln!("spike exec: no program");
                return ExitCode::FAILURE;
            };
            let err = std::os::unix::process::CommandExt::exec(
                std::process::Command::new(&program).args(args),
            );
            eprintln!(
                "spike exec: cannot run {}: {err}",
                program.to_string_lossy()
            );
            return ExitCode::FAILURE;
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
    let runtime = match &cli.command {
        Command::Load(args) if args.threads > 1 => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .context("cannot start the runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Up {
                reset,
                total,
                restart_nodes,
                log_dir,
                data_dir,
                opens_at,
                sentinel,
            } => {
                let shutdown =
                    spike_http1::task::shutdown_on_signal().context("cannot handle signals")?;
                let options = UpOptions {
                    config_dir: cli.config_dir,
                    log_dir,
                    data_dir,
                    reset,
                    total,
                    restart_nodes,
                    opens_at,
                    sentinel,
                };
                spike::up::up(options, shutdown).await
            }
            Command::Status => {
                let plan = Plan::read(&cli.config_dir, None)?;
                let snapshot = Observer::new(&plan)?.look().await;
                print!("{}", snapshot.summary());
                if snapshot.sale.is_none() {
                    anyhow::bail!("no sale `{}` in the {}", plan.node.event, plan.node.redis);
                }
                Ok(())
            }
            Command::Load(args) => load(args).await,
            Command::Reset { total, opens_at } => {
                let plan = Plan::read(&cli.config_dir, total)?;
                let opens_at = opens_at
                    .or(plan.node.opens_at)
                    .map(node::server::millis_since_epoch);
                Observer::new(&plan)?
                    .store()
                    .reset(plan.total, opens_at)
                    .await
                    .with_context(|| format!("cannot reach the {}", plan.node.redis))?;
                println!(
                    "sale `{}` started over with {} tickets",
                    plan.node.event, plan.total
                );
                Ok(())
            }
        }
    })
}

fn parse_instant(text: &str) -> Result<SystemTime, String> {
    spike_config::source::instant(text)
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let prefix = args.prefix.unwrap_or_else(|| {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
        format!("load-{}", now.map_or(0, |since| since.as_secs()))
    });
    let options = LoadOptions {
        url: args.url,
        buyers: args.buyers,
        concurrency: args.concurrency,
        pay: args.pay,
        pay_after: args.pay_after,
        prefix,
        progress: std::io::stderr().is_terminal() && !args.json,
    };
    let report = spike::load::run(options).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(())
}

fn share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("`{text}` is not a share from 0 to 1")),
    }
}

fn duration(text: &str) -> Result<std::time::Duration, String> {
    spike_config::source::duration_or_zero(text.to_owned())
}

/// A prefix that makes buyer ids a node accepts: up to 100 characters of
/// those a buyer id may hold, leaving room for `-` and the buyer's number.
fn buyer_prefix(text: &str) -> Result<String, String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-@:".contains(c);
    if !text.is_empty() && text.len() <= 100 && text.chars().all(allowed) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "`{text}` must be 1 to 100 characters of letters, digits and . _ - @ :"
        ))
    }
}
