//! The workspace's binaries, started as real processes.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::NamedTempFile;

/// How long a binary may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The path of a workspace binary, built with the test's own profile.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_binaries) {
        Ok(dir) => dir.join(name),
        Err(err) => panic!("{err}"),
    }
}

/// Builds every binary of the workspace, once per test process. Cargo
/// builds a package's binaries only for that package's own integration
/// tests; without this, a test of another package could run a stale binary.
/// When everything is fresh it costs one no-op `cargo build`.
fn build_binaries() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|err| format!("the test's own path: {err}"))?;
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the test does not run from target/<profile>/deps")?
        .to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "--workspace", "--bins"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    match dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
        None => return Err(format!("no profile in {}", dir.display())),
    }
    let output = command
        .output()
        .map_err(|err| format!("cannot run cargo to build the binaries: {err}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the binaries failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(dir)
}

/// A running binary of the workspace that announced `listening on ADDR` on
/// its standard output. Every line of its standard output is kept; its
/// standard error goes to a file the test can read. Killed on drop.
#[derive(Debug)]
pub struct Process {
    child: Child,
    /// Every address the process announced, in order.
    addrs: Vec<SocketAddr>,
    stdout: Arc<Mutex<Vec<String>>>,
    log: NamedTempFile,
}

impl Process {
    /// Starts `binary` with `args` and waits for `listeners` lines of the
    /// form `... listening on ADDR` on its standard output.
    pub fn start(binary: &str, args: &[&str], listeners: usize) -> Self {
        let mut command = Command::new(self::binary(binary));
        command.args(args);
        Self::start_command(command, listeners)
    }

    /// Starts a prepared command; see [`Process::start`].
    pub fn start_command(mut command: Command, listeners: usize) -> Self {
        let log = NamedTempFile::new().expect("log file");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        std::thread::spawn({
            let lines = Arc::clone(&lines);
            move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        let mut process = Self {
            child,
            addrs: Vec::new(),
            stdout: lines,
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            process.addrs = process
                .stdout()
                .iter()
                .filter_map(|line| line.split_once("listening on "))
                .map(|(_, addr)| addr.trim().parse().expect("announced address"))
                .collect();
            if process.addrs.len() >= listeners {
                return process;
            }
            if Instant::now() > deadline || process.child.try_wait().ok().flatten().is_some() {
                panic!(
                    "{command:?} announced {} of {listeners} listeners; its output:\n{}\nits log:\n{}",
                    process.addrs.len(),
                    process.stdout().join("\n"),
                    process.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every line it has written to standard output so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for a line of standard output that contains
    /// `text`, and returns it.
    pub fn wait_for_line(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout().into_iter().find(|line| line.contains(text)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no line with {text:?} within {timeout:?}; output:\n{}\nlog:\n{}",
                self.stdout().join("\n"),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first announced address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to standard error so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id() as i32);
        signal::kill(pid, signal).expect("signal the process");
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait(timeout)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the process") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {timeout:?}; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a workspace binary to completion and returns its status, standard
/// output and standard error.
pub fn run(binary: &str, args: &[&str]) -> (ExitStatus, String, String) {
    let output = Command::new(self::binary(binary))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {binary}: {err}"));
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
