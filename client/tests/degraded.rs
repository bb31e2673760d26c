//! Redis killed mid-test: calls keep succeeding through the loader, L1 keeps serving, and once Redis is
//! back on the same port, L2 and the invalidations are used again.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_client::{Opts, TierCache};

const OP_TIMEOUT: Duration = Duration::from_millis(200);
const COOLDOWN: Duration = Duration::from_millis(300);

async fn build(url: &str) -> TierCache {
    TierCache::builder(url).namespace("deg").op_timeout(OP_TIMEOUT).circuit_breaker(2, COOLDOWN).build().await.unwrap()
}

fn opts() -> Opts {
    Opts::default().ttl(Duration::from_secs(60))
}

/// A loader returning `v` and counting its runs.
fn loader(
    runs: &Arc<AtomicU32>,
    v: impl Into<String>,
) -> impl FnOnce() -> std::future::Ready<Result<String, std::io::Error>> + Send + 'static {
    let runs = runs.clone();
    let v = v.into();
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(v))
    }
}

/// Reads `key` and asserts the read was an L1 hit that did not run the loader.
async fn assert_l1_hit(c: &TierCache, runs: &Arc<AtomicU32>, key: &str, expected: &str, what: &str) {
    let hits = c.metrics().l1_hits;
    let before = runs.load(Ordering::SeqCst);
    let got = c.get_or_load(key, &opts(), loader(runs, "RELOADED")).await.expect("get_or_load");
    assert_eq!(got, expected, "{what}: value of {key}");
    assert_eq!(runs.load(Ordering::SeqCst), before, "{what}: {key} ran the loader instead of being served by L1");
    assert_eq!(c.metrics().l1_hits, hits + 1, "{what}: {key} was not an L1 hit");
}

/// Polls `key` through `c` (every 10 ms, at most `within`) until it reads `expected`.
async fn eventually_reads(c: &TierCache, key: &str, o: &Opts, expected: &str, within: Duration) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut last = String::new();
    while t0.elapsed() < within {
        let runs = Arc::new(AtomicU32::new(0));
        last = c.get_or_load(key, o, loader(&runs, expected)).await.expect("get_or_load");
        if last == expected {
            return Ok(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("{key}: still {last:?} after {within:?}, expected {expected:?}"))
}

/// Kills Redis and gives the clients a moment to notice the lost connection.
async fn kill(server: &mut common::Server) {
    server.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Restarts Redis on the same port and waits until `b` can write again.
async fn restart_and_wait(server: &mut common::Server, b: &TierCache) {
    server.restart();
    let t0 = Instant::now();
    loop {
        match b.set("probe", &"up".to_string(), &opts()).await {
            Ok(()) => break,
            Err(e) => assert!(t0.elapsed() < Duration::from_secs(5), "B cannot write after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Calls succeed through the loader while Redis is down, the degraded metrics move, and values loaded
/// during the outage are served by L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_calls_succeed_through_the_loader() {
    let mut server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = build(&url).await;
    let runs = Arc::new(AtomicU32::new(0));
    assert_eq!(a.get_or_load("warm", &opts(), loader(&runs, "w")).await.unwrap(), "w");
    kill(&mut server).await;

    let m0 = a.metrics();
    let mut saw_degraded = false;
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        let got = a.get_or_load(&format!("down{i}"), &opts(), loader(&runs, format!("down{i}-v"))).await;
        slowest = slowest.max(t.elapsed());
        match got {
            Ok(v) => assert_eq!(v, format!("down{i}-v")),
            Err(e) => panic!("get_or_load down{i} with Redis down returned an error: {e}"),
        }
        saw_degraded |= a.metrics().degraded == 1;
    }
    let m1 = a.metrics();
    println!("outage: slowest call {slowest:?}; metrics before {m0:?}\nafter {m1:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 11, "each outage read ran its loader once");
    assert!(m1.redis_errors > m0.redis_errors, "redis_errors did not move: {m0:?} -> {m1:?}");
    assert_eq!(m1.degraded_loads - m0.degraded_loads, 10, "degraded_loads: {m0:?} -> {m1:?}");
    assert!(saw_degraded, "metrics().degraded never showed the open circuit (threshold 2): {m1:?}");
    assert!(slowest < Duration::from_secs(1), "a degraded call took {slowest:?} (op_timeout {OP_TIMEOUT:?})");

    // L1 keeps serving what was loaded during the outage.
    for i in 0..10 {
        assert_l1_hit(&a, &runs, &format!("down{i}"), &format!("down{i}-v"), "during the outage").await;
    }
    // Still after the breaker's cooldown (a probe of Redis fails again meanwhile).
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    let got = a.get_or_load("down-late", &opts(), loader(&runs, "late")).await.expect("a read after the cooldown");
    assert_eq!(got, "late");
    assert_l1_hit(&a, &runs, "down0", "down0-v", "after a failed probe").await;
}

/// L1 keeps serving a value cached before Redis died (the loader is not run for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_l1_keeps_serving_values_cached_before_the_kill() {
    let mut server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = build(&url).await;
    let runs = Arc::new(AtomicU32::new(0));
    assert_eq!(a.get_or_load("k1", &opts(), loader(&runs, "k1-v")).await.unwrap(), "k1-v");
    assert_l1_hit(&a, &runs, "k1", "k1-v", "before the kill").await;
    kill(&mut server).await;
    let m = a.metrics();
    println!("after the kill: {m:?}");
    assert_l1_hit(&a, &runs, "k1", "k1-v", "Redis down").await;
}

/// L1 keeps serving during the outage even when other calls (a `get` of an uncached key, a `set`) try
/// Redis and fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_l1_keeps_serving_while_other_calls_fail() {
    let mut server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = build(&url).await;
    let runs = Arc::new(AtomicU32::new(0));
    kill(&mut server).await;
    assert_eq!(a.get_or_load("d", &opts(), loader(&runs, "d-v")).await.unwrap(), "d-v");
    assert_l1_hit(&a, &runs, "d", "d-v", "loaded during the outage").await;
    // Past the cooldown, so that the next call really tries Redis.
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    let none = a.get::<String>("not-cached").await.expect("get with Redis down is Ok(None)");
    assert_eq!(none, None);
    assert!(a.set("other", &"x".to_string(), &opts()).await.is_err(), "set with Redis down must fail");
    let m = a.metrics();
    println!("after failing calls: {m:?}");
    assert_l1_hit(&a, &runs, "d", "d-v", "after a failed get/set").await;
}

/// After the restart, L2 is used again: a value set by another instance is read, and tag invalidations
/// and key writes of another instance reach A's L1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_restart_l2_and_invalidations_are_used_again() {
    let mut server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = build(&url).await;
    let b = build(&url).await;
    let runs = Arc::new(AtomicU32::new(0));
    kill(&mut server).await;
    assert_eq!(a.get_or_load("x", &opts(), loader(&runs, "x-v")).await.unwrap(), "x-v");
    assert!(a.metrics().degraded_loads >= 1);
    restart_and_wait(&mut server, &b).await;
    // Let A's breaker close.
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;

    // A value SET by another instance is seen.
    b.set("k2", &"from-b".to_string(), &opts()).await.unwrap();
    let got = a.get_or_load("k2", &opts(), loader(&runs, "k2-loader")).await.unwrap();
    assert_eq!(got, "from-b", "A reads B's value from Redis after the restart");
    let m = a.metrics();
    assert!(m.l2_hits >= 1, "an L2 hit: {m:?}");

    // Tag invalidations reach A's L1 again.
    let tagged = opts().tag("t3");
    b.set("k3", &"k3-old".to_string(), &tagged).await.unwrap();
    assert_eq!(a.get_or_load("k3", &tagged, loader(&runs, "k3-loader")).await.unwrap(), "k3-old");
    assert_eq!(a.get_or_load("k3", &tagged, loader(&runs, "k3-loader")).await.unwrap(), "k3-old");
    b.invalidate_tags(&["t3"]).await.unwrap();
    let r = eventually_reads(&a, "k3", &tagged, "k3-new", Duration::from_secs(2)).await;
    println!("tag invalidation after the restart: {r:?}; A metrics {:?}", a.metrics());
    let tag_result = r.map(|_| ());

    // Key writes reach A's L1 again (A holds k2 in L1 now).
    assert_eq!(a.get_or_load("k2", &opts(), loader(&runs, "k2-loader")).await.unwrap(), "from-b");
    b.set("k2", &"from-b-2".to_string(), &opts()).await.unwrap();
    let t0 = Instant::now();
    let mut key_result = Err(String::new());
    while t0.elapsed() < Duration::from_secs(2) {
        let v = a.get_or_load("k2", &opts(), loader(&runs, "k2-loader")).await.unwrap();
        if v == "from-b-2" {
            key_result = Ok(());
            break;
        }
        key_result = Err(format!("k2: A still reads {v:?} 2 s after B set it to \"from-b-2\""));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("key write after the restart: {key_result:?}");
    assert!(tag_result.is_ok() && key_result.is_ok(), "after the restart: tag {tag_result:?}, key {key_result:?}");
}

/// A value loaded (degraded) during the outage is not served stale once Redis is back: another
/// instance's write of that key after the restart is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_restart_values_loaded_during_the_outage_are_not_served_stale() {
    let mut server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = build(&url).await;
    let b = build(&url).await;
    let runs = Arc::new(AtomicU32::new(0));
    kill(&mut server).await;
    assert_eq!(a.get_or_load("d", &opts(), loader(&runs, "d-outage")).await.unwrap(), "d-outage");
    assert_l1_hit(&a, &runs, "d", "d-outage", "during the outage").await;
    restart_and_wait(&mut server, &b).await;
    b.set("d", &"d-after".to_string(), &opts()).await.unwrap();
    let r = eventually_reads(&a, "d", &opts(), "d-after", Duration::from_secs(2)).await;
    println!("degraded value after the restart: {r:?}; A metrics {:?}", a.metrics());
    r.unwrap();
}
