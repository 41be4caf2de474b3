//! A Redis Cluster of a test's own: three masters with one replica each, on loopback ports,
//! started with `redis-server --cluster-enabled yes` and joined by `redis-cli --cluster
//! create … --cluster-replicas 1`, stopped (every node killed, directories removed) on drop.
//!
//! Node timeout is 2 s, so a killed master's replica is promoted within a few seconds.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{OwnRedis, free_port, temp_dir};

/// Hash slots of a cluster.
pub const SLOTS: u16 = 16_384;

/// A node as `CLUSTER NODES` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node id.
    pub id: String,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    /// Whether it is a master (else a replica).
    pub master: bool,
    /// Whether the cluster considers it failed (`fail` flag).
    pub failed: bool,
    /// The slot ranges it serves (masters), inclusive.
    pub slots: Vec<(u16, u16)>,
}

/// Three masters and three replicas of a test's own.
pub struct OwnCluster {
    /// Every node, in the order they were created (the first three start as masters).
    pub nodes: Vec<Option<OwnRedis>>,
    /// The port of each node, running or not.
    all_ports: Vec<u16>,
    dir: PathBuf,
}

impl OwnCluster {
    /// Starts six nodes and creates the cluster; returns once every slot is served and every
    /// node reports `cluster_state:ok` (at most 60 s).
    ///
    /// # Panics
    /// When `redis-server` / `redis-cli` are missing or the cluster does not form.
    pub fn start(tag: &str) -> Self {
        assert!(
            crate::installed("redis-cli"),
            "a cluster test needs redis-cli (Debian: apt install redis-tools)"
        );
        let dir = temp_dir(&format!("cluster-{tag}"));
        let mut nodes = Vec::new();
        for i in 0..6 {
            let port = cluster_port();
            nodes.push(Some(start_node(&dir, i, port)));
        }
        let addresses: Vec<String> = nodes
            .iter()
            .flatten()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let all_ports = nodes.iter().flatten().map(|n| n.port).collect();
        let cluster = Self {
            nodes,
            all_ports,
            dir,
        };
        cluster.wait_until_ok(Duration::from_secs(60));
        cluster.wait_for_replicas(Duration::from_secs(60));
        cluster
    }

    /// The ports of the nodes still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().flatten().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:{port}` of every running node (seeds for a cluster client).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().flatten().map(OwnRedis::url).collect()
    }

    /// The cluster as the first running node sees it.
    pub fn topology(&self) -> Vec<ClusterNode> {
        let port = self.ports()[0];
        parse_nodes(&cli(port, &["CLUSTER", "NODES"]))
    }

    /// The port of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> Option<u16> {
        self.topology()
            .into_iter()
            .find(|n| n.master && !n.failed && n.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .map(|n| n.port)
    }

    /// Adds a fresh node as a replica of the master with the fewest replicas (after a
    /// failover: the promoted master, which has none), as an operator replaces a dead node
    /// (`redis-cli --cluster add-node … --cluster-slave`); returns once it is in sync. Returns
    /// its port.
    ///
    /// # Panics
    /// When the node cannot be added or does not sync within 60 s.
    pub fn add_replica(&mut self) -> u16 {
        let port = cluster_port();
        let i = self.all_ports.len();
        self.nodes.push(Some(start_node(&self.dir, i, port)));
        self.all_ports.push(port);
        let existing = self
            .ports()
            .into_iter()
            .find(|p| *p != port)
            .expect("a running node");
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("add-node")
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{existing}"))
            .arg("--cluster-slave")
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster add-node failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let started = Instant::now();
        while !cli(port, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the new replica on {port} did not sync (logs under {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        port
    }

    /// Kills (SIGKILL) the node on `port`, as a crash.
    pub fn kill(&mut self, port: u16) {
        for slot in &mut self.nodes {
            if slot.as_ref().is_some_and(|n| n.port == port)
                && let Some(mut node) = slot.take()
            {
                node.kill();
            }
        }
    }

    /// Waits until every running node reports `cluster_state:ok`, running masters serve all
    /// slots (a killed master's replica has taken over), and every node not failed is a
    /// replica or a master with slots (a fresh replica is listed as an empty master until it
    /// attaches); returns how long that took.
    ///
    /// # Panics
    /// After `timeout`.
    pub fn wait_until_ok(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let ok = self
                .ports()
                .iter()
                .all(|&p| cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
                && settled(&self.topology(), &self.ports());
            if ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "the cluster is not ok after {timeout:?}: {:?} (logs under {})",
                self.topology(),
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every replica's link to its master is up (a replica that never synced
    /// would not be promoted: its data counts as too old).
    ///
    /// # Panics
    /// After `timeout`.
    pub fn wait_for_replicas(&self, timeout: Duration) {
        let started = Instant::now();
        loop {
            let replicas: Vec<u16> = self
                .topology()
                .into_iter()
                .filter(|n| !n.master && !n.failed)
                .map(|n| n.port)
                .collect();
            if replicas
                .iter()
                .all(|&p| cli(p, &["INFO", "replication"]).contains("master_link_status:up"))
            {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "replicas not in sync after {timeout:?} (logs under {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`, hash tags included).
    pub fn keyslot(&self, key: &str) -> u16 {
        cli(self.ports()[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// All slots served by running masters, and no empty master among the nodes not failed.
fn settled(nodes: &[ClusterNode], running: &[u16]) -> bool {
    served_slots(nodes) == u32::from(SLOTS)
        && nodes
            .iter()
            .all(|n| n.failed || !n.master || (!n.slots.is_empty() && running.contains(&n.port)))
}

/// Slots served by masters not marked failed.
fn served_slots(nodes: &[ClusterNode]) -> u32 {
    nodes
        .iter()
        .filter(|n| n.master && !n.failed)
        .flat_map(|n| n.slots.iter())
        .map(|&(a, b)| u32::from(b - a) + 1)
        .sum()
}

/// Runs `redis-cli -p port args…` and returns its output (empty when it fails).
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Parses `CLUSTER NODES`: `id ip:port@bus flags master-id ping pong epoch state slots…`.
fn parse_nodes(text: &str) -> Vec<ClusterNode> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let id = parts.next()?.to_owned();
            let address = parts.next()?;
            let port = address
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags = parts.next()?;
            let slots = parts
                .skip(5)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(ClusterNode {
                id,
                port,
                master: flags.contains("master"),
                failed: flags.split(',').any(|f| f == "fail"),
                slots,
            })
        })
        .collect()
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// Starts node `i` of the cluster in its own directory under `dir`, on `port`.
fn start_node(dir: &std::path::Path, i: usize, port: u16) -> OwnRedis {
    let node_dir = dir.join(format!("node{i}"));
    std::fs::create_dir_all(&node_dir).expect("node directory");
    OwnRedis::start(
        port,
        &node_dir,
        &[
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_parse() {
        let text = "07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected\n\
                    e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460 6000\n\
                    67ed 127.0.0.1:30002@40002 master,fail - 1426238316232 1426238315228 2 connected 5461-10922 [5462->-abc]\n";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 3);
        assert!(!nodes[0].master && nodes[0].port == 30004 && nodes[0].slots.is_empty());
        assert_eq!(nodes[1].slots, vec![(0, 5460), (6000, 6000)]);
        assert!(nodes[2].master && nodes[2].failed);
        assert_eq!(served_slots(&nodes), 5461 + 1);
    }
}
