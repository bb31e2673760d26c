//! A real Redis Cluster on loopback for the cluster tests: 3 masters + 3 replicas, each a `Server` (see
//! `mod.rs`) started with `--cluster-enabled yes` and the module, joined by `redis-cli --cluster create
//! ... --cluster-replicas 1 --cluster-yes`, ready once every node reports `cluster_state:ok` and every
//! slot is served.
//!
//! One cluster per test binary: [`shared`] starts it on first use and hands out a lock (tests that kill,
//! stop or fail over nodes must not overlap), and an `atexit` hook kills the nodes when the binary exits
//! (a static is never dropped). Tests use their own key and tag names, and put the topology back the way
//! they found it when they change it ([`Cluster::heal`]).
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::common::{ms, now_ms, Conn, Proto, Server};

/// `cluster-node-timeout`: long enough that a busy 2-core VM never marks a healthy node failed (and a
/// test's short SIGSTOP does not trigger a failover), short enough for the kill test.
pub const NODE_TIMEOUT_MS: u64 = 3000;

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Flags include `fail` or `fail?`, or the link is down.
    pub failing: bool,
    pub master_id: Option<String>,
    /// Slot ranges (inclusive) this master serves.
    pub slots: Vec<(u16, u16)>,
}

pub struct Cluster {
    pub nodes: Vec<Server>,
}

static SHARED: OnceLock<Mutex<Option<Cluster>>> = OnceLock::new();

extern "C" {
    fn atexit(cb: extern "C" fn()) -> std::os::raw::c_int;
    fn kill(pid: i32, sig: i32) -> std::os::raw::c_int;
}

/// Linux signal numbers (no `kill` binary needed: minimal Debian images lack procps).
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

fn signal(pid: u32, sig: i32) -> bool {
    // SAFETY: sends a signal to a child process of ours; no memory is involved.
    unsafe { kill(pid as i32, sig) == 0 }
}

extern "C" fn kill_shared() {
    if let Some(m) = SHARED.get() {
        let taken = match m.lock() {
            Ok(mut g) => g.take(),
            Err(e) => e.into_inner().take(),
        };
        drop(taken);
    }
}

/// The binary's cluster, started on first use; the guard serializes the tests that use it.
pub fn shared() -> MutexGuard<'static, Option<Cluster>> {
    let m = SHARED.get_or_init(|| {
        // SAFETY: registers a plain extern "C" fn with no arguments, run once at process exit.
        unsafe { atexit(kill_shared) };
        Mutex::new(Some(Cluster::start()))
    });
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = g.as_mut() {
        c.heal();
    }
    g
}

fn port_pair_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
}

/// Six ports whose bus ports (+10000) are free too, below the ephemeral range.
fn pick_ports(n: usize) -> Vec<u16> {
    let seed = (std::process::id() as u64).wrapping_mul(2654435761) ^ now_ms() as u64;
    let mut p = 20000 + (seed % 20000) as u16;
    let mut out = Vec::new();
    while out.len() < n {
        p = if p >= 39990 { 20000 } else { p + 1 };
        if port_pair_free(p) {
            out.push(p);
        }
    }
    out
}

pub fn redis_cli() -> String {
    std::env::var("REDIS_CLI").unwrap_or_else(|_| "redis-cli".to_string())
}

/// Server arguments of every node (the module's cluster timeout is set per test when it matters).
pub fn node_args() -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        &NODE_TIMEOUT_MS.to_string(),
        "--cluster-require-full-coverage",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Cluster {
    pub fn start() -> Cluster {
        for _attempt in 0..3 {
            let ports = pick_ports(6);
            let args = node_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let started: Result<Vec<Server>, String> =
                ports.iter().map(|&p| Server::builder().port(p).args(&args).try_start()).collect();
            let Ok(nodes) = started else { continue };
            let mut cmd = Command::new(redis_cli());
            cmd.arg("--cluster").arg("create");
            for n in &nodes {
                cmd.arg(format!("127.0.0.1:{}", n.port));
            }
            let out = cmd.args(["--cluster-replicas", "1", "--cluster-yes"]).output().expect("run redis-cli --cluster create");
            assert!(
                out.status.success(),
                "redis-cli --cluster create failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let mut c = Cluster { nodes };
            c.wait_ok(Duration::from_secs(60));
            return c;
        }
        panic!("could not start a cluster (ports taken?)");
    }

    pub fn node(&self, port: u16) -> &Server {
        self.nodes.iter().find(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn node_mut(&mut self, port: u16) -> &mut Server {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap_or_else(|| panic!("no node on port {port}"))
    }

    pub fn conn(&self, port: u16, p: Proto) -> Conn {
        self.node(port).conn_proto(p)
    }

    /// `CLUSTER NODES` as seen from `port`.
    pub fn nodes_from(&self, port: u16) -> Vec<NodeInfo> {
        let mut c = self.conn(port, Proto::Resp2);
        let text = c.string(&crate::cmd!("CLUSTER", "NODES")).unwrap_or_default();
        parse_nodes(&text)
    }

    /// A running node's view of the topology.
    pub fn topology(&mut self) -> Vec<NodeInfo> {
        let port = self.nodes.iter_mut().find_map(|n| n.is_running().then_some(n.port)).expect("a running node");
        self.nodes_from(port)
    }

    /// Ports of the masters that serve slots.
    pub fn masters(&mut self) -> Vec<u16> {
        let mut m: Vec<u16> = self.topology().into_iter().filter(|n| n.master && !n.slots.is_empty()).map(|n| n.port).collect();
        m.sort_unstable();
        m
    }

    /// Node id of the node on `port` (CLUSTER MYID).
    pub fn id_of(&self, port: u16) -> String {
        self.conn(port, Proto::Resp2).string(&crate::cmd!("CLUSTER", "MYID")).unwrap_or_default()
    }

    /// Port of the replica of the master on `port`.
    pub fn replica_of(&mut self, port: u16) -> u16 {
        let topo = self.topology();
        let id = topo.iter().find(|n| n.port == port).map(|n| n.id.clone()).expect("master in topology");
        topo.iter().find(|n| n.master_id.as_deref() == Some(&id)).map(|n| n.port).expect("a replica")
    }

    /// The master port serving `key`.
    pub fn master_for(&mut self, key: &[u8]) -> u16 {
        let port = self.masters()[0];
        let slot = self.conn(port, Proto::Resp2).int(&crate::cmd!("CLUSTER", "KEYSLOT", key)) as u16;
        self.master_for_slot(slot)
    }

    pub fn slot_of(&mut self, key: &[u8]) -> u16 {
        let port = self.masters()[0];
        self.conn(port, Proto::Resp2).int(&crate::cmd!("CLUSTER", "KEYSLOT", key)) as u16
    }

    pub fn master_for_slot(&mut self, slot: u16) -> u16 {
        self.topology()
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|n| n.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// Waits until every running node says `cluster_state:ok`, all agree on 3 masters serving all
    /// 16384 slots, each with one connected replica, and no node is flagged failing.
    pub fn wait_ok(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.check_ok() {
                Ok(()) => return,
                Err(e) => e,
            };
            if Instant::now() > deadline {
                panic!("cluster not ok within {within:?}: {last}");
            }
            sleep(ms(100));
        }
    }

    fn check_ok(&mut self) -> Result<(), String> {
        let ports: Vec<u16> = self.nodes.iter_mut().filter_map(|n| n.is_running().then_some(n.port)).collect();
        if ports.len() != 6 {
            return Err(format!("{} nodes running", ports.len()));
        }
        let mut agreed = None;
        for &p in &ports {
            let info = self.conn(p, Proto::Resp2).string(&crate::cmd!("CLUSTER", "INFO")).unwrap_or_default();
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return Err(format!("node {p}: {info}"));
            }
            let topo = self.nodes_from(p);
            let masters: Vec<&NodeInfo> = topo.iter().filter(|n| n.master && !n.slots.is_empty()).collect();
            if topo.len() != 6 || masters.len() != 3 || topo.iter().any(|n| n.failing) {
                return Err(format!("node {p} sees {topo:?}"));
            }
            if masters.iter().any(|m| !topo.iter().any(|n| n.master_id.as_deref() == Some(&m.id))) {
                return Err(format!("node {p}: a master without replica: {topo:?}"));
            }
            let map = slot_map(&topo);
            match &agreed {
                None => agreed = Some(map),
                Some(a) if *a != map => return Err(format!("nodes disagree on the slots: {a:?} vs {map:?} (from {p})")),
                Some(_) => {}
            }
            let role = self.conn(p, Proto::Resp2).string(&crate::cmd!("INFO", "replication")).unwrap_or_default();
            if role.contains("role:slave") && !role.contains("master_link_status:up") {
                return Err(format!("replica {p} link down"));
            }
        }
        Ok(())
    }

    /// Brings the cluster back to health after a test that changed it: restarts nodes that are not
    /// running (they rejoin from nodes.conf), resumes stopped ones, waits for `wait_ok`, and turns
    /// automatic failover off on every node.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            if let Some(pid) = n.pid() {
                signal(pid, SIGCONT);
            }
            if !n.is_running() {
                n.restart();
            }
        }
        self.wait_ok(Duration::from_secs(60));
        // No automatic failover unless a test asks for it (`allow_failover`): on a busy 2-core VM a
        // starved node may miss the node timeout, and a spurious failover would break other tests.
        // CLUSTER FAILOVER still works. (Set here, not on the command line: the flag shows in CLUSTER
        // NODES as `nofailover`, which the client's harness must not mistake for a failure.)
        for n in &self.nodes {
            n.conn_proto(Proto::Resp2).ok(&crate::cmd!("CONFIG", "SET", "cluster-replica-no-failover", "yes"));
        }
    }

    /// Lets the replica on `port` take over automatically when its master fails (until `heal`).
    pub fn allow_failover(&self, port: u16) {
        self.conn(port, Proto::Resp2).ok(&crate::cmd!("CONFIG", "SET", "cluster-replica-no-failover", "no"));
    }

    /// Sends SIGSTOP (true) or SIGCONT (false) to the node on `port`.
    pub fn pause(&self, port: u16, stop: bool) {
        let pid = self.node(port).pid().expect("running node");
        assert!(signal(pid, if stop { SIGSTOP } else { SIGCONT }), "signal {pid}");
    }
}

/// Master port -> its slot ranges, sorted.
fn slot_map(topo: &[NodeInfo]) -> Vec<(u16, Vec<(u16, u16)>)> {
    let mut m: Vec<(u16, Vec<(u16, u16)>)> =
        topo.iter().filter(|n| n.master && !n.slots.is_empty()).map(|n| (n.port, n.slots.clone())).collect();
    m.sort();
    m
}

pub fn parse_nodes(text: &str) -> Vec<NodeInfo> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let port = f[1].split('@').next().and_then(|a| a.rsplit(':').next()).and_then(|p| p.parse().ok()).unwrap_or(0);
        let flags: Vec<&str> = f[2].split(',').collect();
        let mut slots = Vec::new();
        for s in &f[8..] {
            if s.starts_with('[') {
                continue; // a slot being migrated or imported
            }
            let mut it = s.split('-');
            let a: Option<u16> = it.next().and_then(|x| x.parse().ok());
            let b: Option<u16> = it.next().and_then(|x| x.parse().ok()).or(a);
            if let (Some(a), Some(b)) = (a, b) {
                slots.push((a, b));
            }
        }
        out.push(NodeInfo {
            id: f[0].to_string(),
            port,
            master: flags.contains(&"master"),
            failing: flags.iter().any(|x| x.starts_with("fail") || *x == "noaddr") || f[7] != "connected",
            master_id: (f[3] != "-").then(|| f[3].to_string()),
            slots,
        });
    }
    out
}

/// Key name -> value read back through the cluster (following the key's master), for checkers.
pub type Snapshot = HashMap<Vec<u8>, Option<Vec<u8>>>;
