//! Traffic for a test: clients sending one request after another through
//! the balancer until stopped, and backends run as processes of their own
//! so that a test can kill them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::client::Client;
use crate::process::Process;

/// A backend process (`spike-test-backend`) named `name` on `listen`.
pub fn backend_process(name: &str, listen: &str) -> Process {
    Process::start(
        "spike-test-backend",
        &["--name", name, "--listen", listen],
        1,
    )
}

/// Clients sending `path` in a loop until stopped; counts successes and
/// failures as the client sees them.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    workers: tokio::task::JoinSet<()>,
}

impl Load {
    pub fn start(url: String, clients: usize) -> Self {
        let stop: Arc<AtomicBool> = Arc::default();
        let (ok, failed): (Arc<AtomicUsize>, Arc<AtomicUsize>) = Default::default();
        let mut workers = tokio::task::JoinSet::new();
        let client = Client::new();
        for _ in 0..clients {
            let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
            let (client, url) = (client.clone(), url.clone());
            workers.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let req = Client::request(http::Method::GET, &url, &[], b"");
                    match client.send(req).await {
                        Ok(reply) if reply.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                }
            });
        }
        Self {
            stop,
            ok,
            failed,
            workers,
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    pub async fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        while self.workers.join_next().await.is_some() {}
        (self.ok(), self.failed())
    }
}
