//! A first end-to-end check of the client against a real module-enabled redis-server.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tiercache_client::{Opts, TierCache};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_once_then_l1_then_invalidate_from_another_instance() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace("t").build().await.unwrap();
    let b = TierCache::builder(&url).namespace("t").build().await.unwrap();
    let loads = Arc::new(AtomicU32::new(0));
    let opts = Opts::default().ttl(Duration::from_secs(60)).tag("user:1");
    let load = |v: &'static str| {
        let loads = loads.clone();
        move || async move {
            loads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(v.to_string())
        }
    };
    assert_eq!(a.get_or_load("k", &opts, load("one")).await.unwrap(), "one");
    assert_eq!(a.get_or_load("k", &opts, load("two")).await.unwrap(), "one", "L1 hit");
    assert_eq!(b.get_or_load("k", &opts, load("two")).await.unwrap(), "one", "L2 hit in another instance");
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert!(a.metrics().l1_hits >= 1);
    b.invalidate_tags(&["user:1"]).await.unwrap();
    let mut seen = String::new();
    for _ in 0..100 {
        seen = a.get_or_load("k", &opts, load("three")).await.unwrap();
        if seen == "three" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(seen, "three", "A dropped its L1 copy after B's invalidation");
    let text = a.metrics().to_prometheus();
    assert!(text.contains("tiercache_client_l1_hits_total"));
}
