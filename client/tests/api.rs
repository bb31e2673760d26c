//! Issue 14 items 3-5 against a real module-enabled redis-server: the decoded L1 (`get_arc`,
//! `get_or_load_arc`, `get_l1`), shared loader errors, loader timeout and cancellation (the lease is given back),
//! `skip_l1`/`skip_l2`, early refresh with `BETA`, pipelined `get_many`/`set_many`, read-keys tracking,
//! an existing `redis::Client`, and errors that keep their source.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tiercache_client::{Error, Opts, TierCache, Tracking};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    roles: Vec<String>,
}

/// Another view of a `Profile` entry (unknown fields are skipped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IdOnly {
    id: u64,
}

fn profile(id: u64) -> Profile {
    Profile { id, name: format!("user {id}"), roles: vec!["admin".into(), "billing".into()] }
}

fn url_of(server: &common::Server) -> String {
    format!("redis://127.0.0.1:{}/", server.port)
}

/// Polls until `cond` holds (a hang guard, not a timing assertion).
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_hands_out_the_decoded_value_and_redis_keeps_the_shared_bytes() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("arc").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60));
    let first = a.get_or_load_arc("p1", &o, || async { Ok::<_, String>(profile(1)) }).await.unwrap();
    let m0 = a.metrics();
    let hit = a.get_or_load_arc("p1", &o, || async { Err::<Profile, _>("loader ran on a hit".to_string()) }).await.unwrap();
    assert!(Arc::ptr_eq(&first, &hit), "an L1 hit hands out the loaded Arc itself, not a decoded copy");
    let got = a.get_arc::<Profile>("p1").await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&first, &got), "get_arc too");
    assert_eq!(a.metrics().l1_hits - m0.l1_hits, 2, "both were L1 hits");
    // The `Cached` handle is L1's entry itself: it derefs to the same decoded value.
    let c1 = a.get_or_load_cached("p1", &o, || async { Err::<Profile, String>("no".into()) }).await.unwrap();
    let c2 = a.get_cached::<Profile>("p1").await.unwrap().unwrap();
    assert!(std::ptr::eq(&*c1, &*first) && std::ptr::eq(&*c2, &*first), "no copy, no decode");
    assert!(Arc::ptr_eq(&c1.to_arc(), &first));
    assert_eq!(a.metrics().l1_hits - m0.l1_hits, 4, "four L1 hits");
    // Read as another type, a handle over a copy decoded for the call.
    assert_eq!(a.get_cached::<IdOnly>("p1").await.unwrap().unwrap().id, 1);
    // A miss loaded through the handle API.
    let c3 = a.get_or_load_cached("p3", &o, || async { Ok::<_, String>(profile(3)) }).await.unwrap();
    assert_eq!(*c3, profile(3));
    // The by-value API still works on the same entry.
    assert_eq!(a.get::<Profile>("p1").await.unwrap(), Some(profile(1)));
    assert_eq!(a.get_or_load("p1", &o, || async { Err::<Profile, String>("no".into()) }).await.unwrap(), profile(1));
    // Redis holds the same MessagePack (named fields) as before: what the Python client reads.
    let stored = server.conn().get(a.redis_key("p1")).expect("stored in Redis");
    assert_eq!(stored, rmp_serde::to_vec_named(&profile(1)).unwrap());
    let as_map = rmpv::decode::read_value(&mut stored.as_slice()).unwrap();
    assert!(as_map.is_map(), "a map with named fields: {as_map}");

    // A value written with `set` (bytes only in L1) is decoded on its first Arc read, then kept.
    a.set("p2", &profile(2), &o).await.unwrap();
    let x = a.get_arc::<Profile>("p2").await.unwrap().unwrap();
    let y = a.get_arc::<Profile>("p2").await.unwrap().unwrap();
    assert_eq!(*x, profile(2));
    assert!(Arc::ptr_eq(&x, &y), "decoded once, then shared");
    // The same key read as another type: decoded for that type, the kept copy left alone.
    let other = a.get_arc::<IdOnly>("p2").await.unwrap().unwrap();
    assert_eq!(other.id, 2);
    assert!(Arc::ptr_eq(&x, &a.get_arc::<Profile>("p2").await.unwrap().unwrap()));
    // A value written by another client is read by this one's Arc API from Redis.
    let b = TierCache::builder(url_of(&server)).namespace("arc").build().await.unwrap();
    assert_eq!(*b.get_or_load_arc("p1", &o, || async { Err::<Profile, String>("no".into()) }).await.unwrap(), profile(1));
}

/// `get_l1`, the L1 read as a plain call: a key only in Redis is a miss and is not fetched; a loaded key
/// is a hit handing out the loaded value itself (counted); another type gets a decoded copy, a type the
/// bytes are not an error; another client's tag invalidation makes it a miss; with Redis gone it answers
/// `None` although L1 holds the key, which the async read still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_l1_reads_l1_alone() {
    let mut server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("l1only").build().await.unwrap();
    let b = TierCache::builder(url_of(&server)).namespace("l1only").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("grp");
    b.set("only-redis", &profile(9), &o).await.unwrap();
    let m0 = a.metrics();
    assert!(a.get_l1::<Profile>("only-redis").unwrap().is_none());
    assert!(a.get_l1::<Profile>("only-redis").unwrap().is_none(), "still a miss: get_l1 never fetches");
    let m1 = a.metrics();
    assert_eq!((m1.l1_misses - m0.l1_misses, m1.l2_hits - m0.l2_hits), (2, 0));

    let loaded = a.get_or_load_arc("p", &o, || async { Ok::<_, String>(profile(1)) }).await.unwrap();
    let m2 = a.metrics();
    let hit = a.get_l1::<Profile>("p").unwrap().expect("an L1 hit");
    assert!(std::ptr::eq(&*hit, &*loaded), "the loaded value itself");
    assert_eq!(a.metrics().l1_hits - m2.l1_hits, 1);
    assert_eq!(a.get_l1::<IdOnly>("p").unwrap().unwrap().id, 1);
    assert!(matches!(a.get_l1::<u64>("p"), Err(Error::Codec(_))));

    b.invalidate_tags(&["grp"]).await.unwrap();
    until("a's L1 dropped the entry b invalidated", || a.get_l1::<Profile>("p").unwrap().is_none()).await;

    a.get_or_load_arc("q", &o, || async { Ok::<_, String>(profile(2)) }).await.unwrap();
    assert!(a.get_l1::<Profile>("q").unwrap().is_some());
    server.kill();
    until("a noticed that Redis is gone", || a.get_l1::<Profile>("q").unwrap().is_none()).await;
    assert_eq!(*a.get_arc::<Profile>("q").await.unwrap().unwrap(), profile(2), "the async read serves L1 through the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_callers_share_the_loaders_error_and_it_keeps_its_source() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("err").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60));
    let runs = Arc::new(AtomicU32::new(0));
    let (open, gate) = tokio::sync::watch::channel(false);
    let n = 10;
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (a, o, runs, mut gate) = (a.clone(), o.clone(), runs.clone(), gate.clone());
            tokio::spawn(async move {
                a.get_or_load("k", &o, move || async move {
                    runs.fetch_add(1, SeqCst);
                    let _ = gate.wait_for(|v| *v).await;
                    Err::<String, _>(std::io::Error::other("database down"))
                })
                .await
            })
        })
        .collect();
    until("9 callers waiting on the one load", || a.metrics().coalesced_local == n - 1).await;
    open.send_replace(true);
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Err(Error::Load(e)) => errors.push(e),
            other => panic!("expected Error::Load, got {other:?}"),
        }
    }
    assert_eq!(runs.load(SeqCst), 1, "one load for all the callers: the waiters did not retry in turn");
    assert!(errors.iter().all(|e| Arc::ptr_eq(e, &errors[0])), "every caller got the same Arc<E>");
    assert_eq!(a.metrics().load_errors, 1);
    // The error keeps its source.
    let err: Error<std::io::Error> = Error::Load(errors[0].clone());
    let source = std::error::Error::source(&err).expect("a source");
    assert_eq!(source.to_string(), "database down");
    assert!(source.downcast_ref::<std::io::Error>().is_some());
    // A Redis error too.
    let mut c = server.conn();
    c.ok(&cmd!("SET", a.redis_key("plain"), "x"));
    match a.set("plain", &"y".to_string(), &o.clone().tag("t")).await {
        // A plain string key: TIERCACHE.SET refuses to overwrite another type.
        Err(e @ Error::Redis(_)) => assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<redis::RedisError>())),
        other => panic!("expected Error::Redis, got {other:?}"),
    }
}

/// Leases held on the server now (`INFO tiercache` `leases`).
fn leases(server: &common::Server) -> i64 {
    server.conn().stats().get("leases")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_timeout_gives_the_lease_back() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("to").lease_timeout(Duration::from_secs(50)).build().await.unwrap();
    let dropped = Arc::new(AtomicBool::new(false));
    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }
    let o = Opts::default().ttl(Duration::from_secs(60)).load_timeout(Duration::from_millis(100));
    let flag = dropped.clone();
    let r = a
        .get_or_load("slow", &o, move || async move {
            let _guard = OnDrop(flag);
            std::future::pending::<()>().await;
            Ok::<String, String>("never".into())
        })
        .await;
    assert!(matches!(r, Err(Error::LoadTimeout(d)) if d == Duration::from_millis(100)), "got {r:?}");
    assert!(dropped.load(SeqCst), "the loader's future was dropped");
    assert_eq!(server.conn().stats().get("leases_granted"), 1, "the loader ran under a lease");
    assert_eq!(leases(&server), 0, "the lease was released at once (RELEASE), not left for its 50 s");
    assert_eq!(a.metrics().load_errors, 1);
    // The next load is granted the lease and fills Redis.
    let v = a.get_or_load("slow", &o, || async { Ok::<_, String>("fast".to_string()) }).await.unwrap();
    assert_eq!(v, "fast");
    assert!(server.conn().get(a.redis_key("slow")).is_some(), "filled under a new lease");

    // The builder's default applies when the call gives none.
    let b = TierCache::builder(url_of(&server)).namespace("to").load_timeout(Duration::from_millis(50)).build().await.unwrap();
    let r = b
        .get_or_load("slow2", &Opts::default(), || async {
            std::future::pending::<()>().await;
            Ok::<String, String>("never".into())
        })
        .await;
    assert!(matches!(r, Err(Error::LoadTimeout(_))), "got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_callers_future_ends_its_lease_at_once() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("cx").lease_timeout(Duration::from_secs(50)).build().await.unwrap();
    let started = Arc::new(AtomicBool::new(false));
    let flag = started.clone();
    let o = Opts::default().ttl(Duration::from_secs(60));
    let call = a.get_or_load("k", &o, move || async move {
        flag.store(true, SeqCst);
        std::future::pending::<()>().await;
        Ok::<String, String>("never".into())
    });
    // The caller gives up (its own timeout, a dropped request...) while the loader holds the lease.
    let waited = tokio::time::timeout(Duration::from_millis(200), call).await;
    assert!(waited.is_err() && started.load(SeqCst), "the loader was running under the lease");
    // The server ended the lease when its connection closed: no 50 s wait for anyone.
    assert_eq!(server.conn().stats().get("leases_granted"), 1, "the loader ran under a lease");
    until("the lease ended", || leases(&server) == 0).await;
    // Another process asking for the key is granted a lease (FILL) and stores its value.
    let b = TierCache::builder(url_of(&server)).namespace("cx").wait_timeout(Duration::from_secs(50)).build().await.unwrap();
    assert_eq!(b.get_or_load("k", &o, || async { Ok::<_, String>("from b".to_string()) }).await.unwrap(), "from b");
    assert_eq!(b.metrics().l2_misses, 1);
    assert!(server.conn().get(b.redis_key("k")).is_some(), "b filled the key");
    // And in this process, a caller after the dropped one leads a new flight.
    assert_eq!(a.get_or_load("k", &o, || async { Ok::<_, String>("unused".to_string()) }).await.unwrap(), "from b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_l1_and_skip_l2_per_call() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("skip").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60));
    // skip_l2: the loader's value lands in L1 only; Redis never sees the key.
    let v = a.get_or_load("local", &o.clone().skip_l2(), || async { Ok::<_, String>("l1 only".to_string()) }).await.unwrap();
    assert_eq!(v, "l1 only");
    assert!(server.conn().get(a.redis_key("local")).is_none(), "skip_l2 wrote nothing to Redis");
    assert_eq!(server.conn().stats().get("leases_granted"), 0, "and took no lease");
    assert_eq!(a.get_with::<String>("local", &Opts::default().skip_l2()).await.unwrap().as_deref(), Some("l1 only"));
    // skip_l1: Redis only; L1 neither read nor written.
    let v = a.get_or_load("remote", &o.clone().skip_l1(), || async { Ok::<_, String>("l2 only".to_string()) }).await.unwrap();
    assert_eq!(v, "l2 only");
    assert!(server.conn().get(a.redis_key("remote")).is_some());
    assert_eq!(a.get_with::<String>("remote", &Opts::default().skip_l2()).await.unwrap(), None, "not in L1");
    let m0 = a.metrics();
    assert_eq!(a.get_with::<String>("local", &Opts::default().skip_l1()).await.unwrap(), None, "skip_l1 ignores L1's copy");
    assert_eq!(a.metrics().l1_hits, m0.l1_hits);
    // set with skip_l1 / skip_l2.
    a.set("s1", &"redis".to_string(), &o.clone().skip_l1()).await.unwrap();
    assert_eq!(a.get_with::<String>("s1", &Opts::default().skip_l2()).await.unwrap(), None);
    assert!(server.conn().get(a.redis_key("s1")).is_some());
    a.set("s2", &"local".to_string(), &o.clone().skip_l2()).await.unwrap();
    assert!(server.conn().get(a.redis_key("s2")).is_none());
    assert_eq!(a.get_with::<String>("s2", &Opts::default().skip_l2()).await.unwrap().as_deref(), Some("local"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beta_is_sent_and_refreshes_a_fresh_entry_early() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("beta").build().await.unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let loader = |runs: &Arc<AtomicU32>| {
        let runs = runs.clone();
        move || async move {
            let n = runs.fetch_add(1, SeqCst) + 1;
            // A fill duration for XFetch's delta.
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok::<_, String>(format!("v{n}"))
        }
    };
    let o = Opts::default().ttl(Duration::from_secs(600)).skip_l1();
    assert_eq!(a.get_or_load("k", &o, loader(&runs)).await.unwrap(), "v1");
    // Without BETA, a fresh entry is never refreshed early.
    for _ in 0..20 {
        assert_eq!(a.get_or_load("k", &o, loader(&runs)).await.unwrap(), "v1");
    }
    assert_eq!(runs.load(SeqCst), 1);
    // With a huge BETA (delta 30 ms x 1e6 >> 600 s), almost every read is elected: it is served the
    // current value at once and refreshes in the background.
    let ob = o.clone().beta(1e6);
    for _ in 0..20 {
        assert!(a.get_or_load("k", &ob, loader(&runs)).await.unwrap().starts_with('v'));
        if runs.load(SeqCst) > 1 {
            break;
        }
    }
    until("an early refresh stored", || server.conn().get(a.redis_key("k")).is_some_and(|v| v != b"\xa2v1")).await;
    assert!(server.conn().stats().get("early_refreshes") >= 1, "the server counted an early refresh");
    assert!(runs.load(SeqCst) >= 2, "the loader ran again while the entry was fresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_and_set_many_are_pipelined() {
    let server = common::Server::start();
    let a = TierCache::builder(url_of(&server)).namespace("many").build().await.unwrap();
    let b = TierCache::builder(url_of(&server)).namespace("many").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("batch");
    let calls = |c: &mut common::Conn, name: &str| -> i64 {
        let info = c.info("commandstats");
        common::info_field(&info, &format!("cmdstat_{name}"))
            .and_then(|v| v.split(',').find_map(|kv| kv.strip_prefix("calls=").map(|n| n.parse().unwrap())))
            .unwrap_or(0)
    };
    let mut c = server.conn();
    let (p1, p2, p3) = (profile(1), profile(2), profile(3));
    a.set_many(&[("m1", &p1), ("m2", &p2), ("m3", &p3)], &o).await.unwrap();
    assert_eq!(calls(&mut c, "tiercache.set"), 3);
    // Another process: every key from Redis, in order, a miss as None.
    let got: Vec<Option<Profile>> = b.get_many(&["m1", "nope", "m3", "m2"]).await.unwrap();
    assert_eq!(got, vec![Some(p1.clone()), None, Some(p3.clone()), Some(p2.clone())]);
    assert_eq!(calls(&mut c, "tiercache.get"), 4);
    // The writer's own L1 has them: no command at all.
    let got: Vec<Option<Profile>> = a.get_many(&["m1", "m2", "m3"]).await.unwrap();
    assert_eq!(got, vec![Some(p1.clone()), Some(p2), Some(p3)]);
    assert_eq!(calls(&mut c, "tiercache.get"), 4, "L1 hits sent nothing");
    // The tag applies to every entry of the batch.
    a.invalidate_tags(&["batch"]).await.unwrap();
    let got: Vec<Option<Profile>> = b.get_many(&["m1", "m2"]).await.unwrap();
    assert_eq!(got, vec![None, None]);
    // One pipeline: a refused command fails the call, as one round trip answers it.
    c.ok(&cmd!("SET", a.redis_key("string"), "x"));
    assert!(matches!(a.set_many(&[("m1", &p1), ("string", &p1)], &o).await, Err(Error::Redis(_))));
    assert!(a.get_many::<Profile>(&[]).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_keys_tracking_hears_only_of_keys_it_read() {
    let server = common::Server::start();
    let url = url_of(&server);
    let r = TierCache::builder(&url).namespace("rk").tracking(Tracking::ReadKeys).build().await.unwrap();
    let bcast = TierCache::builder(&url).namespace("rk").build().await.unwrap();
    let w = TierCache::builder(&url).namespace("rk").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60));
    w.set("read", &"v1".to_string(), &o).await.unwrap();
    w.set("unread", &"u1".to_string(), &o).await.unwrap();
    // r reads `read`: from Redis on its tracking connection, then from L1.
    let none = || async { Err::<String, String>("no load".into()) };
    assert_eq!(r.get_or_load("read", &o, none).await.unwrap(), "v1");
    let m = r.metrics();
    assert_eq!(r.get_or_load("read", &o, none).await.unwrap(), "v1");
    assert_eq!(r.metrics().l1_hits, m.l1_hits + 1, "an L1 hit");
    assert_eq!(bcast.get_or_load("read", &o, none).await.unwrap(), "v1");
    let (r0, b0) = (r.metrics().invalidations_received, bcast.metrics().invalidations_received);
    // A write of a key r never read, then of the key it read.
    w.set("unread", &"u2".to_string(), &o).await.unwrap();
    w.set("read", &"v2".to_string(), &o).await.unwrap();
    until("r dropped its copy", || r.metrics().invalidations_received > r0).await;
    until("bcast heard both", || bcast.metrics().invalidations_received >= b0 + 2).await;
    assert_eq!(r.metrics().invalidations_received, r0 + 1, "r heard only of the key it read (pushes arrive in order)");
    assert_eq!(r.get_or_load("read", &o, none).await.unwrap(), "v2");
    // The server remembers r's read keys (BCAST clients cost none); r's own write evicts its copy.
    let info = server.conn().info("stats");
    assert!(common::info_field(&info, "tracking_total_keys").unwrap().parse::<i64>().unwrap() >= 1);
    r.set("read", &"v3".to_string(), &o).await.unwrap();
    assert_eq!(r.get::<String>("read").await.unwrap().as_deref(), Some("v3"));
    w.set("read", &"v4".to_string(), &o).await.unwrap();
    // Its own write untracked the key on the server; its next read tracks it again, so another
    // writer's change still reaches it.
    let t0 = Instant::now();
    while r.get_or_load("read", &o, none).await.unwrap() != "v4" {
        assert!(t0.elapsed() < Duration::from_secs(60), "r kept a stale copy after its own write");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_redis_client_can_be_passed_in() {
    let server = common::Server::start();
    // A RESP2 client: the cache opens its tracking connection in RESP3 from the same settings.
    let client = redis::Client::open(url_of(&server)).unwrap();
    let a = TierCache::builder_with_client(client).namespace("bc").build().await.unwrap();
    let b = TierCache::builder(url_of(&server)).namespace("bc").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60));
    assert_eq!(a.get_or_load("k", &o, || async { Ok::<_, String>("v1".to_string()) }).await.unwrap(), "v1");
    b.set("k", &"v2".to_string(), &o).await.unwrap();
    until("a's L1 copy invalidated through its tracking connection", || a.metrics().invalidations_received > 0).await;
    assert_eq!(a.get::<String>("k").await.unwrap().as_deref(), Some("v2"));
}

/// Read-key tracking is refused in cluster mode (a read redirected by MOVED/ASK would land in L1
/// untracked); the refusal comes from `build()`, before any connection.
#[tokio::test]
async fn read_keys_tracking_is_refused_on_a_cluster() {
    let r = TierCache::builder_cluster(["redis://127.0.0.1:1"]).tracking(Tracking::ReadKeys).build().await;
    let e = r.err().expect("ReadKeys on a cluster must not build");
    assert_eq!(e.kind(), redis::ErrorKind::InvalidClientConfig);
    assert!(e.to_string().contains("ReadKeys"), "{e}");
}

/// The trade-off of [`Tracking::ReadKeys`], printed for BENCHMARKS.md: 4 clients of each mode read the
/// same 100 of 1,000 keys, then another client rewrites all 1,000 keys one by one. Broadcast clients hear
/// of every write; read-keys clients only of the keys they read, and the server keeps a (key, client)
/// record for each read key meanwhile (`tracking_total_items`, `used_memory`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_keys_tracking_trade_off() {
    const KEYS: usize = 1000;
    const READ: usize = 100;
    const CLIENTS: usize = 4;
    let server = common::Server::start();
    let url = url_of(&server);
    let o = Opts::default().ttl(Duration::from_secs(600));
    let w = TierCache::builder(&url).namespace("to").build().await.unwrap();
    let keys: Vec<String> = (0..KEYS).map(|n| format!("k{n}")).collect();
    let v = "x".repeat(100);
    for k in &keys {
        w.set(k, &v, &o).await.unwrap();
    }
    let mut figures = Vec::new();
    for mode in [Tracking::Broadcast, Tracking::ReadKeys] {
        let mut c = server.conn();
        let mem = |c: &mut common::Conn, f: &str| -> i64 {
            let s = c.info("all");
            common::info_field(&s, f).unwrap().parse().unwrap()
        };
        let mut readers = Vec::new();
        for _ in 0..CLIENTS {
            readers.push(TierCache::builder(&url).namespace("to").tracking(mode).build().await.unwrap());
        }
        let mem0 = mem(&mut c, "used_memory");
        for r in &readers {
            for k in keys.iter().take(READ) {
                let got = r.get_or_load(k, &o, || async { Err::<String, String>("no load".into()) }).await.unwrap();
                assert_eq!(got.len(), 100);
            }
        }
        let items = mem(&mut c, "tracking_total_items");
        let mem1 = mem(&mut c, "used_memory");
        let before: Vec<u64> = readers.iter().map(|r| r.metrics().invalidations_received).collect();
        for k in &keys {
            w.set(k, &v, &o).await.unwrap();
        }
        // The last key every reader read is rewritten last: once each reader's copy of it is gone,
        // every earlier push has been applied (one connection, in order).
        w.set(&keys[0], &v, &o).await.unwrap();
        for r in &readers {
            let t0 = Instant::now();
            while r.get_with::<String>(&keys[0], &Opts::default().skip_l2()).await.unwrap().is_some() {
                assert!(t0.elapsed() < Duration::from_secs(60), "no invalidation reached a reader");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let msgs: Vec<u64> = readers.iter().zip(&before).map(|(r, b)| r.metrics().invalidations_received - b).collect();
        let per_client = msgs.iter().sum::<u64>() as f64 / CLIENTS as f64;
        println!(
            "tracking {mode:?}: {CLIENTS} clients x {READ} keys read of {KEYS}, {} writes: invalidation messages per client {per_client:.0} ({msgs:?}); server tracking_total_items {items}, used_memory +{} bytes over the reads",
            KEYS + 1,
            mem1 - mem0
        );
        figures.push((per_client, items));
        drop(readers);
    }
    let ((bcast_msgs, bcast_items), (read_msgs, read_items)) = (figures[0], figures[1]);
    assert!(read_msgs < bcast_msgs, "read-keys clients hear of fewer writes");
    assert_eq!(bcast_items, 0, "broadcast keeps no per-key records");
    assert_eq!(read_items, (READ * CLIENTS) as i64, "read-keys: one record per (key, client) read");
}
