//! The `balancer` command line. The binary is this module's [`main`];
//! `spike` runs it too.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spike_config::logging::{self, RequestLog};
use spike_config::server;
use spike_config::{BalancerConfig, Source};
use tokio::net::TcpListener;

use crate::Balancer;

/// An HTTP/1 reverse proxy that spreads requests over weighted upstreams
/// with nginx's smooth weighted round-robin.
#[derive(Debug, Parser)]
#[command(name = "balancer", version)]
struct Cli {
    /// The balancer's TOML file.
    #[arg(long, value_name = "FILE", default_value = "config/balancer.toml")]
    config: PathBuf,
}

/// Runs the `balancer` command line on `args` (the first is the program's name).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("balancer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let source = Source::read(&cli.config)?;
    let config = BalancerConfig::from_source(&source)?;
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
        let listeners = crate::Listeners {
            proxy: bind(config.listen).await?,
            admin: bind(config.admin).await?,
        };
        let shutdown = server::shutdown_on_signal().context("cannot handle signals")?;
        let upstreams = config.upstreams.len();
        let (listen, admin) = (config.listen, config.admin);
        let balancer = Balancer::new(&source, config, shutdown)
            .with_context(|| format!("cannot watch {}", source.path().display()))?;
        // Tools that start the balancer on port 0 read the addresses here.
        println!("proxy listening on {}", listeners.proxy.local_addr()?);
        println!("admin listening on {}", listeners.admin.local_addr()?);
        tracing::info!(upstreams, %listen, %admin, "balancing");
        balancer.serve(listeners).await;
        Ok(())
    })
}

async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}
