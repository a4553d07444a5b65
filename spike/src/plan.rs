//! What `spike up` starts, read from the configuration directory: the
//! Redis, the sale, one node per upstream of the balancer on this machine,
//! the order service, and the balancer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use spike_config::{BalancerConfig, NodeConfig, OrdersConfig};

/// The files of a configuration directory.
pub const BALANCER_FILE: &str = "balancer.toml";
pub const NODE_FILE: &str = "node.toml";
/// Optional: without it, the order service has its defaults.
pub const ORDERS_FILE: &str = "orders.toml";

/// Everything `spike up` starts, and how.
#[derive(Debug, Clone)]
pub struct Plan {
    pub node_file: PathBuf,
    pub balancer_file: PathBuf,
    pub node: NodeConfig,
    pub balancer: BalancerConfig,
    /// `orders.toml`, if the directory has one.
    pub orders_file: Option<PathBuf>,
    /// The order service's settings; its Redis and sale are the nodes'.
    pub orders: OrdersConfig,
    /// Tickets in the sale.
    pub total: u64,
    /// The nodes to start, in the balancer's order.
    pub nodes: Vec<NodePlan>,
    /// Upstreams of the balancer that are not on this machine.
    pub remote: Vec<SocketAddr>,
}

/// One node to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    pub name: String,
    pub addr: SocketAddr,
    pub weight: u32,
    /// Its share of the total by weight, plus the buffer.
    pub local_stock: u64,
}

impl Plan {
    /// Reads `dir/node.toml` and `dir/balancer.toml` and plans a sale of
    /// `total` tickets (the node file's `total_stock` if `None`).
    pub fn read(dir: &Path, total: Option<u64>) -> anyhow::Result<Self> {
        let node_file = dir.join(NODE_FILE);
        let balancer_file = dir.join(BALANCER_FILE);
        let node = NodeConfig::load(&node_file)?;
        let balancer = BalancerConfig::load(&balancer_file)?;
        let orders_file = Some(dir.join(ORDERS_FILE)).filter(|file| file.exists());
        let mut orders = match &orders_file {
            Some(file) => OrdersConfig::load(file)?,
            None => OrdersConfig::default(),
        };
        orders.redis = node.redis.clone();
        orders.event = node.event.clone();
        let total = total.unwrap_or(node.total_stock);
        let (local, remote): (Vec<_>, Vec<_>) = balancer
            .upstreams
            .iter()
            .map(|upstream| (upstream.addr, upstream.weight))
            .partition(|&(addr, _)| on_this_machine(addr));
        let nodes = shares(total, &local)
            .into_iter()
            .map(|(addr, weight, local_stock)| NodePlan {
                name: format!("node-{}", addr.port()),
                addr,
                weight,
                local_stock,
            })
            .collect();
        Ok(Self {
            node_file,
            balancer_file,
            node,
            balancer,
            orders_file,
            orders,
            total,
            nodes,
            remote: remote.into_iter().map(|(addr, _)| addr).collect(),
        })
    }

    /// Checks that no address the plan listens on is taken.
    pub fn check_ports(&self) -> anyhow::Result<()> {
        let mut wanted: Vec<(SocketAddr, String)> = self
            .nodes
            .iter()
            .map(|n| (n.addr, n.name.clone()))
            .collect();
        wanted.push((self.balancer.listen, "the balancer's listen".to_owned()));
        wanted.push((self.balancer.admin, "the balancer's admin".to_owned()));
        wanted.push((self.orders.admin, "the order service's admin".to_owned()));
        for (addr, what) in wanted {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("{addr} ({what}) is already in use or cannot be bound"))?;
        }
        Ok(())
    }
}

/// Each upstream's local stock: its share of `total` by weight, plus a
/// buffer large enough for the others to sell the largest share should
/// its node die before selling any of it. Weight 0 gets the buffer only.
pub fn shares(total: u64, upstreams: &[(SocketAddr, u32)]) -> Vec<(SocketAddr, u32, u64)> {
    let weight_sum: u64 = upstreams.iter().map(|&(_, w)| u64::from(w)).sum();
    let share = |weight: u32| {
        if weight_sum == 0 {
            0
        } else {
            (total * u64::from(weight)).div_ceil(weight_sum)
        }
    };
    let largest = upstreams.iter().map(|&(_, w)| share(w)).max().unwrap_or(0);
    let others = (upstreams.len() as u64).saturating_sub(1);
    let buffer = if others == 0 {
        0
    } else {
        largest.div_ceil(others)
    };
    upstreams
        .iter()
        .map(|&(addr, weight)| (addr, weight, (share(weight) + buffer).max(1)))
        .collect()
}

/// Whether `spike` can start a node on `addr`: a loopback or unspecified
/// address.
fn on_this_machine(addr: SocketAddr) -> bool {
    addr.ip().is_loopback() || addr.ip().is_unspecified()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn shares_follow_the_weights_and_the_buffer_covers_the_largest() {
        let upstreams = [(addr(1), 1), (addr(2), 2), (addr(3), 3), (addr(4), 4)];
        let locals: Vec<u64> = shares(10_000, &upstreams).iter().map(|s| s.2).collect();
        // Shares 1000..4000; a buffer of 4000 / 3, rounded up.
        assert_eq!(locals, [2_334, 3_334, 4_334, 5_334]);
        // Whichever node dies unsold, the others can still sell the total.
        for dead in 0..4 {
            let rest: u64 = locals
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != dead)
                .map(|(_, l)| l)
                .sum();
            assert!(rest >= 10_000);
        }
    }

    #[test]
    fn equal_weights_give_the_seed_articles_split() {
        let upstreams = [(addr(1), 1), (addr(2), 1), (addr(3), 1), (addr(4), 1)];
        let locals: Vec<u64> = shares(10_000, &upstreams).iter().map(|s| s.2).collect();
        assert_eq!(locals, [3_334; 4]);
        assert_eq!(
            shares(500, &[(addr(1), 1)])[0].2,
            500,
            "one node: no buffer"
        );
    }

    #[test]
    fn the_shipped_configuration_plans_four_nodes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let plan = Plan::read(&dir, None).unwrap();
        assert_eq!(plan.total, 10_000);
        let nodes: Vec<_> = plan
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.weight))
            .collect();
        assert_eq!(
            nodes,
            [
                ("node-3001", 1),
                ("node-3002", 2),
                ("node-3003", 3),
                ("node-3004", 4)
            ]
        );
        assert!(plan.remote.is_empty());
    }
}
