//! A real headless Chromium, from Debian's `chromium` and
//! `chromium-driver`, driven over WebDriver (`fantoccini`). `chromedriver`
//! runs on an ephemeral port in a process group of its own, with a
//! temporary folder of its own for everything it and the browser write;
//! on drop every process it started is killed and the folder removed.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::redis::free_port;

#[derive(Debug)]
pub struct Browser {
    driver: Child,
    client: Option<Client>,
    /// `TMPDIR` of chromedriver and the browser: their profiles.
    _files: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromedriver` and opens a headless Chromium session.
    pub async fn start() -> Self {
        let port = free_port();
        let files = tempfile::tempdir().expect("a folder for the browser");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("TMPDIR", files.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start chromedriver ({err}): the tests need a real browser \
                     (Debian: `apt-get install -y chromium chromium-driver`)"
                )
            });
        let mut browser = Self {
            driver,
            client: None,
            _files: files,
        };
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen within 20 s"
            );
            assert!(
                browser.driver.try_wait().ok().flatten().is_none(),
                "chromedriver exited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "args": [
                    "--headless=new",
                    // The tests may run as root, where Chromium's sandbox
                    // cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1500,1000",
                ],
            }),
        );
        let mut builder = ClientBuilder::new(HttpConnector::new());
        builder.capabilities(capabilities);
        let client = tokio::time::timeout(Duration::from_secs(60), builder.connect(&url))
            .await
            .expect("a Chromium session within 60 s")
            .expect("a Chromium session");
        browser.client = Some(client);
        browser
    }

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("a session")
    }

    /// Ends the session: chromedriver closes the browser.
    pub async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let root = self.driver.id() as i32;
        for pid in descendants(root) {
            let _ = signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = signal::killpg(Pid::from_raw(root), Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

/// Every process below `root`, from `/proc`: a browser may start some in
/// process groups of their own.
fn descendants(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The field after the command (which may hold spaces) in
            // parentheses: state, then the parent's pid.
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    found.split_off(1)
}
