//! The `orders` command line: run the order service. The binary is this
//! module's [`main`]; `spike orders` runs it too.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use node::cli::flag;
use spike_config::OrdersConfig;
use spike_config::logging;
use spike_config::server::ServerSettings;
use spike_http1::server::{Rejections, Server};
use spike_http1::task;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::service::Service;

/// The order service of the spike flash sale: the order stream, read
/// through a Redis consumer group, written into SQLite or PostgreSQL,
/// every event exactly once.
#[derive(Debug, Parser)]
#[command(name = "orders", version)]
struct Cli {
    /// The service's TOML file; without it, every setting has its default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    redis: node::cli::RedisFlags,
    /// Replicas that must hold the events read before they are written,
    /// overriding `replica_acks`.
    #[arg(long, value_name = "N")]
    replica_acks: Option<u32>,
    /// Database URL, overriding `database_url`.
    #[arg(long, value_name = "URL")]
    database: Option<String>,
    /// The sale, overriding `event`.
    #[arg(long)]
    event: Option<String>,
    /// Admin address, overriding `admin`.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// This service's name in the consumer group, overriding `consumer`.
    #[arg(long)]
    consumer: Option<String>,
}

/// Runs the `orders` command line on `args` (the first is the program's
/// name).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("orders: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = match &cli.config {
        Some(path) => OrdersConfig::load(path)?,
        None => OrdersConfig::default(),
    };
    cli.redis.apply(&mut config.redis)?;
    if let Some(acks) = cli.replica_acks {
        config.replica_acks = flag("--replica-acks", spike_config::redis::replica_acks(acks))?;
    }
    if let Some(url) = cli.database {
        config.database_url = flag("--database", spike_config::orders::database_url(url))?;
    }
    if let Some(event) = cli.event {
        config.event =
            spike_config::node::name_like("--event", event).map_err(anyhow::Error::msg)?;
    }
    if let Some(admin) = cli.admin {
        config.admin = admin;
    }
    if let Some(consumer) = cli.consumer {
        config.consumer = Some(
            spike_config::node::name_like("--consumer", consumer).map_err(anyhow::Error::msg)?,
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: OrdersConfig) -> anyhow::Result<()> {
    let _log = logging::init("access", None).context("cannot set up logging")?;
    let listener = TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin))?;
    let admin_addr = listener.local_addr()?;
    let consumer = config
        .consumer
        .clone()
        .unwrap_or_else(|| default_consumer(admin_addr.port()));
    let service = Arc::new(Service::new(config, &consumer)?);
    // The one line on standard output: tools that start the service on
    // port 0 read the address from it.
    println!("listening on {admin_addr}");
    tracing::info!(
        admin = %admin_addr,
        event = %service.config.event,
        group = %service.config.group,
        consumer = %consumer,
        database = service.database_kind(),
        "writing the order stream to the database"
    );

    let shutdown = task::shutdown_on_signal().context("cannot handle signals")?;
    let consume = task::supervise("consume", shutdown.clone(), {
        let (service, stop) = (Arc::clone(&service), shutdown.clone());
        move || Arc::clone(&service).consume(stop.clone())
    });
    let observe = task::supervise("observe", shutdown.clone(), {
        let (service, stop) = (Arc::clone(&service), shutdown.clone());
        move || Arc::clone(&service).observe(stop.clone())
    });
    let server = Server::new(
        ServerSettings::default(),
        Arc::new(Rejections::default()),
        shutdown,
    );
    let admin = Arc::new(Admin::new(service));
    server.serve(listener, move |_| Arc::clone(&admin)).await;
    let _ = tokio::join!(consume, observe);
    Ok(())
}

/// The host's name and the admin port: the same across restarts of one
/// service, and different for two services on one host.
fn default_consumer(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(50)
        .collect();
    let host = if host.is_empty() {
        "orders".to_owned()
    } else {
        host
    };
    format!("{host}-{port}")
}
