//! The `node` command line: serve a ticket node, or inspect and reset a
//! sale in Redis. The binary is this module's [`main`]; `spike` runs it too.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use spike_config::NodeConfig;
use spike_config::logging::{self, RequestLog};
use spike_config::redis::{self as target, RedisTarget};
use spike_config::server::ServerSettings;
use spike_http1::task;
use tokio::net::TcpListener;

use crate::store::Store;

/// A ticket node of the spike flash sale: sells from a local stock first and
/// the global stock in Redis second.
#[derive(Debug, Parser)]
#[command(name = "node", version)]
struct Cli {
    /// The node's TOML file; without it, every setting has its default.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    redis: RedisFlags,
    /// Replicas every change must reach before it is answered, overriding
    /// `replica_acks`.
    #[arg(long, value_name = "N")]
    replica_acks: Option<u32>,
    /// The sale, overriding `event`.
    #[arg(long, global = true)]
    event: Option<String>,
    /// Address to serve on, overriding `listen`.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Tickets this node may sell, overriding `local_stock`.
    #[arg(long, value_name = "N")]
    local_stock: Option<u64>,
    /// The node's name in orders and logs, overriding `name`.
    #[arg(long)]
    name: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the sale over: nothing sold, no buyers, no orders.
    Reset {
        /// Tickets in the new sale (default: the config's total_stock).
        #[arg(long, value_name = "N")]
        total: Option<u64>,
        /// When the new sale opens, RFC 3339 (default: the config's
        /// opens_at, or at once).
        #[arg(long, value_name = "TIME", value_parser = parse_instant)]
        opens_at: Option<SystemTime>,
    },
    /// Print the sale's state as JSON.
    Status,
}

/// The flags that name the sale's Redis, overriding the file's
/// (`redis_url`, `redis_sentinels` and `redis_master`, `redis_cluster`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RedisFlags {
    /// One Redis, by URL.
    #[arg(long, global = true, value_name = "URL")]
    redis: Option<String>,
    /// Sentinels (HOST:PORT,...) that name the master, with --redis-master.
    #[arg(
        long,
        global = true,
        value_name = "LIST",
        value_delimiter = ',',
        conflicts_with = "redis"
    )]
    redis_sentinels: Option<Vec<String>>,
    /// The name the sentinels know the master by.
    #[arg(long, global = true, value_name = "NAME")]
    redis_master: Option<String>,
    /// Nodes of a Redis Cluster (HOST:PORT,...).
    #[arg(
        long,
        global = true,
        value_name = "LIST",
        value_delimiter = ',',
        conflicts_with_all = ["redis", "redis_sentinels"]
    )]
    redis_cluster: Option<Vec<String>>,
}

impl RedisFlags {
    /// Replaces `target` with the Redis the flags name, if they name one.
    pub fn apply(self, target: &mut RedisTarget) -> anyhow::Result<()> {
        match (
            self.redis,
            self.redis_sentinels,
            self.redis_master,
            self.redis_cluster,
        ) {
            (Some(url), None, None, None) => {
                *target = flag("--redis", target::url_target(url))?;
            }
            (None, Some(sentinels), Some(master), None) => {
                *target = RedisTarget::Sentinel {
                    sentinels: target::address_list("--redis-sentinels", sentinels)
                        .map_err(anyhow::Error::msg)?,
                    master,
                };
            }
            (None, None, None, Some(nodes)) => {
                *target = RedisTarget::Cluster(
                    target::address_list("--redis-cluster", nodes).map_err(anyhow::Error::msg)?,
                );
            }
            (None, None, None, None) => {}
            (_, Some(_), None, _) | (_, None, Some(_), _) => {
                bail!("--redis-sentinels and --redis-master go together")
            }
            _ => bail!("--redis, --redis-sentinels and --redis-cluster name one Redis each"),
        }
        Ok(())
    }

    /// The flags that name `target`, for a program started with them.
    pub fn naming(target: &RedisTarget) -> Vec<OsString> {
        match target {
            RedisTarget::Single(url) => vec!["--redis".into(), url.into()],
            RedisTarget::Sentinel { sentinels, master } => vec![
                "--redis-sentinels".into(),
                sentinels.join(",").into(),
                "--redis-master".into(),
                master.into(),
            ],
            RedisTarget::Cluster(nodes) => {
                vec!["--redis-cluster".into(), nodes.join(",").into()]
            }
        }
    }
}

/// A flag's value as its check took it, or the check's message named by
/// the flag.
pub fn flag<T>(name: &str, checked: Result<T, String>) -> anyhow::Result<T> {
    checked.map_err(|err| anyhow::anyhow!("{name}: {err}"))
}

/// Runs the `node` command line on `args` (the first is the program's name).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("node: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = match &cli.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    cli.redis.apply(&mut config.redis)?;
    if let Some(acks) = cli.replica_acks {
        config.replica_acks = flag("--replica-acks", target::replica_acks(acks))?;
    }
    if let Some(event) = cli.event {
        config.event =
            spike_config::node::name_like("--event", event).map_err(anyhow::Error::msg)?;
    }
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(local_stock) = cli.local_stock {
        config.local_stock = local_stock;
    }
    if let Some(name) = cli.name {
        config.name =
            Some(spike_config::node::name_like("--name", name).map_err(anyhow::Error::msg)?);
    }
    // Before the runtime starts its threads, which take the policy of the
    // thread that starts them.
    let batch = (cli.command.is_none() && config.sched_batch).then(sched_batch);
    let runtime = runtime(&config.server).context("cannot start the runtime")?;
    match cli.command {
        None => runtime.block_on(serve(config, batch)),
        Some(Command::Status) => runtime.block_on(status(&config)),
        Some(Command::Reset { total, opens_at }) => runtime.block_on(reset(
            &config,
            total.unwrap_or(config.total_stock),
            opens_at.or(config.opens_at),
        )),
    }
}

/// Serves the node; `batch` is how putting it under `SCHED_BATCH` went, if
/// it was asked for.
async fn serve(config: NodeConfig, batch: Option<std::io::Result<()>>) -> anyhow::Result<()> {
    let stat_log = config.stat_log.clone().map(|path| RequestLog {
        target: "stat",
        path,
    });
    let _log = logging::init("stat", stat_log.as_ref()).context("cannot open the stat log")?;
    if let Some(Err(err)) = batch {
        tracing::warn!(%err, "cannot run under SCHED_BATCH: keeping the policy the node started with");
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    // The one line on standard output: tools that start the node on port 0
    // read the address from it.
    println!("listening on {}", listener.local_addr()?);

    let shutdown = task::shutdown_on_signal().context("cannot handle signals")?;
    crate::run(listener, &config, shutdown).await?;
    Ok(())
}

/// Puts this thread, and the threads it starts from now on, under Linux's
/// `SCHED_BATCH` policy (`sched_batch`). The scheduler then no longer lets a
/// node woken by a request preempt what runs on the core: the node waits
/// for its turn and answers what arrived meanwhile in one go. Where the
/// node shares its cores with the balancer, Redis and other nodes (`spike
/// up`), a request no longer costs a context switch of the node and one of
/// whatever it preempted.
fn sched_batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // Pid 0: the calling thread.
    // SAFETY: `&param` points to an initialized `sched_param`, which the
    // kernel only copies during the call.
    #[allow(unsafe_code)]
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The multi-threaded runtime the `[server]` settings ask for.
fn runtime(settings: &ServerSettings) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = settings.workers {
        builder.worker_threads(workers);
    }
    builder.enable_all().build()
}

fn store(config: &NodeConfig) -> anyhow::Result<Store> {
    Store::with_replica_acks(
        &config.redis,
        &config.event,
        config.redis_timeout,
        config.replica_acks,
    )
    .with_context(|| format!("invalid setting of the {}", config.redis))
}

/// What `node status` prints.
#[derive(Debug, serde::Serialize)]
struct Status<'a> {
    event: &'a str,
    total: u64,
    /// Tickets held by live orders, pending or paid.
    sold: u64,
    remaining: u64,
    pending: u64,
    paid: u64,
    /// Orders expired unpaid, their tickets returned to the sale.
    expired: u64,
    /// Returned tickets sold again.
    resold: u64,
    /// Orders created.
    orders: u64,
    /// Changes of orders in the order stream.
    events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    opens_at: Option<String>,
}

async fn status(config: &NodeConfig) -> anyhow::Result<()> {
    let state = store(config)?
        .state()
        .await
        .with_context(|| format!("cannot reach the {}", config.redis))?;
    let Some(total) = state.total else {
        bail!(
            "no sale `{}` in the {}: start a node or run `node reset`",
            config.event,
            config.redis
        );
    };
    let status = Status {
        event: &config.event,
        total,
        sold: state.sold,
        remaining: total.saturating_sub(state.sold),
        pending: state.pending(),
        paid: state.paid,
        expired: state.expired,
        resold: state.resold,
        orders: state.orders,
        events: state.events,
        opens_at: state.opens_at.map(|at| {
            jiff::Timestamp::from_millisecond(at as i64)
                .map_or_else(|_| at.to_string(), |time| time.to_string())
        }),
    };
    println!("{}", serde_json::to_string(&status)?);
    Ok(())
}

async fn reset(
    config: &NodeConfig,
    total: u64,
    opens_at: Option<SystemTime>,
) -> anyhow::Result<()> {
    if total == 0 {
        bail!("--total must be at least 1");
    }
    let state = store(config)?
        .reset(total, opens_at.map(crate::server::millis_since_epoch))
        .await
        .with_context(|| format!("cannot reach the {}", config.redis))?;
    eprintln!(
        "sale `{}` started over with {total} tickets (epoch {})",
        config.event, state.epoch
    );
    Ok(())
}

fn parse_instant(text: &str) -> Result<SystemTime, String> {
    spike_config::source::instant(text)
}
