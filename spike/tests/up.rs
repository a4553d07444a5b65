//! `spike up` for real: it starts Redis (or uses the test's), the nodes and
//! the balancer as processes, `ab` buys through it, and after SIGTERM not
//! one of its processes is left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use spike_tests::ab::ab;
use spike_tests::process::{Process, run};
use spike_tests::redis::{RedisServer, free_port, sale_in_redis};
use spike_tests::wait_until;
use tempfile::TempDir;

const WEIGHTS: [u32; 4] = [1, 2, 3, 4];
const STARTED: Duration = Duration::from_secs(30);
const STOPPED: Duration = Duration::from_secs(30);

/// A configuration directory on free ports: four upstreams weighted 1 to
/// 4, a sale of `total` tickets at `redis_url`, and an order service.
struct ConfigDir {
    dir: TempDir,
    proxy: String,
}

impl ConfigDir {
    fn new(redis_url: &str, total: u64) -> Self {
        Self::with_node(redis_url, total, "")
    }

    /// The same, with the lines `node` added to node.toml.
    fn with_node(redis_url: &str, total: u64, node: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("node.toml"),
            format!(
                "redis_url = \"{redis_url}\"\ntotal_stock = {total}\nstat_log = \"\"\nsync_interval = \"50ms\"\n{node}\n\
                 [server]\nshutdown_grace = \"2s\"\n"
            ),
        )
        .unwrap();
        let proxy = format!("127.0.0.1:{}", free_port());
        let mut balancer = format!(
            "listen = \"{proxy}\"\nadmin = \"127.0.0.1:{}\"\n\n[health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\n\n\
             [server]\nshutdown_grace = \"2s\"\n",
            free_port()
        );
        for weight in WEIGHTS {
            balancer.push_str(&format!(
                "\n[[upstream]]\naddr = \"127.0.0.1:{}\"\nweight = {weight}\n",
                free_port()
            ));
        }
        std::fs::write(dir.path().join("balancer.toml"), balancer).unwrap();
        std::fs::write(
            dir.path().join("orders.toml"),
            format!("admin = \"127.0.0.1:{}\"\n", free_port()),
        )
        .unwrap();
        Self { dir, proxy }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn arg(&self) -> &str {
        self.path().to_str().unwrap()
    }

    fn log_dir(&self) -> PathBuf {
        self.path().join("log")
    }

    fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }

    fn buy_url(&self) -> String {
        format!("http://{}/buy/ticket", self.proxy)
    }

    fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy)
    }
}

fn spike_up(config: &ConfigDir, extra: &[&str]) -> Process {
    let (log_dir, data_dir) = (config.log_dir(), config.data_dir());
    let mut args = vec![
        "up",
        "--config-dir",
        config.arg(),
        "--log-dir",
        log_dir.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let spike = Process::start("spike", &args, 0);
    spike.wait_for_line("ready: ab -k -l", STARTED);
    spike
}

/// The pids `spike` reported for what it started.
fn children(spike: &Process) -> Vec<i32> {
    spike
        .stdout()
        .iter()
        .filter_map(|line| line.split_once("(pid ").map(|(_, rest)| rest))
        .map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    signal::kill(Pid::from_raw(pid), None).is_ok()
}

fn stop(spike: &mut Process) {
    let status = spike.terminate(STOPPED);
    assert!(
        status.success(),
        "spike exited {status}; output:\n{}",
        spike.stdout().join("\n")
    );
}

#[test]
fn up_sells_exactly_the_stock_reports_it_and_leaves_nothing_behind() {
    let redis = RedisServer::start();
    let config = ConfigDir::new(&redis.url(), 1_000);
    let mut spike = spike_up(&config, &[]);
    let pids = children(&spike);
    assert_eq!(
        pids.len(),
        6,
        "four nodes, the order service and the balancer: {:?}",
        spike.stdout()
    );
    assert!(
        spike
            .stdout()
            .iter()
            .any(|l| l.contains("using the Redis at"))
    );

    let report = ab(
        &["-q", "-k", "-l", "-n", "4000", "-c", "40"],
        &config.buy_url(),
    );
    assert_eq!((report.complete, report.failed), (4_000, 0));
    assert_eq!(report.non_2xx, 3_000);
    let truth = sale_in_redis(&mut redis.conn(), "ticket");
    assert_eq!((truth.sold, truth.orders), (1_000, 1_000));

    let (status, stdout, stderr) = run("spike", &["status", "--config-dir", config.arg()]);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "tickets sold: 1000 of 1000 (paid 0, pending 1000)\n\
             orders: 1000 created, 0 expired unpaid, 0 tickets sold again\noversold: 0\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("1600  40.00% /  40.00%  weight 4, up"),
        "{stdout}"
    );

    stop(&mut spike);
    let output = spike.stdout().join("\n");
    assert!(
        output.contains("stopped\ntickets sold: 1000 of 1000"),
        "{output}"
    );
    // Every order written to the SQLite file of the data folder before
    // the order service stopped.
    assert!(
        output.contains(
            "orders in the database: 1000 (paid 0, pending 1000, expired 0), 0 events behind\n"
        ),
        "{output}"
    );
    assert!(config.data_dir().join("orders.db").is_file());
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived spike");
    }
}

#[test]
fn up_starts_its_own_redis_when_none_answers_and_stops_it() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let config = ConfigDir::new(&url, 10);
    let mut spike = spike_up(&config, &[]);
    let started = spike.wait_for_line("started redis-server", STARTED);
    let redis_pid = children(&spike)[0];
    assert!(started.contains(&format!("(pid {redis_pid})")));

    let report = ab(
        &["-q", "-k", "-l", "-n", "20", "-c", "2"],
        &config.buy_url(),
    );
    assert_eq!(
        (report.complete, report.non_2xx),
        (20, 10),
        "ten tickets, ten sold out"
    );

    stop(&mut spike);
    assert!(!alive(redis_pid), "redis-server outlived spike");
    assert!(!redis_answers(&url));
}

fn redis_answers(url: &str) -> bool {
    spike_tests::redis::connect(url, Duration::from_millis(200)).is_ok()
}

#[test]
fn a_node_killed_during_up_is_reported_and_the_sale_still_ends_exact() {
    let redis = RedisServer::start();
    let config = ConfigDir::new(&redis.url(), 3_000);
    let mut spike = spike_up(&config, &[]);
    let node = spike.wait_for_line("started node-", STARTED);
    let name = node.split_whitespace().nth(1).unwrap().to_owned();
    let pid = children(&spike)[0];

    let url = config.buy_url();
    let sale = std::thread::spawn(move || ab(&["-q", "-k", "-l", "-n", "12000", "-c", "40"], &url));
    let mut conn = redis.conn();
    wait_until("a third of the sale", Duration::from_secs(60), || {
        sale_in_redis(&mut conn, "ticket").sold >= 1_000
    });
    signal::kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    spike.wait_for_line(&format!("{name} exited"), Duration::from_secs(10));
    let report = sale.join().unwrap();

    assert_eq!(report.complete, 12_000);
    let truth = sale_in_redis(&mut redis.conn(), "ticket");
    assert_eq!(
        (truth.sold, truth.orders),
        (3_000, 3_000),
        "none lost, none oversold"
    );
    stop(&mut spike);
}

#[test]
fn a_taken_port_fails_in_one_line_and_starts_nothing() {
    let redis = RedisServer::start();
    let config = ConfigDir::new(&redis.url(), 10);
    let taken = std::net::TcpListener::bind(&config.proxy).unwrap();

    let (status, stdout, stderr) = run("spike", &["up", "--config-dir", config.arg()]);
    assert!(!status.success());
    assert!(!stdout.contains("started"), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} (the balancer's listen) is already in use",
            config.proxy
        )),
        "{stderr}"
    );
    drop(taken);
}

#[test]
fn a_config_the_balancer_rejects_is_located_and_starts_nothing() {
    let redis = RedisServer::start();
    let config = ConfigDir::new(&redis.url(), 10);
    let path = config.path().join("balancer.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("weight = 1", "weight = one", 1);
    std::fs::write(&path, text).unwrap();

    let (status, stdout, stderr) = run("spike", &["up", "--config-dir", config.arg()]);
    assert!(!status.success());
    assert!(!stdout.contains("started"), "{stdout}");
    assert!(stderr.contains(&format!("{}:", path.display())), "{stderr}");
}

#[test]
fn without_redis_or_redis_server_it_says_how_to_install_it() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let config = ConfigDir::new(&url, 10);
    let output = std::process::Command::new(spike_tests::process::binary("spike"))
        .args(["up", "--config-dir", config.arg()])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("no Redis answers at {url}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("apt-get install -y redis-server"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("started"));
}

#[test]
fn restart_nodes_brings_a_dead_node_back() {
    let redis = RedisServer::start();
    let config = ConfigDir::new(&redis.url(), 100);
    let mut spike = spike_up(&config, &["--restart-nodes"]);
    let node = spike.wait_for_line("started node-", STARTED);
    let name = node.split_whitespace().nth(1).unwrap().to_owned();
    let addr = node.split_whitespace().nth(3).unwrap().to_owned();
    let pid = children(&spike)[0];

    signal::kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let restarted = spike.wait_for_line(&format!("restarted {name}"), Duration::from_secs(10));
    let new_pid: i32 = restarted
        .split("(pid ")
        .nth(1)
        .unwrap()
        .trim_end_matches(')')
        .parse()
        .unwrap();
    assert_ne!(new_pid, pid);
    assert!(alive(new_pid));
    let report = ab(&["-q", "-n", "10"], &format!("http://{addr}/health"));
    assert_eq!((report.complete, report.non_2xx), (10, 0));

    stop(&mut spike);
    assert!(!alive(new_pid), "the restarted node outlived spike");
}

/// `spike load` against `spike up`: a first load buys every ticket and
/// pays for half; once the unpaid orders have expired, a second load of
/// other buyers gets exactly their tickets back. What the reports say the
/// buyers were told agrees with what Redis holds.
#[test]
fn load_reports_what_redis_holds() {
    let redis = RedisServer::start();
    let config = ConfigDir::with_node(
        &redis.url(),
        100,
        "pay_window = \"1s\"\nsweep_interval = \"50ms\"\n",
    );
    let mut spike = spike_up(&config, &[]);
    let url = config.proxy_url();
    let load = |prefix: &str, buyers: &str, pay: &str| {
        let (status, stdout, stderr) = run(
            "spike",
            &[
                "load",
                "--url",
                &url,
                "--buyers",
                buyers,
                "--concurrency",
                "2",
                "--pay",
                pay,
                "--prefix",
                prefix,
                "--json",
            ],
        );
        assert!(status.success(), "{stderr}");
        let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        report
    };
    let count = |report: &serde_json::Value, name: &str| report[name].as_u64().unwrap();
    let mut conn = redis.conn();
    let settled = |conn: &mut redis::Connection| {
        wait_until(
            "the unpaid orders to expire",
            Duration::from_secs(10),
            || {
                let stock = spike_tests::redis::stock_in_redis(conn, "ticket");
                stock["sold"] == stock["paid"]
            },
        );
        spike_tests::redis::stock_in_redis(conn, "ticket")
    };

    let first = load("first", "100", "0.5");
    assert_eq!(count(&first, "errors"), 0, "{first}");
    assert_eq!(count(&first, "bought"), 100, "one ticket each: {first}");
    let unpaid = count(&first, "unpaid") + count(&first, "expired");
    assert!(unpaid > 20 && count(&first, "paid") > 20, "{first}");
    let stock = settled(&mut conn);
    assert_eq!(stock["paid"], count(&first, "paid"), "{first}");
    assert_eq!(stock["expired"], unpaid, "{first}");

    let second = load("second", "200", "1");
    assert_eq!(count(&second, "errors"), 0, "{second}");
    assert_eq!(
        (count(&second, "bought"), count(&second, "sold_out")),
        (unpaid, 200 - unpaid),
        "the returned tickets and no more: {second}"
    );
    let stock = settled(&mut conn);
    assert_eq!(
        stock["sold"] + stock["expired"],
        count(&first, "bought") + count(&second, "bought")
    );
    // Every returned ticket was sold again, and all of them.
    assert_eq!(stock["resold"], unpaid);
    assert_eq!(
        stock["paid"],
        count(&first, "paid") + count(&second, "paid")
    );
    let orders = stock["sold"] + stock["expired"];
    let expected = format!(
        "orders in the database: {orders} (paid {}, pending 0, expired {}), 0 events behind",
        stock["paid"], stock["expired"]
    );
    wait_until(
        "the orders in the database",
        Duration::from_secs(10),
        || {
            run("spike", &["status", "--config-dir", config.arg()])
                .1
                .contains(&expected)
        },
    );
    let text = run("spike", &["status", "--config-dir", config.arg()]).1;
    assert!(
        text.contains(&format!("(paid {}, pending 0)", stock["paid"])),
        "{text}"
    );
    stop(&mut spike);
}

#[test]
fn up_sentinel_sells_on_through_the_death_of_its_master() {
    let config = ConfigDir::new("redis://127.0.0.1:1", 2_000);
    let mut spike = spike_up(&config, &["--sentinel"]);
    let setup = spike.wait_for_line("started a Sentinel setup", STARTED);
    let pids = children(&spike);
    let master_pid = pids[0];
    let port_after = |text: &str| -> u16 {
        let rest = setup.split_once(text).unwrap().1;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let master = port_after("master 127.0.0.1:");
    let sentinel = port_after("sentinels on ports ");
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{master}"))
        .unwrap()
        .get_connection()
        .unwrap();

    let url = config.buy_url();
    let sale = std::thread::spawn(move || ab(&["-q", "-k", "-l", "-n", "6000", "-c", "20"], &url));
    wait_until("a third of the sale", Duration::from_secs(60), || {
        sale_in_redis(&mut conn, "ticket").sold >= 600
    });
    signal::kill(Pid::from_raw(master_pid), Signal::SIGKILL).unwrap();
    let first = sale.join().unwrap();
    let mut granted = first.complete - first.non_2xx;

    let mut sentinel = redis::Client::open(format!("redis://127.0.0.1:{sentinel}"))
        .unwrap()
        .get_connection()
        .unwrap();
    let mut promoted = master;
    wait_until("the sentinels to promote a replica", STARTED, || {
        let named: redis::RedisResult<(String, u16)> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg("spike")
            .query(&mut sentinel);
        promoted = named.map_or(master, |(_, port)| port);
        promoted != master
    });
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{promoted}"))
        .unwrap()
        .get_connection()
        .unwrap();
    // The nodes follow the new master by themselves; buyers come until
    // the sale is sold out.
    let mut granted_after = 0;
    wait_until("the sale to sell out on the new master", STARTED, || {
        let round = ab(
            &["-q", "-k", "-l", "-n", "500", "-c", "20"],
            &config.buy_url(),
        );
        granted_after += round.complete - round.non_2xx;
        sale_in_redis(&mut conn, "ticket").sold == 2_000
    });
    granted += granted_after;
    let truth = sale_in_redis(&mut conn, "ticket");
    assert_eq!(
        (truth.sold, truth.orders),
        (2_000, 2_000),
        "sold out, exact"
    );
    assert!(granted_after > 0, "sold after the failover");
    // Every 200 is a sale the new master holds; a 503 "outcome unknown"
    // may be one too.
    assert!(granted <= 2_000, "{granted} granted");

    stop(&mut spike);
    for pid in pids {
        assert!(!alive(pid), "pid {pid} outlived spike");
    }
}

#[test]
fn what_spike_started_stops_when_spike_is_killed() {
    let url = format!("redis://127.0.0.1:{}", free_port());
    let config = ConfigDir::new(&url, 10);
    let mut spike = spike_up(&config, &[]);
    spike.wait_for_line("started redis-server", STARTED);
    let pids = children(&spike);
    assert_eq!(
        pids.len(),
        7,
        "redis, four nodes, the order service, the balancer"
    );
    spike.kill();
    wait_until("every child of a killed spike to stop", STOPPED, || {
        pids.iter().all(|&pid| !running(pid))
    });
    assert!(!redis_answers(&url));
}

/// Whether `pid` runs: exists and is not a zombie waiting to be reaped.
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z')
        })
        .unwrap_or(false)
}
