//! The `balancer` command line. The binary is this module's [`main`];
//! `spike` runs it too.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use spike_config::logging::{self, RequestLog};
use spike_config::{BalancerConfig, Source};
use spike_http1::task;
use tokio::net::TcpListener;

use crate::{Balancer, workers};

/// An HTTP/1.1 reverse proxy that spreads requests over weighted upstreams
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
    let count = config
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    workers::set_count(count);
    let proxies = workers::bind_reuseport(config.listen, count)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = std::net::TcpListener::bind(config.admin)
        .with_context(|| format!("cannot listen on {}", config.admin))?;
    admin.set_nonblocking(true)?;
    let (listen, admin_addr) = (proxies[0].local_addr()?, admin.local_addr()?);

    // Worker 0 is this thread; it also runs the admin listener, the health
    // checks and the watch on the file.
    let runtime = workers::runtime().context("cannot start the runtime")?;
    runtime.block_on(async {
        let shutdown = task::shutdown_on_signal().context("cannot handle signals")?;
        let upstreams = config.upstreams.len();
        let balancer = Arc::new(
            Balancer::new(&source, config, shutdown)
                .with_context(|| format!("cannot watch {}", source.path().display()))?,
        );
        // Tools that start the balancer on port 0 read the addresses here.
        println!("proxy listening on {listen}");
        println!("admin listening on {admin_addr}");
        tracing::info!(upstreams, %listen, admin = %admin_addr, workers = count, "balancing");

        let mut proxies = proxies.into_iter();
        let first = proxies.next().context("no listener for the first worker")?;
        let first = TcpListener::from_std(first)?;
        let others = proxies
            .enumerate()
            .map(|(i, listener)| {
                let balancer = Arc::clone(&balancer);
                std::thread::Builder::new()
                    .name(format!("worker-{}", i + 1))
                    .spawn(move || -> std::io::Result<()> {
                        workers::enter(i + 1);
                        workers::runtime()?.block_on(async {
                            balancer.serve_proxy(TcpListener::from_std(listener)?).await;
                            Ok(())
                        })
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        tokio::join!(
            balancer.serve_proxy(first),
            balancer.serve_admin(TcpListener::from_std(admin)?)
        );
        for worker in others {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        Ok(())
    })
}
