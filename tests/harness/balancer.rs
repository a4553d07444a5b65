//! The `balancer` binary, started on ephemeral ports with a test's own
//! configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;

use tempfile::TempDir;

use crate::client::Client;
use crate::process::Process;

/// A `balancer.toml` on ephemeral ports with these `(address, weight)`
/// upstreams, followed by `extra` (more sections).
pub fn config(upstreams: &[(SocketAddr, u32)], extra: &str) -> String {
    let mut text = String::from("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n");
    for (addr, weight) in upstreams {
        text.push_str(&format!(
            "\n[[upstream]]\naddr = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    text.push('\n');
    text.push_str(extra);
    text
}

/// A running balancer; killed on drop.
#[derive(Debug)]
pub struct Balancer {
    pub process: Process,
    dir: TempDir,
}

impl Balancer {
    /// Starts a balancer with [`config`]`(upstreams, extra)`.
    pub fn start(upstreams: &[(SocketAddr, u32)], extra: &str) -> Self {
        Self::with_config(&config(upstreams, extra))
    }

    /// Starts a balancer with this whole configuration file.
    pub fn with_config(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("balancer.toml");
        std::fs::write(&path, text).expect("write balancer.toml");
        let process = Process::start("balancer", &["--config", path.to_str().unwrap()], 2);
        Self { process, dir }
    }

    /// The configuration file, which a test may rewrite.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("balancer.toml")
    }

    /// Replaces the configuration file as most editors save: a new file
    /// written beside it, then renamed over it.
    pub fn replace_config(&self, text: &str) {
        let staged = self.dir.path().join(".balancer.toml.new");
        std::fs::write(&staged, text).expect("write the new configuration");
        std::fs::rename(&staged, self.config_path()).expect("rename it over the old one");
    }

    /// Rewrites the configuration file in place.
    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("rewrite the configuration");
    }

    /// A directory that lives as long as the balancer, for its logs.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn proxy(&self) -> SocketAddr {
        self.process.addrs()[0]
    }

    pub fn admin(&self) -> SocketAddr {
        self.process.addrs()[1]
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy())
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin())
    }

    /// The admin listener's `/stats`.
    pub async fn stats(&self) -> serde_json::Value {
        Client::new().get(&self.admin_url("/stats")).await.json()
    }
}
