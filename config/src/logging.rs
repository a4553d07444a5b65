//! The `tracing` subscriber shared by the binaries.
//!
//! Operational messages go to standard error, filtered by `RUST_LOG`
//! (default `info`). A binary may also send one target of per-request lines
//! (the node's `stat`, the balancer's `access`) to a file. That file is written
//! by a background thread through `tracing_appender::non_blocking`, so a
//! request never waits on the disk; when the disk cannot keep up, lines are
//! dropped rather than requests slowed.

use std::io::{self, IsTerminal};
use std::path::PathBuf;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, fmt};

/// Per-request lines of one `tracing` target, written to a file.
#[derive(Debug, Clone)]
pub struct RequestLog {
    /// The events' target, e.g. `stat`.
    pub target: &'static str,
    pub path: PathBuf,
}

/// Keeps the request log's writer thread alive; dropping it flushes the
/// lines still queued.
#[must_use = "dropping the guard stops the request log"]
#[derive(Debug)]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

/// Installs the global subscriber. `request_log`'s target is kept off
/// standard error, whether or not a file is given for it.
pub fn init(
    request_target: &'static str,
    request_log: Option<&RequestLog>,
) -> io::Result<LogGuard> {
    let stderr_filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env_lossy()
        .add_directive(
            format!("{request_target}=off")
                .parse()
                .expect("valid directive"),
        );
    let stderr = fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_filter(stderr_filter);

    let (file, worker) = match request_log {
        None => (None, None),
        Some(log) => {
            let file = open_append(&log.path)?;
            // Buffered: the writer thread flushes whenever its queue runs
            // empty, so lines reach the file in batches, never split.
            let (writer, worker) =
                tracing_appender::non_blocking(io::BufWriter::with_capacity(64 * 1024, file));
            let layer = fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_target(false)
                .with_level(false)
                .with_filter(Targets::new().with_target(log.target, LevelFilter::INFO));
            (Some(layer), Some(worker))
        }
    };

    tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init()
        .map_err(io::Error::other)?;
    Ok(LogGuard { _worker: worker })
}

/// Opens a log file for appending, creating it and its directory. Appending
/// lets several processes share one file: each write lands whole at its end.
fn open_append(path: &std::path::Path) -> io::Result<std::fs::File> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))
}
