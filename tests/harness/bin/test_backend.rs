//! `spike-test-backend`: a backend process that tests can kill.
//!
//! ```text
//! spike-test-backend [--listen ADDR] [--name NAME] [--health-status CODE]
//! ```
//!
//! Prints `listening on ADDR`, then answers:
//! - `/health`: the health status (200 unless told otherwise);
//! - `/seen`: a JSON array of the path and query of every other request
//!   received so far, in order;
//! - `/delay/MS...`: waits MS milliseconds, then 200 with its name;
//! - anything else: 200 with its name.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use spike_tests::backend::{Answer, Backend};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut name = "backend".to_owned();
    let mut health_status = 200;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = value,
            "--name" => name = value,
            "--health-status" => health_status = value.parse().expect("a status code"),
            _ => panic!("unknown flag {flag}"),
        }
    }
    let listener = TcpListener::bind(&listen).await.expect("bind");
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let backend = Backend::serve(listener, move |req| {
        let path = req.uri.path();
        if path == "/health" {
            return Answer::status(health_status);
        }
        let mut seen = seen.lock().unwrap();
        if path == "/seen" {
            return Answer::ok(serde_json::to_string(&*seen).unwrap());
        }
        seen.push(req.uri.to_string());
        let delay = path
            .strip_prefix("/delay/")
            .and_then(|rest| rest.split('/').next())
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::ZERO, Duration::from_millis);
        Answer::ok(name.clone()).delayed(delay)
    });
    println!("listening on {}", backend.addr());
    std::future::pending::<()>().await;
}
