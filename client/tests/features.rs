//! Fail-safe (stale on loader failure), client-side compression, namespaces and schema versions.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiercache_client::{Error, Opts, TierCache};

fn url_of(server: &common::Server) -> String {
    format!("redis://127.0.0.1:{}/", server.port)
}

/// A loader returning `v`, counting its runs.
fn ok_loader(
    runs: &Arc<AtomicU32>,
    v: impl Into<String>,
) -> impl FnOnce() -> std::future::Ready<Result<String, String>> + Send + 'static {
    let runs = runs.clone();
    let v = v.into();
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(v))
    }
}

/// A loader failing with `msg`, counting its runs.
fn failing_loader(
    runs: &Arc<AtomicU32>,
    msg: &str,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>> + Send + 'static {
    let runs = runs.clone();
    let msg = msg.to_string();
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            Err(msg)
        })
    }
}

/// MessagePack of a string, as the client stores it.
fn msgpack_str(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &rmpv::Value::from(s)).unwrap();
    out
}

fn decode_str(b: &[u8]) -> String {
    let v = rmpv::decode::read_value(&mut &b[..]).expect("MessagePack value");
    v.as_str().expect("a MessagePack str").to_string()
}

// ---------------------------------------------------------------------------------------------------
// 6. Fail-safe.

/// An entry with a STALE window, past its fresh period: the loader fails, the stale value is returned
/// and counted as fail-safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_safe_serves_the_stale_value_when_the_loader_fails() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("fs").build().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let o = Opts::default().ttl(Duration::from_millis(300)).stale(Duration::from_secs(10));
    assert_eq!(a.get_or_load("k", &o, ok_loader(&runs, "good")).await.unwrap(), "good");
    let meta = server.conn().meta(a.redis_key("k")).expect("entry in Redis");
    assert!(meta.expire_at_ms - meta.fresh_until_ms >= 9_000, "a stale window of 10 s: {meta:?}");

    // Past the fresh period: stale in Redis, past its deadline in L1.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.conn().meta(a.redis_key("k")).unwrap().state, "stale");
    let m0 = a.metrics();
    let got = a.get_or_load("k", &o, failing_loader(&runs, "db down")).await;
    println!("fail-safe read: {got:?}");
    assert_eq!(got.expect("the stale value, not the loader's error"), "good");
    // The loader ran (in the foreground or in a background refresh) and failed.
    let t0 = Instant::now();
    while a.metrics().load_errors == m0.load_errors && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let m1 = a.metrics();
    println!("fail-safe metrics: {m1:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the refresh was attempted");
    assert_eq!(m1.load_errors - m0.load_errors, 1, "load_errors counter");
    // The failed refresh released its lease: a later refresh succeeds (now or in the background).
    let t0 = Instant::now();
    loop {
        let v = a.get_or_load("k", &o, ok_loader(&runs, "fresh")).await.unwrap();
        if v == "fresh" {
            break;
        }
        assert_eq!(v, "good");
        assert!(t0.elapsed() < Duration::from_secs(2), "the stale value was never refreshed after the failure");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.conn().meta(a.redis_key("k")).unwrap().state, "fresh");
    // Last, so that everything above is checked first: the fail_safe counter. Read now, not in `m1`:
    // `m1` is taken as soon as `load_errors` moves, while the failed background refresh may still be
    // releasing its lease; only once a later refresh has been granted and stored is the failed one
    // certainly over, so a second count of the same fail-safe serve shows here.
    let m2 = a.metrics();
    assert_eq!(m2.fail_safe - m0.fail_safe, 1, "fail_safe counter after serving the stale value on a loader failure: {m2:?}");
}

/// No stale value: the loader's error is returned (Error::Load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_safe_without_a_stale_value_returns_the_load_error() {
    let server = common::Server::start();
    let url = url_of(&server);
    let a = TierCache::builder(&url).namespace("fs").build().await.unwrap();
    let b = TierCache::builder(&url).namespace("fs").build().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let with_stale = Opts::default().ttl(Duration::from_millis(200)).stale(Duration::from_secs(1));
    let no_stale = Opts::default().ttl(Duration::from_millis(200));
    let mut failures = Vec::new();
    let mut check = |what: &str, r: Result<String, Error<String>>, msg: &str| match r {
        Err(Error::Load(e)) if *e == msg => println!("{what}: Error::Load({e:?}) as required"),
        other => failures.push(format!("{what}: expected Error::Load({msg:?}), got {other:?}")),
    };

    // Never cached.
    check("never cached", a.get_or_load("never", &no_stale, failing_loader(&runs, "e1")).await, "e1");
    // The lease of the failed load was released: a new load is not kept waiting.
    let t = Instant::now();
    assert_eq!(a.get_or_load("never", &no_stale, ok_loader(&runs, "finally")).await.unwrap(), "finally");
    assert!(t.elapsed() < Duration::from_secs(1), "the failed loader's lease blocked the next load for {:?}", t.elapsed());

    // Cached by A with no stale window, past its fresh period: no stale value exists.
    assert_eq!(a.get_or_load("nostale", &no_stale, ok_loader(&runs, "v")).await.unwrap(), "v");
    // Cached by A with a 1 s stale window, past that window too.
    assert_eq!(a.get_or_load("old", &with_stale, ok_loader(&runs, "v")).await.unwrap(), "v");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let mut c = server.conn();
    assert_eq!(c.meta(a.redis_key("nostale")), None, "nostale expired in Redis");
    assert_eq!(c.meta(a.redis_key("old")), None, "old expired in Redis");
    // Another instance (nothing in its L1).
    check("B, no stale window, expired", b.get_or_load("nostale", &no_stale, failing_loader(&runs, "e2")).await, "e2");
    check("B, past the stale window", b.get_or_load("old", &with_stale, failing_loader(&runs, "e3")).await, "e3");
    // The instance that cached them (an expired copy may linger in its L1).
    check("A, no stale window, expired", a.get_or_load("nostale", &no_stale, failing_loader(&runs, "e4")).await, "e4");
    check("A, past the stale window", a.get_or_load("old", &with_stale, failing_loader(&runs, "e5")).await, "e5");
    println!("A metrics {:?}", a.metrics());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(a.metrics().fail_safe + b.metrics().fail_safe, 0, "no stale value was served");
}

// ---------------------------------------------------------------------------------------------------
// 7. Compression.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_lz4_framed_by_the_client_and_round_trip() {
    // The server would never compress by itself: an lz4 entry can only come from the client's frame.
    let server = common::Server::builder().module_args(&["compress-min-size", "536870912"]).start();
    let url = url_of(&server);
    let a = TierCache::builder(&url).namespace("z").compress_min_size(1024).build().await.unwrap();
    let b = TierCache::builder(&url).namespace("z").compress_min_size(1024).build().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let big = String::from_utf8(common::compressible(20_000)).unwrap();
    let small = "small value".to_string();
    let o = Opts::default().ttl(Duration::from_secs(60));

    assert_eq!(a.get_or_load("big", &o, ok_loader(&runs, big.clone())).await.unwrap(), big);
    a.set("big-set", &big, &o).await.unwrap();
    a.set("small", &small, &o).await.unwrap();

    let mut c = server.conn();
    let encoded_len = msgpack_str(&big).len() as i64;
    for key in ["big", "big-set"] {
        let full = a.redis_key(key);
        let meta = c.meta(&full).unwrap_or_else(|| panic!("{full} missing"));
        println!("{full}: encoding {} size {} stored_size {}", meta.encoding, meta.size, meta.stored_size);
        assert_eq!(meta.encoding, "lz4", "{full}: framed by the client");
        assert_eq!(meta.size, encoded_len, "{full}: original size = the MessagePack value");
        assert!(meta.stored_size < meta.size / 2, "{full}: stored {} of {}", meta.stored_size, meta.size);
        // Other clients get the decompressed MessagePack value.
        assert_eq!(decode_str(&c.get(&full).unwrap()), big, "{full}: plain TIERCACHE.GET");
        let (enc, frame) = c.get_encoded(&full).unwrap();
        assert_eq!(enc, "lz4");
        assert_eq!(common::lz4_unframe(&frame), msgpack_str(&big), "{full}: the stored frame");
    }
    let meta = c.meta(a.redis_key("small")).unwrap();
    assert_eq!(meta.encoding, "raw", "a value under compress_min_size is stored raw");

    // Round trips: L1, another instance's L2 read (get and get_or_load), a fresh instance.
    assert_eq!(a.get::<String>("big").await.unwrap().as_deref(), Some(big.as_str()));
    assert_eq!(b.get::<String>("big").await.unwrap().as_deref(), Some(big.as_str()), "B: get from Redis");
    let n = runs.load(Ordering::SeqCst);
    assert_eq!(b.get_or_load("big-set", &o, ok_loader(&runs, "X")).await.unwrap(), big, "B: lease read from Redis");
    assert_eq!(runs.load(Ordering::SeqCst), n, "no load: the frame was read back");
    assert_eq!(b.metrics().l2_hits, 1);
    assert_eq!(b.get_or_load("big-set", &o, ok_loader(&runs, "X")).await.unwrap(), big, "B: from L1");
    assert_eq!(b.get::<String>("small").await.unwrap().as_deref(), Some("small value"));

    // compress_min_size is the client's threshold.
    let low = TierCache::builder(&url).namespace("z2").compress_min_size(100).build().await.unwrap();
    let mid = String::from_utf8(common::compressible(500)).unwrap();
    low.set("mid", &mid, &o).await.unwrap();
    assert_eq!(c.meta(low.redis_key("mid")).unwrap().encoding, "lz4");
    a.set("mid", &mid, &o).await.unwrap();
    assert_eq!(c.meta(a.redis_key("mid")).unwrap().encoding, "raw", "500 bytes < 1024");
    // Incompressible data stays raw.
    let noise: String = common::incompressible(4000, 7).iter().map(|b| char::from(b'!' + b % 90)).collect();
    a.set("noise", &noise, &o).await.unwrap();
    assert_eq!(c.meta(a.redis_key("noise")).unwrap().encoding, "raw");
    assert_eq!(b.get::<String>("noise").await.unwrap(), Some(noise));
}

// ---------------------------------------------------------------------------------------------------
// 8. Namespace and schema version.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_schema_version_keys_and_flush() {
    let server = common::Server::start();
    let url = url_of(&server);
    let a = TierCache::builder(&url).namespace("shop").schema_version(1).build().await.unwrap();
    let a2 = TierCache::builder(&url).namespace("shop").schema_version(1).build().await.unwrap();
    let v2 = TierCache::builder(&url).namespace("shop").schema_version(2).build().await.unwrap();
    let other = TierCache::builder(&url).namespace("other").schema_version(1).build().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("t");

    assert_eq!(a.redis_key("x"), "shop:v1:x");
    assert_eq!(v2.redis_key("x"), "shop:v2:x");
    assert_eq!(other.redis_key("x"), "other:v1:x");
    assert_eq!(TierCache::builder(&url).build().await.unwrap().redis_key("x"), "app:v1:x", "defaults");

    a.set("x", &"a-x".to_string(), &o).await.unwrap();
    assert_eq!(a.get_or_load("y", &o, ok_loader(&runs, "a-y")).await.unwrap(), "a-y");
    assert_eq!(v2.get::<String>("x").await.unwrap(), None, "schema v2 does not see v1's entry");
    v2.set("x", &"v2-x".to_string(), &o).await.unwrap();
    other.set("x", &"other-x".to_string(), &o).await.unwrap();

    let mut c = server.conn();
    for (key, v) in [("shop:v1:x", "a-x"), ("shop:v1:y", "a-y"), ("shop:v2:x", "v2-x"), ("other:v1:x", "other-x")] {
        assert_eq!(c.get(key).map(|b| decode_str(&b)).as_deref(), Some(v), "raw {key}");
    }
    let tags = c.meta("shop:v1:x").unwrap().tags_str();
    assert!(tags.contains(&"ns:shop:v1".to_string()) && tags.contains(&"t".to_string()), "tags {tags:?}");

    // a2 holds x in L1.
    assert_eq!(a2.get_or_load("x", &o, ok_loader(&runs, "X")).await.unwrap(), "a-x");
    assert_eq!(a2.get_or_load("x", &o, ok_loader(&runs, "X")).await.unwrap(), "a-x");
    assert!(a2.metrics().l1_hits >= 1);

    let n = a.flush_namespace().await.unwrap();
    assert_eq!(n, 2, "flush_namespace counts shop:v1's two entries");
    assert_eq!(a.get::<String>("x").await.unwrap(), None);
    assert_eq!(a.get::<String>("y").await.unwrap(), None);
    assert_eq!(c.get("shop:v1:x"), None);
    assert_eq!(c.get("shop:v1:y"), None);
    assert_eq!(c.meta("shop:v1:x"), None);
    // Another instance of the namespace drops its L1 copy too.
    let t0 = Instant::now();
    while a2.get::<String>("x").await.unwrap().is_some() {
        assert!(t0.elapsed() < Duration::from_secs(2), "a2 still serves x 2 s after flush_namespace");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Other schema versions and namespaces are untouched (in Redis and in their L1).
    assert_eq!(v2.get::<String>("x").await.unwrap().as_deref(), Some("v2-x"));
    assert_eq!(other.get::<String>("x").await.unwrap().as_deref(), Some("other-x"));
    assert_eq!(c.get("shop:v2:x").map(|b| decode_str(&b)).as_deref(), Some("v2-x"));
    assert_eq!(c.get("other:v1:x").map(|b| decode_str(&b)).as_deref(), Some("other-x"));
    // The namespace works again afterwards.
    assert_eq!(a.get_or_load("x", &o, ok_loader(&runs, "a-x-2")).await.unwrap(), "a-x-2");
    assert_eq!(c.get("shop:v1:x").map(|b| decode_str(&b)).as_deref(), Some("a-x-2"));
}
