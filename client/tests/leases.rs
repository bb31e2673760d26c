//! Fill leases and the connections holding them. The server ends a lease when the connection that took
//! it closes, so the client must keep that connection until the lease's fill (`SET ... LEASE`) or
//! release has been answered: neither the pool's size limit nor a failure of the main connection may
//! drop it first. A lease lost that way makes the fill FENCED and the value loaded twice.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_client::{Opts, TierCache};
use tokio::sync::watch;

type LoadFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Loads per key, shared by every instance (the "database").
struct Db {
    loads: Vec<AtomicU32>,
    /// Loaders that have started (and hold their lease).
    started: AtomicUsize,
}

impl Db {
    fn new(keys: usize) -> Arc<Db> {
        Arc::new(Db { loads: (0..keys).map(|_| AtomicU32::new(0)).collect(), started: AtomicUsize::new(0) })
    }

    /// A loader of key `k` that counts its run, then waits until `gate` opens.
    fn loader(self: &Arc<Db>, k: usize, gate: &watch::Receiver<bool>) -> impl FnOnce() -> LoadFuture + Send + 'static {
        let (db, mut gate) = (self.clone(), gate.clone());
        move || {
            Box::pin(async move {
                db.loads[k].fetch_add(1, Ordering::SeqCst);
                db.started.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                Ok(format!("v{k}"))
            })
        }
    }

    fn loads(&self) -> Vec<u32> {
        self.loads.iter().map(|n| n.load(Ordering::SeqCst)).collect()
    }

    /// Waits until `n` loaders run (a hang guard, not a timing assertion).
    async fn wait_started(&self, n: usize) {
        let t0 = Instant::now();
        while self.started.load(Ordering::SeqCst) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "only {} of {n} loaders started",
                self.started.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn opts() -> Opts {
    Opts::default().ttl(Duration::from_secs(300))
}

/// Starts `get_or_load` of keys `k0..kN` on `cache`, each loader blocked until `gate` opens.
fn spawn_misses(
    cache: &TierCache,
    db: &Arc<Db>,
    keys: usize,
    gate: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<Result<String, tiercache_client::Error<String>>>> {
    (0..keys)
        .map(|k| {
            let (c, load) = (cache.clone(), db.loader(k, gate));
            tokio::spawn(async move { c.get_or_load(&format!("k{k}"), &opts(), load).await })
        })
        .collect()
}

/// After the fills: every value was returned, nothing was fenced, and another instance (empty L1)
/// finds every key in Redis: exactly one load per key.
async fn check_one_load_per_key(
    server: &common::Server,
    url: &str,
    cache: &TierCache,
    db: &Arc<Db>,
    handles: Vec<tokio::task::JoinHandle<Result<String, tiercache_client::Error<String>>>>,
) {
    let keys = handles.len();
    for (k, h) in handles.into_iter().enumerate() {
        let v = h.await.expect("task").unwrap_or_else(|e| panic!("k{k}: {e}"));
        assert_eq!(v, format!("v{k}"));
    }
    let m = cache.metrics();
    println!("loading instance: {m:?}");
    let mut c = server.conn();
    let stats = c.stats();
    assert_eq!(m.fenced, 0, "fills fenced: their leases were lost with the connection that held them");
    assert_eq!(stats.get("fenced"), 0, "FENCED replies counted by the server");
    assert_eq!(stats.get("leases"), 0, "every lease was filled");

    let other = TierCache::builder(url).namespace("lc").build().await.unwrap();
    let (_open, closed) = watch::channel(true);
    for k in 0..keys {
        assert_eq!(other.get_or_load(&format!("k{k}"), &opts(), db.loader(k, &closed)).await.unwrap(), format!("v{k}"));
    }
    assert_eq!(other.metrics().l2_hits, keys as u64, "another instance reads every key from Redis");
    let loads = db.loads();
    let twice: Vec<_> = loads.iter().enumerate().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "keys not loaded exactly once (key, loads): {twice:?}");
}

/// 64 concurrent misses of distinct keys (4 times the idle pool's size): every lease connection is
/// kept until its fill, so each key is loaded once and no fill is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_misses_load_each_key_once() {
    const KEYS: usize = 64;
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    // A long lease: the leases must not end by themselves while the test holds the loaders.
    let a = TierCache::builder(&url).namespace("lc").lease_timeout(Duration::from_secs(50)).build().await.unwrap();
    let db = Db::new(KEYS);
    let (open, gate) = watch::channel(false);
    let handles = spawn_misses(&a, &db, KEYS, &gate);

    // Every loader runs: each caller has had its FILL reply and holds its lease.
    db.wait_started(KEYS).await;
    let held = server.conn().stats().get("leases");
    assert_eq!(held, KEYS as i64, "leases still held while their loaders run");
    open.send_replace(true);
    check_one_load_per_key(&server, &url, &a, &db, handles).await;
}

/// The main connection times out (Redis paused for writes) while loaders hold leases: the fills that
/// follow still land, since the lease connections are not dropped with the main connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_main_connection_timeout_keeps_the_leases() {
    // Under the idle pool's size, so that only the main connection's failure could drop them.
    const KEYS: usize = 8;
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url)
        .namespace("lc")
        .lease_timeout(Duration::from_secs(50))
        .op_timeout(Duration::from_millis(300))
        .circuit_breaker(1000, Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let db = Db::new(KEYS);
    let (open, gate) = watch::channel(false);
    let handles = spawn_misses(&a, &db, KEYS, &gate);
    db.wait_started(KEYS).await;

    // CLIENT PAUSE WRITE (answered once the pause is on) holds A's next write until CLIENT UNPAUSE:
    // A's main connection times out, deterministically, whatever the machine's speed.
    let mut c = server.conn();
    c.ok(&cmd!("CLIENT", "PAUSE", 600_000, "WRITE"));
    let errors = a.metrics().redis_errors;
    let r = a.set("probe", &"x".to_string(), &opts()).await;
    assert!(r.is_err(), "a write during CLIENT PAUSE WRITE times out: {r:?}");
    assert!(a.metrics().redis_errors > errors, "the timeout counted as a Redis failure");
    c.ok(&cmd!("CLIENT", "UNPAUSE"));

    assert_eq!(c.stats().get("leases"), KEYS as i64, "leases still held after the main connection's timeout");
    open.send_replace(true);
    check_one_load_per_key(&server, &url, &a, &db, handles).await;
}
