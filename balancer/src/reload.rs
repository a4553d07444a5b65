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
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde::Serialize;
use spike_config::{BalancerConfig, ConfigError, Source};
use tokio_util::sync::CancellationToken;

use crate::balance::{Router, Routing};

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
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
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
            state: Mutex::new(State {
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
        let mut state = self.state.lock().expect("control lock");
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
        let mut state = self.state.lock().expect("control lock");
        if !state.file.upstreams.iter().any(|u| u.addr == addr) {
            return Err(ChangeError::UnknownUpstream(addr));
        }
        edit(&mut state.overrides);
        self.install(&state);
        Ok(())
    }

    /// Builds the routing table of the file with the overrides applied.
    fn install(&self, state: &State) {
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
        let state = self.state.lock().expect("control lock");
        let file = state.file.upstreams.iter().find(|u| u.addr == addr)?;
        Some((file.weight, state.overrides.contains_key(&addr)))
    }

    pub fn status(&self) -> ConfigStatus {
        let state = self.state.lock().expect("control lock");
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
#[derive(Debug)]
pub struct Triggers {
    /// Kept for as long as the file is watched.
    _watcher: RecommendedWatcher,
    changes: tokio::sync::mpsc::Receiver<()>,
    hangup: tokio::signal::unix::Signal,
}

impl Triggers {
    /// Watches `path`; must run inside the runtime.
    pub fn new(path: &Path) -> std::io::Result<Self> {
        let (changed, changes) = tokio::sync::mpsc::channel::<()>(1);
        let name = path.file_name().map(ToOwned::to_owned);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                // Reading the file is an event too (an access): only a change
                // counts, or every reload would cause the next.
                let changes_it = matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                );
                if changes_it && event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                    // A full channel already has a reload coming.
                    let _ = changed.try_send(());
                }
            })
            .map_err(std::io::Error::other)?;
        // The directory is watched, not the file: a rename over the file
        // replaces the inode a watch on the file would follow.
        watcher
            .watch(directory_of(path), RecursiveMode::NonRecursive)
            .map_err(std::io::Error::other)?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        Ok(Self {
            _watcher: watcher,
            changes,
            hangup,
        })
    }
}

/// Reloads the configuration on every trigger until `shutdown`.
pub async fn watch(control: Arc<Control>, mut triggers: Triggers, shutdown: CancellationToken) {
    let path = control.path.clone();
    loop {
        tokio::select! {
            Some(()) = triggers.changes.recv() => {
                tokio::time::sleep(SETTLE).await;
                while triggers.changes.try_recv().is_ok() {}
            }
            _ = triggers.hangup.recv() => tracing::info!("SIGHUP: reloading the configuration"),
            _ = shutdown.cancelled() => return,
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
