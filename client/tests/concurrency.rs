//! Concurrent reads in one process: local single-flight, and concurrent misses of distinct keys.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use tiercache_client::{Opts, TierCache};

/// A loader that sleeps `ms`, counting its runs.
fn slow_loader(
    runs: &Arc<AtomicU32>,
    v: &str,
    ms: u64,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>> + Send + 'static
{
    let runs = runs.clone();
    let v = v.to_string();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(v)
        })
    }
}

/// 100 tasks of one process read the same missing key: one load, the others coalesce on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_single_flight_one_load_for_a_hundred_tasks() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let cache = TierCache::builder(&url).namespace("sf").build().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let handles: Vec<_> = (0..100)
        .map(|_| {
            let c = cache.clone();
            let load = slow_loader(&runs, "the value", 150);
            tokio::spawn(async move { c.get_or_load("k", &Opts::default().ttl(Duration::from_secs(60)), load).await })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.await.unwrap());
    }
    let m = cache.metrics();
    println!("single-flight metrics: {m:?}");
    for r in &results {
        assert_eq!(r.as_ref().expect("every task gets the value"), "the value");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one loader run for 100 tasks");
    assert_eq!(m.loads, 1);
    assert!(m.coalesced_local > 0, "coalesced_local: {m:?}");
    assert_eq!(m.coalesced_local, 99, "the 99 other tasks waited for the load");
    let mut c = server.conn();
    let stats = c.stats();
    assert_eq!(stats.get("leases_granted"), 1, "one lease asked of Redis");
}

/// The future of `get_or_load` can be spawned (compile-time check).
#[allow(dead_code)]
fn get_or_load_future_is_send(c: &TierCache, o: &Opts) {
    fn assert_send<T: Send + 'static>(_: T) {}
    let c = c.clone();
    let o = o.clone();
    assert_send(async move { c.get_or_load("k", &o, move || async move { Ok::<_, std::io::Error>(1u32) }).await });
}

/// Several keys missing at once, read concurrently by one task (`join!`) on a current-thread runtime:
/// every read completes. Runs on its own thread so that a deadlock fails the test instead of hanging it.
#[test]
fn concurrent_misses_of_distinct_keys_complete() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let out = rt.block_on(async {
            let cache = TierCache::builder(&url).namespace("dk").build().await.unwrap();
            let runs = Arc::new(AtomicU32::new(0));
            let o = Opts::default().ttl(Duration::from_secs(60));
            let (a, b, c) = tokio::join!(
                cache.get_or_load("a", &o, slow_loader(&runs, "va", 10)),
                cache.get_or_load("b", &o, slow_loader(&runs, "vb", 10)),
                cache.get_or_load("c", &o, slow_loader(&runs, "vc", 10)),
            );
            (a.unwrap(), b.unwrap(), c.unwrap(), runs.load(Ordering::SeqCst))
        });
        let _ = tx.send(out);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok((a, b, c, runs)) => {
            assert_eq!((a.as_str(), b.as_str(), c.as_str()), ("va", "vb", "vc"));
            assert_eq!(runs, 3);
        }
        // The thread is left blocked; the process ends with the test binary.
        Err(e) => panic!(
            "three concurrent get_or_load of distinct missing keys did not complete in 20 s ({e}): \
             the thread is deadlocked"
        ),
    }
}
