//! A real Redis Cluster on loopback for the client's tests: 3 masters + 3 replicas, each with the module
//! loaded, started by the module tests' harness (`tests/common/cluster.rs`) and owned here: every server
//! is killed when the [`Cluster`] is dropped. Helpers by node index for the client's scenarios.
//!
//! Include after the server guard: `#[path = "../../tests/common/mod.rs"] mod common;` then
//! `#[path = "common/cluster.rs"] mod cluster;`.

use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::Server;

#[path = "../../../tests/common/cluster.rs"]
mod harness;

pub struct Cluster {
    pub nodes: Vec<Server>,
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("redis-cli: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

impl Cluster {
    /// Starts 6 nodes and creates the cluster (3 masters, each with one replica) with the module's test
    /// harness (`tests/common/cluster.rs`: ports whose bus ports are free too), owned by this value.
    pub fn start() -> Cluster {
        let harness::Cluster { nodes } = harness::Cluster::start();
        let c = Cluster { nodes };
        c.wait_ok();
        c
    }

    /// `redis://127.0.0.1:port` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect()
    }

    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        cli(self.nodes[i].port, args)
    }

    /// Waits until every running node says `cluster_state:ok` and agrees on the masters.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|n| cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let views: Vec<String> = self.nodes.iter().map(|n| self.masters_seen_by(n.port).join(",")).collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) && views[0].split(',').count() == 3 {
                return;
            }
            assert!(Instant::now() < deadline, "cluster not ok after 30 s: {views:?}");
            sleep(Duration::from_millis(100));
        }
    }

    fn masters_seen_by(&self, port: u16) -> Vec<String> {
        let mut m: Vec<String> = cli(port, &["CLUSTER", "NODES"])
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| l.split(' ').nth(1).map(|a| a.split('@').next().unwrap_or(a).to_string()))
            .collect();
        m.sort();
        m
    }

    /// Index of the node serving `slot` as master (as node `via` sees it).
    pub fn master_of_slot(&self, via: usize, slot: u16) -> usize {
        let nodes = self.cli(via, &["CLUSTER", "NODES"]);
        for l in nodes.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 9 || !f[2].contains("master") {
                continue;
            }
            let serves = f[8..].iter().any(|r| match r.split_once('-') {
                Some((lo, hi)) => lo.parse::<u16>().is_ok_and(|lo| lo <= slot) && hi.parse::<u16>().is_ok_and(|hi| slot <= hi),
                None => r.parse::<u16>() == Ok(slot),
            });
            if serves {
                let port: u16 =
                    f[1].split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).expect("port");
                return self.nodes.iter().position(|n| n.port == port).expect("a node of this cluster");
            }
        }
        panic!("slot {slot} not served:\n{nodes}");
    }

    /// Index of a replica of master `m`.
    pub fn replica_of(&self, m: usize) -> usize {
        let id = self.id(m);
        (0..self.nodes.len())
            .find(|&i| {
                self.cli(i, &["CLUSTER", "NODES"]).lines().any(|l| l.contains("myself") && l.contains("slave") && l.contains(&id))
            })
            .expect("a replica of the master")
    }

    pub fn id(&self, i: usize) -> String {
        self.cli(i, &["CLUSTER", "MYID"]).trim().to_string()
    }
}
