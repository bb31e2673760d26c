//! A first end-to-end check of the client against a real module-enabled redis-server.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tiercache_client::{Opts, TierCache};

/// A module-enabled redis-server and two caches on it in namespace `ns`: two instances of one app.
async fn two_instances(ns: &str) -> (common::Server, TierCache, TierCache) {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace(ns).build().await.unwrap();
    let b = TierCache::builder(&url).namespace(ns).build().await.unwrap();
    (server, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_once_then_l1_then_invalidate_from_another_instance() {
    let (_server, a, b) = two_instances("t").await;
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

/// The L1 copy of a value another client wrote with a shorter TTL expires with the server's entry
/// (WITHTTL), not after this caller's own TTL; and ttl_jitter shortens written TTLs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_deadline_follows_the_server_and_jitter_spreads_ttls() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let writer = TierCache::builder(&url).namespace("t").build().await.unwrap();
    let reader = TierCache::builder(&url).namespace("t").build().await.unwrap();
    writer.set("short", &"v1".to_string(), &Opts::default().ttl(Duration::from_millis(300))).await.unwrap();
    // Let the writer's tracking push reach the reader first (a push arriving during the reader's first
    // read would rightly keep that read out of L1).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let long = Opts::default().ttl(Duration::from_secs(60));
    let fail = || async { Err::<String, std::io::Error>(std::io::Error::other("no database")) };
    assert_eq!(reader.get_or_load("short", &long, fail).await.unwrap(), "v1", "an L2 hit");
    assert_eq!(reader.get_or_load("short", &long, fail).await.unwrap(), "v1", "now from L1");
    assert!(reader.metrics().l1_hits >= 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let again = reader.get_or_load("short", &long, || async { Ok::<_, std::io::Error>("v2".to_string()) }).await.unwrap();
    assert_eq!(again, "v2", "the L1 copy expired with the server's fresh period, not the reader's 60 s");

    let jittery = TierCache::builder(&url).namespace("j").ttl_jitter(0.5).build().await.unwrap();
    let mut conn = server.conn();
    let mut ttls = Vec::new();
    for n in 0..20 {
        jittery.set(&format!("k{n}"), &n, &Opts::default().ttl(Duration::from_secs(100))).await.unwrap();
        ttls.push(conn.int(redis::cmd("PTTL").arg(jittery.redis_key(&format!("k{n}")))));
    }
    assert!(ttls.iter().all(|&t| (50_000..=100_000).contains(&t)), "{ttls:?}");
    assert!(ttls.iter().max().unwrap() - ttls.iter().min().unwrap() > 5_000, "spread: {ttls:?}");
}

/// Values are MessagePack maps with field names (what Python's msgpack.unpackb reads as a dict);
/// `Raw` stores bytes verbatim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messagepack_by_default_raw_bytes_verbatim() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct User {
        id: u32,
        name: String,
    }
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let c = TierCache::builder(&url).namespace("fmt").build().await.unwrap();
    let user = User { id: 7, name: "Ada".into() };
    c.set("u", &user, &Opts::default()).await.unwrap();
    let mut conn = server.conn();
    let stored = conn.bytes(redis::cmd("TIERCACHE.GET").arg(c.redis_key("u"))).expect("stored");
    let v = rmpv::decode::read_value(&mut &stored[..]).unwrap();
    let map = v.as_map().expect("a MessagePack map");
    let names: Vec<&str> = map.iter().filter_map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["id", "name"]);
    assert_eq!(c.get::<User>("u").await.unwrap(), Some(user));

    let bytes = b"\x00\xffalready-encoded".to_vec();
    c.set("r", &tiercache_client::Raw(bytes.clone()), &Opts::default()).await.unwrap();
    assert_eq!(conn.bytes(redis::cmd("TIERCACHE.GET").arg(c.redis_key("r"))).unwrap(), bytes);
    let loaded: tiercache_client::Raw = c
        .get_or_load("r2", &Opts::default(), || async { Ok::<_, std::io::Error>(tiercache_client::Raw(b"xyz".to_vec())) })
        .await
        .unwrap();
    assert_eq!(loaded.0, b"xyz");
    assert_eq!(conn.bytes(redis::cmd("TIERCACHE.GET").arg(c.redis_key("r2"))).unwrap(), b"xyz");
}

/// A tag invalidated from another instance drops an L1 entry that was already served from L1 (its tags
/// found current once, and not checked again until some tag is invalidated), and one that was not;
/// an entry under another tag stays an L1 hit. (The server's reclaim of invalidated entries also
/// deletes the keys within milliseconds, so the key pushes race the tag message here; the unit test
/// `a_tag_invalidated_after_hits_drops_the_entry` checks the tag path alone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_invalidation_drops_l1_entries_already_served() {
    let (_server, a, b) = two_instances("tt").await;
    let load = |v: &'static str| move || async move { Ok::<_, std::io::Error>(v.to_string()) };
    let grp = Opts::default().ttl(Duration::from_secs(60)).tag("grp");
    let other = Opts::default().ttl(Duration::from_secs(60)).tag("other");
    assert_eq!(a.get_or_load("hit", &grp, load("one")).await.unwrap(), "one");
    assert_eq!(a.get_or_load("cold", &grp, load("one")).await.unwrap(), "one");
    assert_eq!(a.get_or_load("apart", &other, load("one")).await.unwrap(), "one");
    let hits = a.metrics().l1_hits;
    for _ in 0..3 {
        assert_eq!(a.get_or_load("hit", &grp, load("two")).await.unwrap(), "one");
        assert_eq!(a.get_or_load("apart", &other, load("two")).await.unwrap(), "one");
    }
    assert_eq!(a.metrics().l1_hits, hits + 6, "served from L1 before the invalidation");

    b.invalidate_tags(&["grp"]).await.unwrap();
    let mut seen = (String::new(), String::new());
    for _ in 0..200 {
        seen.0 = a.get_or_load("hit", &grp, load("two")).await.unwrap();
        if seen.0 == "two" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    seen.1 = a.get_or_load("cold", &grp, load("two")).await.unwrap();
    assert_eq!(seen, ("two".to_string(), "two".to_string()), "both entries of the invalidated tag reloaded");
    let hits = a.metrics().l1_hits;
    assert_eq!(a.get_or_load("apart", &other, load("three")).await.unwrap(), "one", "the other tag's entry stays");
    assert_eq!(a.metrics().l1_hits, hits + 1, "and is still an L1 hit");
}
