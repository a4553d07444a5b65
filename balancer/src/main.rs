//! `balancer`: the spike load balancer.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spike_config::BalancerConfig;
use spike_config::logging::{self, RequestLog};
use spike_config::server;
use tokio::net::TcpListener;

/// An HTTP/1 reverse proxy that spreads requests over weighted upstreams
/// with nginx's smooth weighted round-robin.
#[derive(Debug, Parser)]
#[command(name = "balancer", version)]
struct Cli {
    /// The balancer's TOML file.
    #[arg(long, value_name = "FILE", default_value = "config/balancer.toml")]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("balancer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = BalancerConfig::load(&cli.config)?;
    let access_log = config.log.access_log.clone().map(|path| RequestLog {
        target: "access",
        path,
    });
    let _log =
        logging::init("access", access_log.as_ref()).context("cannot open the access log")?;
    let runtime = config
        .server
        .runtime()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let listeners = balancer::Listeners {
            proxy: bind(config.listen).await?,
            admin: bind(config.admin).await?,
        };
        // Tools that start the balancer on port 0 read the addresses here.
        println!("proxy listening on {}", listeners.proxy.local_addr()?);
        println!("admin listening on {}", listeners.admin.local_addr()?);
        tracing::info!(
            upstreams = config.upstreams.len(),
            listen = %config.listen,
            admin = %config.admin,
            "balancing"
        );
        let shutdown = server::shutdown_on_signal().context("cannot handle signals")?;
        balancer::run(listeners, &config, shutdown).await;
        Ok(())
    })
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}
