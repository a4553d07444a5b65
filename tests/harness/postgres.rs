//! A real PostgreSQL server from Debian's `postgresql` package, for one
//! test: `initdb` in a temporary folder, then `postgres` on an ephemeral
//! loopback port. PostgreSQL refuses to run as root: when the tests do,
//! the server runs as `nobody`, its folder handed over to that user.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, User, chown};
use tempfile::TempDir;

use crate::redis::free_port;

/// The database role and database the tests use.
const ROLE: &str = "spike";

#[derive(Debug)]
pub struct PostgresServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    /// The unprivileged user it runs as, when the tests run as root.
    user: Option<User>,
}

impl PostgresServer {
    /// Initialises a cluster and starts its server.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let user = nix::unistd::geteuid().is_root().then(|| {
            let nobody = User::from_name("nobody")
                .ok()
                .flatten()
                .expect("a user `nobody` to run PostgreSQL as");
            chown(dir.path(), Some(nobody.uid), Some(nobody.gid)).expect("hand the folder over");
            nobody
        });
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            user,
        };
        let initdb = server
            .command("initdb")
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--username",
                ROLE,
            ])
            .arg("--pgdata")
            .arg(server.data())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        // Another process may take the port between our probe and the
        // server's bind; try a few.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("postgres did not start on any of 5 ephemeral ports");
    }

    /// `postgres://spike@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://{ROLE}@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (a fast shutdown: connections are cut).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "postgres could not start again on port {}",
            self.port
        );
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command of the package's, run as the server's user.
    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(bin_dir().join(name));
        if let Some(user) = &self.user {
            command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        }
        command.current_dir(self.dir.path());
        command
    }

    /// Starts the server and waits until it accepts connections; `false`
    /// if it exited first (its port was taken).
    fn spawn(&mut self) -> bool {
        let mut child = self
            .command("postgres")
            .arg("-D")
            .arg(self.data())
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            // A test's data need not survive a crash of the machine.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return false;
            }
            // Ready, and ours: its lock file names the port (another
            // server that took the port first would answer too).
            let ours = std::fs::read_to_string(self.data().join("postmaster.pid"))
                .is_ok_and(|pid| pid.lines().nth(3) == Some(&self.port.to_string()));
            let ready = ours
                && self
                    .command("pg_isready")
                    .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .status()
                    .is_ok_and(|status| status.success());
            if ready {
                self.child = Some(child);
                return true;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("postgres on port {} was not ready within 20s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The package's programs: the newest `/usr/lib/postgresql/VERSION/bin`.
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed: the tests need a real one \
                 (Debian: `apt-get install -y postgresql`)"
            )
        });
    root.join(newest.to_string()).join("bin")
}
