//! Ticket nodes for a test's sale: real `node` processes sharing a real
//! `redis-server`, started on ephemeral ports and ready when returned.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::Client;
use crate::process::Process;
use crate::redis::RedisServer;
use crate::wait_until_async;

/// How long a node may take to reach Redis.
const READY: Duration = Duration::from_secs(10);

/// Writes the `node.toml` of a test sale in `dir`: the sale `ticket` of
/// `total` tickets at `redis`, synced every 50 ms, then the lines `extra`.
pub fn node_config(dir: &Path, redis: &RedisServer, total: u64, extra: &str) -> PathBuf {
    let redis = format!("redis_url = \"{}\"\n", redis.url());
    node_config_for(dir, &redis, total, extra)
}

/// [`node_config`] with the lines `redis` that name the sale's Redis.
pub fn node_config_for(dir: &Path, redis: &str, total: u64, extra: &str) -> PathBuf {
    let path = dir.join("node.toml");
    let text = format!(
        "{redis}event = \"ticket\"\ntotal_stock = {total}\nsync_interval = \"50ms\"\n{extra}"
    );
    std::fs::write(&path, text).expect("write node.toml");
    path
}

/// Starts a node of `config` named `name`, selling at most `local_stock`
/// (the file's if `None`); it may not have reached Redis yet.
pub fn start_node(config: &Path, name: &str, local_stock: Option<u64>) -> Process {
    start_node_as(&["node"], config, name, local_stock)
}

/// [`start_node`], the node run as `command`: `["spike", "node"]` runs it
/// as `spike up` does.
pub fn start_node_as(
    command: &[&str],
    config: &Path,
    name: &str,
    local_stock: Option<u64>,
) -> Process {
    let local = local_stock.map(|local| local.to_string());
    let mut args = command[1..].to_vec();
    args.extend([
        "--config",
        config.to_str().expect("a UTF-8 path"),
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
    ]);
    if let Some(local) = &local {
        args.extend(["--local-stock", local]);
    }
    Process::start(command[0], &args, 1)
}

/// Starts one node of `config` per local stock, named `node-1`, `node-2`...,
/// and waits until each has reached Redis.
pub async fn start_nodes(config: &Path, local_stocks: &[u64]) -> Vec<Process> {
    let nodes: Vec<Process> = local_stocks
        .iter()
        .enumerate()
        .map(|(i, &local)| start_node(config, &format!("node-{}", i + 1), Some(local)))
        .collect();
    for node in &nodes {
        wait_for_redis(node, "up").await;
    }
    nodes
}

/// Waits until `node`'s health says Redis is `state` (`up` or `down`).
pub async fn wait_for_redis(node: &Process, state: &str) {
    let client = Client::new();
    let url = node.url("/health");
    wait_until_async(&format!("{url} to report redis {state}"), READY, || {
        let (client, url) = (client.clone(), url.clone());
        async move { client.get(&url).await.json()["redis"] == state }
    })
    .await;
}
