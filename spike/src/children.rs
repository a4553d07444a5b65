//! The processes `spike up` starts and stops: itself as `node` and as
//! `balancer`, and `redis-server`.
//!
//! Each child runs in a process group of its own, so that a Ctrl-C at the
//! terminal reaches `spike` alone and `spike` stops the children in order.
//! Its standard error goes to a log file. The node and balancer children
//! also ask the kernel for SIGTERM should `spike` die (see
//! [`crate::supervised_by_parent`]), so none is left behind.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a child may take to announce that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The variable that tells a child which process supervises it.
pub const SUPERVISOR_VAR: &str = "SPIKE_SUPERVISOR";

/// How to start one child, kept to restart it.
#[derive(Debug, Clone)]
pub struct Launch {
    pub name: String,
    program: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    /// How many `listening on ADDR` lines mean it is up (0: none printed).
    announces: usize,
}

/// A running child.
#[derive(Debug)]
pub struct Running {
    pub launch: Launch,
    child: Child,
    pub pid: u32,
    /// The addresses it announced, in order.
    pub addrs: Vec<SocketAddr>,
}

impl Launch {
    /// `spike` itself, running the command line of `role` (`node` or
    /// `balancer`) with `args`, logging to `log_dir/NAME.log`.
    pub fn myself(
        name: &str,
        role: &str,
        args: Vec<OsString>,
        log_dir: &Path,
        announces: usize,
    ) -> anyhow::Result<Self> {
        let program = std::env::current_exe().context("cannot find the spike executable")?;
        let mut all = vec![OsString::from(role)];
        all.extend(args);
        Ok(Self {
            name: name.to_owned(),
            program,
            args: all,
            log: log_dir.join(format!("{name}.log")),
            announces,
        })
    }

    /// Another program, e.g. `redis-server`, run through `spike exec` so
    /// that it stops with spike as the other children do (the kernel's
    /// request to signal it when its parent dies lasts across `exec`).
    pub fn program(
        name: &str,
        program: &str,
        args: Vec<OsString>,
        log_dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut all = vec![OsString::from(program)];
        all.extend(args);
        Self::myself(name, "exec", all, log_dir, 0)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts the child and waits for its announcements.
    pub async fn start(&self) -> anyhow::Result<Running> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env(SUPERVISOR_VAR, std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(if self.announces > 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {} ({})", self.name, self.program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        let mut addrs = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let mut lines = BufReader::new(stdout).lines();
            let announced = tokio::time::timeout(START_TIMEOUT, async {
                while addrs.len() < self.announces {
                    match lines.next_line().await {
                        Ok(Some(line)) => {
                            if let Some((_, addr)) = line.split_once("listening on ") {
                                addrs.push(addr.trim().parse()?);
                            }
                        }
                        _ => bail!("exited before it listened"),
                    }
                }
                Ok(())
            })
            .await;
            let failure = match announced {
                Ok(Ok(())) => None,
                Ok(Err(err)) => Some(err.to_string()),
                Err(_) => Some(format!("did not listen within {START_TIMEOUT:?}")),
            };
            if let Some(failure) = failure {
                let _ = child.kill().await;
                bail!("{} {failure}: {}", self.name, last_line(&self.log));
            }
        }
        Ok(Running {
            launch: self.clone(),
            child,
            pid,
            addrs,
        })
    }
}

impl Running {
    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks it to stop (SIGTERM), unless it has exited.
    pub fn terminate(&mut self) {
        if self.exited().is_none() {
            let _ = signal::kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
        }
    }

    /// Waits up to `grace` for it to exit, then kills it (SIGKILL).
    pub async fn wait(&mut self, grace: Duration) -> Option<ExitStatus> {
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                self.child.wait().await.ok()
            }
        }
    }
}

/// The last line of a log file, to say why a child failed.
pub fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("see {}", log.display()))
}
