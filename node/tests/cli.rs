//! The `node` command line: its subcommands against a real `redis-server`,
//! how it refuses bad input, and the scheduling policy it serves under.

use std::time::Duration;

use spike_tests::nodes::{node_config, start_node_as};
use spike_tests::process::run;
use spike_tests::redis::{RedisServer, free_port, sale_in_redis};
use spike_tests::wait_until;

fn node(args: &[&str]) -> (bool, String, String) {
    let (status, stdout, stderr) = run("node", args);
    (status.success(), stdout, stderr)
}

#[test]
fn reset_starts_the_sale_over_and_status_reports_it() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut conn = redis.conn();
    // A sale in progress: 7 of 10 sold, 2 of them paid, with buyers and
    // orders.
    redis::cmd("HSET")
        .arg("spike:{ticket}:stock")
        .arg(&["total", "10", "sold", "7", "paid", "2"])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("HSET")
        .arg("spike:{ticket}:buyers")
        .arg(&["alice", "1-0"])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("XADD")
        .arg("spike:{ticket}:orders")
        .arg(&["*", "ticket", "1"])
        .exec(&mut conn)
        .unwrap();

    let (ok, stdout, stderr) = node(&["status", "--redis", &url]);
    assert!(ok, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"event": "ticket", "total": 10, "sold": 7, "remaining": 3,
            "pending": 5, "paid": 2, "expired": 0, "resold": 0, "orders": 7, "events": 1})
    );

    let (ok, _, stderr) = node(&[
        "reset",
        "--redis",
        &url,
        "--total",
        "25",
        "--opens-at",
        "2026-12-12T20:00:00+08:00",
    ]);
    assert!(ok, "{stderr}");
    let truth = sale_in_redis(&mut conn, "ticket");
    assert_eq!(truth.total, Some(25));
    assert_eq!((truth.sold, truth.orders, truth.buyers), (0, 0, 0));

    let (ok, stdout, _) = node(&["status", "--redis", &url]);
    assert!(ok);
    assert!(
        stdout.contains(r#""total":25,"sold":0,"remaining":25,"pending":0,"paid":0"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#""orders":0,"events":0,"opens_at":"2026-12-12T12:00:00Z""#),
        "{stdout}"
    );
}

#[test]
fn reset_takes_its_total_from_the_config_file() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "event = \"g7\"\ntotal_stock = 42\n").unwrap();

    let (ok, _, stderr) = node(&[
        "reset",
        "--config",
        config.to_str().unwrap(),
        "--redis",
        &redis.url(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(sale_in_redis(&mut redis.conn(), "g7").total, Some(42));
}

#[test]
fn status_of_a_missing_sale_says_so() {
    let redis = RedisServer::start();
    let (ok, _, stderr) = node(&["status", "--redis", &redis.url(), "--event", "nothing"]);
    assert!(!ok);
    assert!(stderr.contains("no sale `nothing`"), "{stderr}");
}

#[test]
fn an_unreachable_redis_is_a_clear_error() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let nowhere = format!("127.0.0.1:{}", free_port());
    let cases = [
        (
            vec!["--redis", &url],
            format!("cannot reach the Redis at {url}"),
        ),
        (
            vec!["--redis-sentinels", &nowhere, "--redis-master", "sale"],
            format!("cannot reach the master `sale` of the sentinels at {nowhere}"),
        ),
        (
            vec!["--redis-cluster", &nowhere],
            format!("cannot reach the Redis Cluster at {nowhere}"),
        ),
    ];
    for (redis, expected) in &cases {
        for command in ["status", "reset"] {
            let mut args = vec![command];
            args.extend(redis);
            let (ok, stdout, stderr) = node(&args);
            assert!(!ok, "{args:?} succeeded: {stdout}");
            assert!(stderr.contains(expected), "{stderr}");
        }
    }
}

#[test]
fn a_bad_config_names_file_line_and_column_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nlocal_stok = 5\n").unwrap();
    let path = config.to_str().unwrap();

    let (ok, stdout, stderr) = node(&["--config", path]);
    assert!(!ok);
    assert!(!stdout.contains("listening"), "{stdout}");
    assert!(
        stderr.contains(&format!("{path}:2:1: unknown field `local_stok`")),
        "{stderr}"
    );

    std::fs::write(&config, "total_stock = 100\nlocal_stock = -3\n").unwrap();
    let (ok, _, stderr) = node(&["--config", path]);
    assert!(!ok);
    assert!(stderr.contains(&format!("{path}:2:15:")), "{stderr}");
}

#[test]
fn a_bad_flag_is_refused() {
    let (ok, _, stderr) = node(&["--name", "two words", "--listen", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(stderr.contains("--name `two words`"), "{stderr}");
}

/// The name and scheduling policy (`SCHED_OTHER` is 0, `SCHED_BATCH` 3) of
/// each thread of process `pid` (`self`: this one); a thread that ends
/// while they are read is left out.
fn policies(pid: &str) -> Vec<(String, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            // The policy is the line's 41st field, the 39th after the
            // parenthesised name (which may hold spaces).
            let (_, fields) = stat.rsplit_once(')')?;
            let policy = fields.split_whitespace().nth(38)?.parse().ok()?;
            Some((name.trim().to_owned(), policy))
        })
        .collect()
}

#[test]
fn the_node_serves_under_sched_batch_unless_its_file_says_not_to() {
    // A node takes the policy of the process that starts it until it sets
    // its own.
    let ours = policies("self");
    assert!(
        ours.iter().all(|&(_, policy)| policy == libc::SCHED_OTHER),
        "the tests must run under SCHED_OTHER: {ours:?}"
    );
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // `node`, and `spike node` as `spike up` starts it (with jemalloc).
    for command in [&["node"][..], &["spike", "node"]] {
        for (extra, policy) in [
            ("", libc::SCHED_BATCH),
            ("sched_batch = false\n", libc::SCHED_OTHER),
        ] {
            let config = node_config(dir.path(), &redis, 10, extra);
            let node = start_node_as(command, &config, "node-1", None);
            let pid = node.pid().to_string();
            // A worker takes its name once it first runs.
            wait_until("the node's workers", Duration::from_secs(10), || {
                policies(&pid)
                    .iter()
                    .any(|(name, _)| name == "tokio-rt-worker")
            });
            let threads = policies(&pid);
            // jemalloc's background threads, the first one started by an
            // allocation before the node set its policy, only give memory
            // back to the system.
            assert!(
                threads
                    .iter()
                    .filter(|(name, _)| name != "jemalloc_bg_thd")
                    .all(|&(_, p)| p == policy),
                "{command:?} {extra:?}: {threads:?}"
            );
        }
    }
}
