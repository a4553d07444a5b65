//! `spike up`: start the whole sale, watch it, stop it in order.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use node::cli::RedisFlags;
use spike_config::redis::RedisTarget;
use spike_config::server::ServerSettings;

use crate::children::{Launch, Running};
use crate::plan::Plan;
use crate::redis::SentinelPlan;
use crate::status::{Observer, Snapshot};

/// What `spike up` was asked to do.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub config_dir: PathBuf,
    /// Where the children's logs go.
    pub log_dir: PathBuf,
    /// Where the order service's SQLite database goes, unless orders.toml
    /// names another database.
    pub data_dir: PathBuf,
    /// Start the sale over instead of joining a running one.
    pub reset: bool,
    /// Tickets in a new sale (default: `total_stock` of node.toml).
    pub total: Option<u64>,
    /// Restart a node that dies.
    pub restart_nodes: bool,
    /// When a sale started over or created opens (default: node.toml's
    /// `opens_at`, or at once).
    pub opens_at: Option<SystemTime>,
    /// Run the sale on a local Sentinel setup (a master, two replicas,
    /// three sentinels) that spike starts and stops, with `replica_acks`
    /// at least 1.
    pub sentinel: bool,
}

/// How long a node may take to reach Redis once it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping `spike up` waits for the order service to write
/// the last events.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The children, in the order they were started.
#[derive(Debug, Default)]
struct Cluster {
    redis: Option<Running>,
    /// The Sentinel setup's servers and sentinels, master first.
    sentinel: Vec<Running>,
    nodes: Vec<Running>,
    orders: Option<Running>,
    balancer: Option<Running>,
}

/// Starts the sale of `options`, watches it until `shutdown`, then stops it
/// and prints the summary.
pub async fn up(options: UpOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut plan = Plan::read(&options.config_dir, options.total)?;
    plan.check_ports()?;
    let sentinel = if options.sentinel {
        let sentinel = SentinelPlan::new()?;
        plan.node.redis = sentinel.target();
        plan.orders.redis = sentinel.target();
        plan.node.replica_acks = plan.node.replica_acks.max(1);
        plan.orders.replica_acks = plan.orders.replica_acks.max(1);
        Some(sentinel)
    } else {
        None
    };
    std::fs::create_dir_all(&options.log_dir)
        .with_context(|| format!("cannot create {}", options.log_dir.display()))?;
    for addr in &plan.remote {
        println!("upstream {addr} is not on this machine: not started here");
    }
    let mut cluster = Cluster::default();
    let observer = Observer::new(&plan)?;
    let started = tokio::select! {
        result = start(&plan, sentinel.as_ref(), &options, &observer, &mut cluster) => result,
        _ = shutdown.cancelled() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(err) = started {
        cluster.stop_serving(&plan).await;
        cluster.stop_orders(&observer).await;
        cluster.stop_redis().await;
        return Err(err);
    }
    let watched = watch(&plan, &options, &observer, &mut cluster, &shutdown).await;
    // The traffic while the balancer still answers; the tickets once no
    // node sells any more, and the orders once the order service has
    // written the last events, before a Redis of spike's own goes.
    let traffic = observer.look().await.upstreams;
    cluster.stop_serving(&plan).await;
    let look = cluster.stop_orders(&observer).await;
    cluster.stop_redis().await;
    let summary = Snapshot {
        upstreams: traffic,
        ..look
    };
    println!("stopped\n{}", summary.summary());
    watched
}

async fn start(
    plan: &Plan,
    sentinel: Option<&SentinelPlan>,
    options: &UpOptions,
    observer: &Observer,
    cluster: &mut Cluster,
) -> anyhow::Result<()> {
    match &plan.node.redis {
        _ if let Some(sentinel) = sentinel => {
            cluster.sentinel = sentinel.start(&options.log_dir, &options.data_dir).await?;
            let pid = |i: usize| cluster.sentinel[i].pid;
            println!(
                "started a Sentinel setup, in memory only: master 127.0.0.1:{} (pid {}), replicas on ports {} and {}, sentinels on ports {}, {} and {}; nodes wait for replica_acks = {}",
                sentinel.servers[0],
                pid(0),
                sentinel.servers[1],
                sentinel.servers[2],
                sentinel.sentinels[0],
                sentinel.sentinels[1],
                sentinel.sentinels[2],
                plan.node.replica_acks,
            );
            println!(
                "kill the master mid-sale (kill -9 {}): the sentinels promote a replica within seconds, and the sale goes on",
                pid(0)
            );
        }
        RedisTarget::Single(url) => {
            cluster.redis = crate::redis::ensure(url, &options.log_dir, &options.data_dir).await?;
            match &cluster.redis {
                Some(redis) => println!(
                    "no Redis answered at {url}: started redis-server (pid {}), in memory only; it stops with spike",
                    redis.pid
                ),
                None => println!("using the Redis at {url}"),
            }
        }
        target => println!("using the {target}"),
    }

    let store = observer.store();
    let opens_at = options
        .opens_at
        .or(plan.node.opens_at)
        .map(node::server::millis_since_epoch);
    if options.reset {
        store
            .reset(plan.total, opens_at)
            .await
            .context("cannot reset the sale")?;
        println!(
            "sale `{}` started over with {} tickets",
            plan.node.event, plan.total
        );
    } else if store
        .ensure_sale(plan.total, opens_at)
        .await
        .context("cannot create the sale")?
    {
        println!(
            "sale `{}` created with {} tickets",
            plan.node.event, plan.total
        );
    } else {
        let state = store.state().await.context("cannot read the sale")?;
        println!(
            "sale `{}` exists: {} of {} tickets held, {} paid (spike up --reset starts it over)",
            plan.node.event,
            state.sold,
            state.total.unwrap_or(0),
            state.paid,
        );
    }

    for node in &plan.nodes {
        let launch = node_launch(plan, node, options)?;
        let running = launch.start().await?;
        println!(
            "started {} on {} (pid {}, local stock {})",
            node.name, node.addr, running.pid, node.local_stock
        );
        cluster.nodes.push(running);
    }
    for node in &plan.nodes {
        observer
            .wait_for_node(node.addr, READY_TIMEOUT)
            .await
            .with_context(|| format!("{} did not reach Redis", node.name))?;
    }

    let database = database_url(plan, options);
    let mut args: Vec<OsString> = Vec::new();
    if let Some(file) = &plan.orders_file {
        args.extend(["--config".into(), file.clone().into()]);
    }
    args.extend(RedisFlags::naming(&plan.orders.redis));
    args.extend([
        "--replica-acks".into(),
        plan.orders.replica_acks.to_string().into(),
    ]);
    args.extend([
        "--event".into(),
        plan.orders.event.clone().into(),
        "--database".into(),
        database.clone().into(),
        "--admin".into(),
        plan.orders.admin.to_string().into(),
    ]);
    let orders = Launch::myself("orders", "orders", args, &options.log_dir, 1)?
        .start()
        .await?;
    println!(
        "started the order service (pid {}), admin on {}: orders written to {}",
        orders.pid, orders.addrs[0], database
    );
    cluster.orders = Some(orders);

    let launch = Launch::myself(
        "balancer",
        "balancer",
        vec![
            OsString::from("--config"),
            plan.balancer_file.clone().into(),
        ],
        &options.log_dir,
        2,
    )?;
    let balancer = launch.start().await?;
    println!(
        "started the balancer on {} (pid {}); admin on {}",
        balancer.addrs[0], balancer.pid, balancer.addrs[1]
    );
    let proxy = balancer.addrs[0];
    cluster.balancer = Some(balancer);
    println!("logs in {}", options.log_dir.display());
    println!("ready: ab -k -l -n 1000000 -c 1000 http://{proxy}/buy/ticket");
    Ok(())
}

/// The order service's database: orders.toml's, or the SQLite file of
/// the data folder if orders.toml keeps the default.
fn database_url(plan: &Plan, options: &UpOptions) -> String {
    if plan.orders.database_url == spike_config::orders::DEFAULT_DATABASE_URL {
        format!("sqlite://{}/orders.db", options.data_dir.display())
    } else {
        plan.orders.database_url.clone()
    }
}

fn node_launch(
    plan: &Plan,
    node: &crate::plan::NodePlan,
    options: &UpOptions,
) -> anyhow::Result<Launch> {
    let mut args: Vec<OsString> = vec![
        "--config".into(),
        plan.node_file.clone().into_os_string(),
        "--listen".into(),
        node.addr.to_string().into(),
        "--name".into(),
        node.name.clone().into(),
        "--local-stock".into(),
        node.local_stock.to_string().into(),
        "--replica-acks".into(),
        plan.node.replica_acks.to_string().into(),
    ];
    args.extend(RedisFlags::naming(&plan.node.redis));
    Launch::myself(&node.name, "node", args, &options.log_dir, 1)
}

/// Shows the sale while it runs, and handles children that exit, until
/// shutdown (or the balancer's death, an error).
async fn watch(
    plan: &Plan,
    options: &UpOptions,
    observer: &Observer,
    cluster: &mut Cluster,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let period = if terminal {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(2)
    };
    let bar = terminal.then(|| {
        let bar = ProgressBar::new(plan.total);
        bar.set_style(
            ProgressStyle::with_template("{bar:30} {msg}")
                .expect("a valid template")
                .progress_chars("##-"),
        );
        bar
    });
    let mut previous: Option<(Snapshot, Instant)> = None;
    let mut printed = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shutdown.cancelled() => break,
        }
        if let Some(status) = cluster.balancer.as_mut().and_then(Running::exited) {
            anyhow::bail!("the balancer exited ({status}); stopping");
        }
        for node in &mut cluster.nodes {
            if let Some(status) = node.exited() {
                let name = node.launch.name.clone();
                let note = if options.restart_nodes {
                    "restarting it"
                } else {
                    "the others go on selling"
                };
                report(&bar, &format!("{name} exited ({status}); {note}"));
                if options.restart_nodes {
                    match node.launch.start().await {
                        Ok(restarted) => {
                            report(&bar, &format!("restarted {name} (pid {})", restarted.pid));
                            *node = restarted;
                        }
                        Err(err) => report(&bar, &format!("cannot restart {name}: {err:#}")),
                    }
                }
            }
        }
        if let Some(orders) = cluster.orders.as_mut()
            && let Some(status) = orders.exited()
        {
            report(
                &bar,
                &format!(
                    "the order service exited ({status}); orders wait in the stream until one runs"
                ),
            );
            cluster.orders = None;
        }
        if let Some(redis) = cluster.redis.as_mut()
            && let Some(status) = redis.exited()
        {
            report(
                &bar,
                &format!("redis-server exited ({status}); purchases fail until a Redis answers"),
            );
            cluster.redis = None;
        }
        // Dead nodes are reported once.
        cluster
            .nodes
            .retain_mut(|node| node.exited().is_none() || options.restart_nodes);

        let now = observer.look().await;
        let line = match &previous {
            Some((before, at)) => now.line(Some(before), at.elapsed()),
            None => now.line(None, Duration::ZERO),
        };
        match &bar {
            Some(bar) => {
                bar.set_position(now.sale.map_or(0, |s| s.sold));
                bar.set_message(line);
            }
            None if line != printed => {
                println!("{line}");
                printed = line;
            }
            None => {}
        }
        previous = Some((now, Instant::now()));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(())
}

fn report(bar: &Option<ProgressBar>, message: &str) {
    match bar {
        Some(bar) => bar.println(message),
        None => println!("{message}"),
    }
}

impl Cluster {
    /// Stops the balancer, then the nodes, each gracefully.
    async fn stop_serving(&mut self, plan: &Plan) {
        let grace = |server: &ServerSettings| server.shutdown_grace + Duration::from_secs(1);
        if let Some(balancer) = self.balancer.as_mut() {
            balancer.terminate();
            balancer.wait(grace(&plan.balancer.server)).await;
        }
        for node in &mut self.nodes {
            node.terminate();
        }
        for node in &mut self.nodes {
            node.wait(grace(&plan.node.server)).await;
        }
    }

    /// Lets the order service write what the stopped nodes left in the
    /// stream, then stops it; returns the last look at the sale.
    async fn stop_orders(&mut self, observer: &Observer) -> Snapshot {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut look = observer.look().await;
        if let Some(orders) = self.orders.as_mut() {
            while !look.orders_written() && orders.exited().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
                look = observer.look().await;
            }
            orders.terminate();
            orders.wait(Duration::from_secs(5)).await;
        }
        look
    }

    /// Stops the Redis spike started, if it did.
    async fn stop_redis(&mut self) {
        if let Some(redis) = self.redis.as_mut() {
            redis.terminate();
            redis.wait(Duration::from_secs(5)).await;
        }
        // The sentinels first, so that they start no failover.
        for child in self.sentinel.iter_mut().rev() {
            child.terminate();
            child.wait(Duration::from_secs(5)).await;
        }
    }
}
