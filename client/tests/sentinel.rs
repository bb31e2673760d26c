//! Sentinel mode against a real Sentinel (`redis-server sentinel.conf --sentinel`) watching a master
//! and a replica (both with the module): the cache finds the master through the Sentinel, and after
//! `SENTINEL FAILOVER` it follows the promoted replica, with L1 dropped and reads working.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Server;
use tiercache_client::{Opts, TierCache};

/// A Sentinel process, killed on drop.
struct Sentinel {
    port: u16,
    child: Child,
    dir: std::path::PathBuf,
}

impl Sentinel {
    fn start(master_port: u16) -> Sentinel {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let dir = std::env::temp_dir().join(format!("tiercache-sentinel-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds mymaster 2000\nsentinel failover-timeout mymaster 10000\n",
                dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new(common::redis_server())
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let s = Sentinel { port, child, dir };
        s.wait(|s| s.cli(&["SENTINEL", "REPLICAS", "mymaster"]).contains("127.0.0.1"), "the Sentinel knows the replica");
        s
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn master_port(&self) -> String {
        self.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"]).lines().nth(1).unwrap_or_default().trim().to_string()
    }

    fn wait(&self, f: impl Fn(&Sentinel) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f(self) {
            assert!(Instant::now() < deadline, "not within 30 s: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    let out =
        Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tests of this file run one at a time: two Sentinel setups side by side on this loaded machine made
/// `SENTINEL FAILOVER` answer without `OK` in the failover test (each passes alone).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_master_through_a_failover() {
    let _serial = SERIAL.lock().await;
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let sentinel = Sentinel::start(master.port);
    let c = TierCache::builder_sentinel([format!("redis://127.0.0.1:{}", sentinel.port)], "mymaster")
        .namespace("sn")
        .build()
        .await
        .expect("sentinel cache");
    let loads = Arc::new(AtomicU32::new(0));
    let read = |k: &'static str| {
        let (c, loads) = (c.clone(), loads.clone());
        async move {
            c.get_or_load(k, &Opts::default().ttl(Duration::from_secs(60)), move || async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>(format!("value-{k}"))
            })
            .await
            .expect("get_or_load")
        }
    };
    for k in ["a", "b", "c"] {
        assert_eq!(read(k).await, format!("value-{k}"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3);
    assert!(cli(master.port, &["TIERCACHE.GET", "sn:v1:a"]).contains("value-a"), "the cache writes to the Sentinel's master");
    let hits = c.metrics().l1_hits;
    assert_eq!(read("a").await, "value-a");
    assert_eq!(c.metrics().l1_hits, hits + 1, "L1 serves before the failover");

    cli(master.port, &["WAIT", "1", "5000"]);
    let resets = c.metrics().l1_resets;
    // Refused (-NOGOODSLAVE) until the Sentinel has its own link to the replica and a fresh INFO from
    // it, which can come after it first lists the replica: ask again, as an operator would.
    sentinel.wait(|s| s.cli(&["SENTINEL", "FAILOVER", "mymaster"]).contains("OK"), "SENTINEL FAILOVER accepted");
    let new_port = replica.port.to_string();
    sentinel.wait(|s| s.master_port() == new_port, "the Sentinel names the replica");
    // The old master is reconfigured (and its clients killed); the cache reconnects through the Sentinel.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = c.get::<String>("a").await;
        if c.metrics().l1_resets > resets {
            break;
        }
        assert!(Instant::now() < deadline, "the cache did not reconnect with L1 dropped after the failover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for k in ["a", "b", "c"] {
        assert_eq!(read(k).await, format!("value-{k}"));
    }
    assert_eq!(loads.load(Ordering::SeqCst), 3, "the promoted replica serves the same entries: {:?}", c.metrics());
    c.set("d", &"after".to_string(), &Opts::default()).await.expect("set after the failover");
    assert!(cli(replica.port, &["TIERCACHE.GET", "sn:v1:d"]).contains("after"), "writes go to the new master");
}

/// `Tracking::ReadKeys` through Sentinel: the feed opened on the master the Sentinel names tracks the
/// keys read on it (the server counts tracked keys, which BCAST never does), and another writer's
/// change of such a key reaches this cache's L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_keys_tracking_through_sentinel() {
    let _serial = SERIAL.lock().await;
    let master = Server::start();
    let _replica = master.start_replica(Server::builder());
    let sentinel = Sentinel::start(master.port);
    let r = TierCache::builder_sentinel([format!("redis://127.0.0.1:{}", sentinel.port)], "mymaster")
        .namespace("rk")
        .tracking(tiercache_client::Tracking::ReadKeys)
        .build()
        .await
        .expect("sentinel cache");
    let w = TierCache::builder(format!("redis://127.0.0.1:{}", master.port)).namespace("rk").build().await.expect("writer");
    let o = Opts::default().ttl(Duration::from_secs(60));
    w.set("k", &"v1".to_string(), &o).await.expect("set");
    let none = || async { Err::<String, String>("no load".into()) };
    assert_eq!(r.get_or_load("k", &o, none).await.expect("read"), "v1");
    let hits = r.metrics().l1_hits;
    assert_eq!(r.get_or_load("k", &o, none).await.expect("read"), "v1");
    assert_eq!(r.metrics().l1_hits, hits + 1, "an L1 hit");
    let info = master.conn().info("stats");
    let tracked: i64 = common::info_field(&info, "tracking_total_keys").expect("tracking_total_keys").parse().expect("number");
    assert!(tracked >= 1, "the master tracks the key read (no BCAST): {tracked}");
    let heard = r.metrics().invalidations_received;
    w.set("k", &"v2".to_string(), &o).await.expect("set");
    let deadline = Instant::now() + Duration::from_secs(15);
    while r.metrics().invalidations_received == heard {
        assert!(Instant::now() < deadline, "the read key's invalidation did not arrive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(r.get_or_load("k", &o, none).await.expect("read"), "v2");
}
