//! Live reconfiguration: the configuration file (watched, and re-read on
//! SIGHUP) and the admin's runtime changes to weights.
//!
//! Every change goes through [`Control`], one at a time: the whole file is
//! parsed and validated first, and only a valid one becomes a new routing
//! table ([`Router::install`]); an invalid one is reported with its file,
//! line and column, and the running table stays. Weights set at runtime
//! (set, drain) are overrides on top of the file: they survive reloads until
//! restored, and `/stats` shows where the running state differs from the
//! file.
//!
//! What a running balancer cannot change (its listen and admin addresses,
//! `[server]`, `[log]`) is compared too, and reported as needing a restart.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, StreamExt};
use inotify::{EventStream, Inotify, WatchMask};
use parking_lot::Mutex;
use serde::Serialize;
use spike_config::{BalancerConfig, ConfigError, Source};
use tokio_util::sync::CancellationToken;

use crate::balance::Router;
use crate::table::Routing;

/// How long to wait after a change to the file before reading it, so that
/// an editor's several writes are read once, whole.
const SETTLE: Duration = Duration::from_millis(100);

/// The balancer's configuration in force, and how to change it.
#[derive(Debug)]
pub struct Control {
    router: Arc<Router>,
    path: PathBuf,
    /// The configuration the process started with: what cannot change
    /// without a restart is compared against it.
    started: BalancerConfig,
    /// Locked while a change is worked out and installed, so that changes
    /// apply one at a time; never across an `.await`.
    state: Mutex<Loaded>,
}

/// The configuration as loaded, and the changes made to it since.
#[derive(Debug)]
struct Loaded {
    /// The last valid file, and its text.
    file: BalancerConfig,
    text: String,
    loaded_at: SystemTime,
    /// Weights set at runtime, by upstream.
    overrides: BTreeMap<SocketAddr, u32>,
    last_error: Option<ReloadError>,
    restart_required: Vec<&'static str>,
}

/// Why the file on disk is not the configuration in force.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadError {
    pub message: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// The configuration's part of `/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigStatus {
    pub path: PathBuf,
    /// When the configuration in force was read from the file (RFC 3339).
    pub loaded_at: String,
    /// The last reload's error, until a reload succeeds.
    pub last_error: Option<ReloadError>,
    /// Settings changed in the file that apply only after a restart.
    pub restart_required: Vec<&'static str>,
    /// Whether runtime changes make the running state differ from the file.
    pub differs_from_file: bool,
}

/// A runtime change the admin API refused.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no upstream {0} in the configuration")]
    UnknownUpstream(SocketAddr),
    #[error("{0}")]
    BadWeight(String),
}

impl Control {
    /// Control over `router`, which was built from `config`, read from
    /// `text` at `path`.
    pub fn new(router: Arc<Router>, path: PathBuf, config: BalancerConfig, text: String) -> Self {
        Self {
            router,
            path,
            started: config.clone(),
            state: Mutex::new(Loaded {
                file: config,
                text,
                loaded_at: SystemTime::now(),
                overrides: BTreeMap::new(),
                last_error: None,
                restart_required: Vec::new(),
            }),
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Reads the file again and applies it if it changed and is valid;
    /// returns whether it was applied.
    pub fn reload(&self) -> Result<bool, ConfigError> {
        let result = Source::read(&self.path).and_then(|source| {
            let config = BalancerConfig::from_source(&source)?;
            Ok((config, source))
        });
        let mut state = self.state.lock();
        let (config, source) = match result {
            Ok(parsed) => parsed,
            Err(err) => {
                state.last_error = Some(ReloadError {
                    message: err.to_string(),
                    at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                });
                return Err(err);
            }
        };
        state.last_error = None;
        if source.text() == state.text {
            return Ok(false);
        }
        state.restart_required = restart_required(&self.started, &config);
        for setting in &state.restart_required {
            tracing::warn!(setting, "changed in the file; applies only after a restart");
        }
        // Overrides of upstreams the file no longer has go with them.
        state
            .overrides
            .retain(|addr, _| config.upstreams.iter().any(|u| u.addr == *addr));
        state.file = config;
        state.text = source.text().to_owned();
        state.loaded_at = SystemTime::now();
        self.install(&state);
        Ok(true)
    }

    /// Sets an upstream's weight at runtime.
    pub fn set_weight(&self, addr: SocketAddr, weight: i64) -> Result<(), ChangeError> {
        let weight = spike_config::balancer::weight(weight).map_err(ChangeError::BadWeight)?;
        self.change(addr, |overrides| {
            overrides.insert(addr, weight);
        })
    }

    /// Drains an upstream: weight 0, while its requests in flight finish.
    pub fn drain(&self, addr: SocketAddr) -> Result<(), ChangeError> {
        self.set_weight(addr, 0)
    }

    /// Puts an upstream back to its weight in the file.
    pub fn restore(&self, addr: SocketAddr) -> Result<(), ChangeError> {
        self.change(addr, |overrides| {
            overrides.remove(&addr);
        })
    }

    fn change(
        &self,
        addr: SocketAddr,
        edit: impl FnOnce(&mut BTreeMap<SocketAddr, u32>),
    ) -> Result<(), ChangeError> {
        let mut state = self.state.lock();
        if !state.file.upstreams.iter().any(|u| u.addr == addr) {
            return Err(ChangeError::UnknownUpstream(addr));
        }
        edit(&mut state.overrides);
        self.install(&state);
        Ok(())
    }

    /// Builds the routing table of the file with the overrides applied.
    fn install(&self, state: &Loaded) {
        let mut upstreams = state.file.upstreams.clone();
        for upstream in &mut upstreams {
            if let Some(&weight) = state.overrides.get(&upstream.addr) {
                upstream.weight = weight;
            }
        }
        self.router.install(Routing {
            upstreams: &upstreams,
            proxy: &state.file.proxy,
            rate_limit: &state.file.rate_limit,
        });
    }

    /// The weight the file gives `addr`, and whether a runtime change
    /// overrides it.
    pub fn file_weight(&self, addr: SocketAddr) -> Option<(u32, bool)> {
        let state = self.state.lock();
        let file = state.file.upstreams.iter().find(|u| u.addr == addr)?;
        Some((file.weight, state.overrides.contains_key(&addr)))
    }

    pub fn status(&self) -> ConfigStatus {
        let state = self.state.lock();
        ConfigStatus {
            path: self.path.clone(),
            loaded_at: humantime::format_rfc3339_seconds(state.loaded_at).to_string(),
            last_error: state.last_error.clone(),
            restart_required: state.restart_required.clone(),
            differs_from_file: !state.overrides.is_empty(),
        }
    }
}

/// The settings of `new` that differ from those the process started with
/// and cannot change while it runs.
fn restart_required(started: &BalancerConfig, new: &BalancerConfig) -> Vec<&'static str> {
    [
        ("listen", started.listen != new.listen),
        ("admin", started.admin != new.admin),
        ("admin_token", started.admin_token != new.admin_token),
        ("[server]", started.server != new.server),
        ("[log]", started.log != new.log),
    ]
    .into_iter()
    .filter_map(|(setting, changed)| changed.then_some(setting))
    .collect()
}

/// What makes the balancer reload: a change to its file (an editor that
/// writes a new file and renames it over the old one included) and SIGHUP.
/// Set up before the balancer announces itself, so that no change made
/// after that is missed, and no SIGHUP kills it.
///
/// The file's directory is watched, not the file: a rename over the file
/// replaces the inode a watch on the file would follow. Only the events
/// that end a change are asked of the kernel (a file written and closed,
/// created, renamed or deleted), never each write: other files in the
/// directory, such as logs appended to, do not wake the balancer.
#[derive(Debug)]
pub struct Triggers {
    /// `None` once the watch failed: SIGHUP still reloads.
    events: Option<EventStream<[u8; 4096]>>,
    /// The file's name in its directory.
    name: OsString,
    hangup: tokio::signal::unix::Signal,
    /// Events the kernel delivered, about any file of the directory.
    delivered: u64,
}

/// Why the configuration is read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The file changed.
    File,
    /// SIGHUP.
    Hangup,
}

/// The events of the directory that end a change to one of its files.
const CHANGES: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM);

impl Triggers {
    /// Watches `path`; must run inside the runtime.
    pub fn new(path: &Path) -> io::Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?
            .to_owned();
        let inotify = Inotify::init()?;
        inotify.watches().add(directory_of(path), CHANGES)?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(Self {
            events: Some(inotify.into_event_stream([0; 4096])?),
            name,
            hangup,
            delivered: 0,
        })
    }

    /// The next reason to read the file again. If the watch on the file
    /// fails, that is logged, and only SIGHUP reloads from then on.
    pub async fn next(&mut self) -> Trigger {
        loop {
            let Some(events) = self.events.as_mut() else {
                self.hangup.recv().await;
                return Trigger::Hangup;
            };
            let event = tokio::select! {
                event = events.next() => event,
                _ = self.hangup.recv() => return Trigger::Hangup,
            };
            match event {
                Some(Ok(event)) => {
                    self.delivered += 1;
                    if event.name.as_deref() == Some(self.name.as_os_str()) {
                        return Trigger::File;
                    }
                }
                Some(Err(error)) => {
                    tracing::error!(
                        %error,
                        "cannot watch the configuration file; changes apply on SIGHUP only"
                    );
                    self.events = None;
                }
                None => {
                    tracing::error!(
                        "the watch on the configuration file ended; changes apply on SIGHUP only"
                    );
                    self.events = None;
                }
            }
        }
    }

    /// Takes the events delivered meanwhile, without waiting: a change read
    /// after them covers them.
    fn drain(&mut self) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        while let Some(Some(Ok(_))) = events.next().now_or_never() {
            self.delivered += 1;
        }
    }

    /// Events the kernel delivered so far, about any file of the directory.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
}

/// Reloads the configuration on every trigger until `shutdown`.
pub async fn watch(control: Arc<Control>, mut triggers: Triggers, shutdown: CancellationToken) {
    let path = control.path.clone();
    loop {
        let trigger = tokio::select! {
            trigger = triggers.next() => trigger,
            _ = shutdown.cancelled() => return,
        };
        match trigger {
            Trigger::File => {
                // An editor's several writes are read once, whole.
                tokio::time::sleep(SETTLE).await;
                triggers.drain();
            }
            Trigger::Hangup => tracing::info!("SIGHUP: reloading the configuration"),
        }
        match control.reload() {
            Ok(true) => tracing::info!(path = %path.display(), "configuration reloaded"),
            Ok(false) => tracing::debug!(path = %path.display(), "configuration unchanged"),
            Err(err) => tracing::error!(
                path = %path.display(),
                "configuration rejected; the running one stays:\n{err}"
            ),
        }
    }
}

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[tokio::test]
    async fn only_the_file_itself_wakes_the_watch_not_what_is_written_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.toml");
        std::fs::write(&path, "listen = 1").unwrap();
        let mut triggers = Triggers::new(&path).unwrap();
        // Logs appended to beside it while the watch runs, as backends
        // writing access logs do; then an editor renaming a new file over
        // the configuration.
        let writer = std::thread::spawn({
            let dir = dir.path().to_owned();
            move || {
                let mut log = std::fs::File::create(dir.join("access.log")).unwrap();
                for line in 0..200 {
                    writeln!(log, "request {line}").unwrap();
                    std::thread::sleep(Duration::from_millis(1));
                }
                let staged = dir.join(".balancer.toml.new");
                std::fs::write(&staged, "listen = 2").unwrap();
                std::fs::rename(&staged, dir.join("balancer.toml")).unwrap();
            }
        });
        let trigger = tokio::time::timeout(Duration::from_secs(10), triggers.next()).await;
        assert_eq!(trigger.unwrap(), Trigger::File);
        writer.join().unwrap();
        // access.log created; the staged file created and closed; and the
        // rename: not one event per line logged.
        assert!(triggers.delivered() <= 6, "{} events", triggers.delivered());
        // A file written in place is seen too.
        std::fs::write(&path, "listen = 3").unwrap();
        let trigger = tokio::time::timeout(Duration::from_secs(10), triggers.next()).await;
        assert_eq!(trigger.unwrap(), Trigger::File);
    }
}
