//! A Redis for the sale: the one at the configured URL, or, if none answers
//! there, a `redis-server` that `spike` starts itself.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::children::{Launch, Running};

/// How long a new `redis-server` may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a Redis has to answer PING.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

/// Whether a Redis answers PING at `url` (something else listening there,
/// say an HTTP server, does not).
pub fn answers(url: &str) -> bool {
    let Ok(mut conn) = redis::Client::open(url)
        .and_then(|client| client.get_connection_with_timeout(PING_TIMEOUT))
    else {
        return false;
    };
    conn.set_read_timeout(Some(PING_TIMEOUT)).is_ok()
        && conn.set_write_timeout(Some(PING_TIMEOUT)).is_ok()
        && redis::cmd("PING").query::<String>(&mut conn).is_ok()
}

/// Makes sure a Redis answers at `url`: `None` if one already does, else a
/// `redis-server` started on its port (kept in memory only, logging to
/// `log_dir`). Fails if the URL is not on this machine or `redis-server` is
/// not installed.
pub async fn ensure(url: &str, log_dir: &Path) -> anyhow::Result<Option<Running>> {
    if answers(url) {
        return Ok(None);
    }
    let info = redis::Client::open(url)
        .with_context(|| format!("invalid Redis URL {url}"))?
        .get_connection_info()
        .clone();
    let port = match &info.addr() {
        redis::ConnectionAddr::Tcp(host, port) if is_local(host) => *port,
        _ => bail!(
            "no Redis answers at {url}, which is not on this machine: start it, or point redis_url in node.toml at one"
        ),
    };
    if which("redis-server").is_none() {
        bail!(
            "no Redis answers at {url} and redis-server is not installed (Debian: apt-get install -y redis-server)"
        );
    }
    let args: Vec<OsString> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let launch = Launch::program("redis", "redis-server", args, log_dir);
    let mut running = launch.start().await?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    while !answers(url) {
        if let Some(status) = running.exited() {
            bail!(
                "redis-server exited ({status}): {}",
                crate::children::last_line(launch.log())
            );
        }
        if tokio::time::Instant::now() > deadline {
            running.terminate();
            running.wait(Duration::from_secs(1)).await;
            bail!("redis-server did not answer at {url} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(running))
}

fn is_local(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The path of `program` on `PATH`.
fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}
