//! The client on a real Redis Cluster (3 masters + 3 replicas, each with the module), started once for
//! this test binary: one test function runs the scenarios in order (the last ones change the cluster:
//! resharding, then failover), so the cluster is started once and killed at the end.
//!
//! Scenarios marked CLUSTER-WIDE need the server's cluster-wide `TIERCACHE.INVALIDATE` (issue 10, the
//! server side): they probe for it first and say SKIPPED on a server without it.

#[path = "common/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::Cluster;
use parking_lot::Mutex;
use tiercache_client::{Opts, TierCache};

const TAG: &str = "grp";
const NS: &str = "cl";

/// The "database": what loaders read, shared by every cache of this process.
#[derive(Clone, Default)]
struct Db {
    rows: Arc<Mutex<HashMap<String, String>>>,
    loads: Arc<Mutex<HashMap<String, u32>>>,
}

impl Db {
    fn put(&self, k: &str, v: &str) {
        self.rows.lock().insert(k.to_owned(), v.to_owned());
    }
    fn loads(&self, k: &str) -> u32 {
        self.loads.lock().get(k).copied().unwrap_or(0)
    }
    fn total_loads(&self) -> u32 {
        self.loads.lock().values().sum()
    }
}

fn opts() -> Opts {
    Opts::default().ttl(Duration::from_secs(120)).tag(TAG)
}

async fn read(c: &TierCache, db: &Db, key: &str) -> String {
    let db = db.clone();
    let k = key.to_owned();
    c.get_or_load(key, &opts(), move || async move {
        *db.loads.lock().entry(k.clone()).or_default() += 1;
        // Long enough for the other readers of the fleet to park on the lease.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok::<_, String>(db.rows.lock().get(&k).cloned().unwrap_or_else(|| "none".into()))
    })
    .await
    .expect("get_or_load")
}

async fn cache(cl: &Cluster) -> TierCache {
    cache_ns(cl, NS).await
}

async fn cache_ns(cl: &Cluster, ns: &str) -> TierCache {
    TierCache::builder_cluster(cl.urls())
        .namespace(ns)
        .topology_check(Duration::from_millis(200))
        .wait_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("cluster cache")
}

/// Polls `f` until it is true (bounded; the bound is a failure, not a timing assertion).
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f().await {
        assert!(Instant::now() < deadline, "not within 15 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The node index of each master (by the three ranges `redis-cli --cluster create` assigns).
fn masters(cl: &Cluster) -> Vec<usize> {
    [0, 5461, 10923].iter().map(|&s| cl.master_of_slot(0, s)).collect()
}

fn slot(cl: &Cluster, full_key: &str) -> u16 {
    cl.cli(0, &["CLUSTER", "KEYSLOT", full_key]).trim().parse().expect("keyslot")
}

/// Keys of the namespace with the master (node index) each lives on; every master has some.
fn keys_by_master(cl: &Cluster, c: &TierCache, n: usize) -> Vec<(String, usize)> {
    let keys: Vec<(String, usize)> = (0..n)
        .map(|i| {
            let k = format!("item:{i}");
            let m = cl.master_of_slot(0, slot(cl, &c.redis_key(&k)));
            (k, m)
        })
        .collect();
    let mut masters: Vec<usize> = keys.iter().map(|(_, m)| *m).collect();
    masters.sort();
    masters.dedup();
    assert_eq!(masters.len(), 3, "the test keys must cover every master: {keys:?}");
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_suite() {
    let mut cl = Cluster::start();
    let db = Db::default();
    reads_route_by_key(&cl, &db).await;
    many_keys_across_slots(&cl).await;
    one_load_per_miss_across_instances(&cl).await;
    key_coherence_across_shards(&cl, &db).await;
    tag_messages_per_node_no_false_gaps(&cl, &db).await;
    gap_on_one_node_drops_its_slots_only(&cl, &db).await;
    cluster_wide_invalidate_tags(&cl, &db).await;
    moved_during_resharding(&cl, &db).await;
    failover_of_one_master(&mut cl, &db).await;
}

/// Reads and fills of keys on every master; the second read is an L1 hit; the entries are on the
/// masters their slots say.
async fn reads_route_by_key(cl: &Cluster, db: &Db) {
    let c = cache(cl).await;
    let keys = keys_by_master(cl, &c, 24);
    for (k, _) in &keys {
        db.put(k, &format!("v1-{k}"));
    }
    for (k, _) in &keys {
        assert_eq!(read(&c, db, k).await, format!("v1-{k}"));
    }
    let hits = c.metrics().l1_hits;
    for (k, _) in &keys {
        assert_eq!(read(&c, db, k).await, format!("v1-{k}"));
    }
    assert_eq!(c.metrics().l1_hits - hits, keys.len() as u64, "second reads come from L1");
    for (k, m) in &keys {
        let full = c.redis_key(k);
        let state = cl.cli(*m, &["TIERCACHE.META", &full]);
        assert!(state.contains("fresh"), "{full} on node {m}: {state}");
    }
    // A plain get through the cluster connection, and set/delete.
    let (k, _) = &keys[0];
    c.set(k, &"direct".to_string(), &opts()).await.expect("set");
    assert_eq!(c.get::<String>(k).await.expect("get").as_deref(), Some("direct"));
    c.delete(k).await.expect("delete");
    assert_eq!(c.get::<String>(k).await.expect("get"), None);
    for (k, _) in &keys {
        db.put(k, &format!("v1-{k}"));
    }
}

/// `set_many`/`get_many` over keys of every master: one pipeline per slot (a pipeline across slots is
/// refused by redis-rs with CROSSSLOT), each entry on its own master, all read back by a cache whose L1
/// is empty (so every key goes through the pipelines); keys sharing a hash tag share a pipeline.
async fn many_keys_across_slots(cl: &Cluster) {
    let a = cache_ns(cl, "many").await;
    let b = cache_ns(cl, "many").await;
    let mut keys: Vec<String> = keys_by_master(cl, &a, 24).into_iter().map(|(k, _)| k).collect();
    keys.extend((0..4).map(|i| format!("{{grp}}:{i}")));
    let values: Vec<String> = keys.iter().map(|k| format!("many-{k}")).collect();
    let items: Vec<(&str, &String)> = keys.iter().map(String::as_str).zip(&values).collect();
    a.set_many(&items, &opts()).await.expect("set_many across slots");
    for k in &keys {
        let full = a.redis_key(k);
        let m = cl.master_of_slot(0, slot(cl, &full));
        assert!(cl.cli(m, &["TIERCACHE.META", &full]).contains("fresh"), "{full} on node {m}");
    }
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got: Vec<Option<String>> = b.get_many(&refs).await.expect("get_many across slots");
    assert_eq!(got, values.iter().cloned().map(Some).collect::<Vec<_>>());
}

/// Four caches (separate connections, as separate processes would have) and eight readers each: one
/// database load per key for the whole fleet, wherever the key's master is.
async fn one_load_per_miss_across_instances(cl: &Cluster) {
    let db = Db::default();
    let mut caches = Vec::new();
    for _ in 0..4 {
        caches.push(cache_ns(cl, "fleet").await);
    }
    let keys = keys_by_master(cl, &caches[0], 12);
    for (k, _) in &keys {
        db.put(k, &format!("row-{k}"));
    }
    let mut tasks = Vec::new();
    for c in &caches {
        for _ in 0..8 {
            for (k, _) in &keys {
                let (c, db, k) = (c.clone(), db.clone(), k.clone());
                tasks.push(tokio::spawn(async move { (read(&c, &db, &k).await, k) }));
            }
        }
    }
    for t in tasks {
        let (v, k) = t.await.expect("reader");
        assert_eq!(v, format!("row-{k}"));
    }
    for (k, m) in &keys {
        assert_eq!(db.loads(k), 1, "{k} (master node {m}) loaded {} times", db.loads(k));
    }
    println!("one load per miss: {} keys, 32 readers each over 4 caches, {} loads", keys.len(), db.total_loads());
}

/// A write through one cache reaches another cache's L1 through the key's master's feed.
async fn key_coherence_across_shards(cl: &Cluster, db: &Db) {
    let (a, b) = (cache(cl).await, cache(cl).await);
    let keys = keys_by_master(cl, &a, 24);
    for (k, _) in &keys {
        assert_eq!(read(&b, db, k).await, format!("v1-{k}"));
        assert_eq!(read(&b, db, k).await, format!("v1-{k}"), "L1");
    }
    for (k, _) in &keys {
        a.set(k, &format!("v2-{k}"), &opts()).await.expect("set");
    }
    for (k, m) in &keys {
        eventually(&format!("b sees the write of {k} (node {m})"), || async { read(&b, db, k).await == format!("v2-{k}") }).await;
    }
    for (k, _) in &keys {
        db.put(k, &format!("v2-{k}"));
    }
}

/// Every master publishes its own messages (with its own run_id and seq), and Redis Cluster forwards
/// each PUBLISH to every node: a cache listening to all masters must apply each node's messages and
/// never see a gap in the interleaving. `TIERCACHE.INVALIDATE` sent to each master directly (what a
/// node-local invalidation is).
async fn tag_messages_per_node_no_false_gaps(cl: &Cluster, db: &Db) {
    let b = cache(cl).await;
    let keys = keys_by_master(cl, &b, 24);
    for (k, _) in &keys {
        assert_eq!(read(&b, db, k).await, format!("v2-{k}"));
    }
    let resets = b.metrics().l1_resets;
    for round in 3..8 {
        for (k, _) in &keys {
            db.put(k, &format!("v{round}-{k}"));
        }
        for m in masters(cl) {
            cl.cli(m, &["TIERCACHE.INVALIDATE", TAG]);
        }
        for (k, m) in &keys {
            eventually(&format!("tag message reaches {k} (node {m})"), || async {
                read(&b, db, k).await == format!("v{round}-{k}")
            })
            .await;
        }
    }
    assert_eq!(b.metrics().l1_resets, resets, "interleaved messages of 3 masters taken for gaps");
}

/// A gap in one master's messages (one published on another channel) drops the L1 entries of that
/// master's slots and no others.
async fn gap_on_one_node_drops_its_slots_only(cl: &Cluster, db: &Db) {
    let c = cache(cl).await;
    let keys = keys_by_master(cl, &c, 24);
    for (k, _) in &keys {
        read(&c, db, k).await;
    }
    let victim = keys[0].1;
    // A first message from the victim, so that its feed has a (run_id, seq) to compare with.
    let received = c.metrics().invalidations_received;
    cl.cli(victim, &["TIERCACHE.INVALIDATE", "unrelated-0"]);
    eventually("the victim's message arrives", || async { c.metrics().invalidations_received > received }).await;
    let resets = c.metrics().l1_resets;
    cl.cli(victim, &["CONFIG", "SET", "tiercache.invalidation-channel", "elsewhere"]);
    cl.cli(victim, &["TIERCACHE.INVALIDATE", "unrelated-1"]);
    cl.cli(victim, &["CONFIG", "SET", "tiercache.invalidation-channel", "tiercache:invalidations"]);
    cl.cli(victim, &["TIERCACHE.INVALIDATE", "unrelated-2"]);
    eventually("the gap is noticed", || async { c.metrics().l1_resets > resets }).await;
    for (k, m) in &keys {
        let (hits, loads) = (c.metrics().l1_hits, db.total_loads());
        read(&c, db, k).await;
        let from_l1 = c.metrics().l1_hits > hits;
        assert_eq!(from_l1, *m != victim, "{k} on node {m} (gap on node {victim}): L1 hit = {from_l1}");
        assert_eq!(db.total_loads(), loads, "{k} is still in Redis");
    }
}

/// Whether `TIERCACHE.INVALIDATE` sent to one master invalidates the tag on the others (the server's
/// cluster-wide form, issue 10 server side).
fn server_invalidates_cluster_wide(cl: &Cluster) -> bool {
    let probe_key = "probe:{x}";
    let m = cl.master_of_slot(0, slot(cl, probe_key));
    let other = masters(cl).into_iter().find(|&o| o != m).expect("another master");
    cl.cli(m, &["TIERCACHE.SET", probe_key, "v", "PX", "60000", "TAGS", "1", "probe-tag"]);
    cl.cli(other, &["TIERCACHE.INVALIDATE", "probe-tag"]);
    let state = cl.cli(m, &["TIERCACHE.META", probe_key]);
    !state.contains("fresh")
}

/// CLUSTER-WIDE: `invalidate_tags` through one cache; as soon as it replied, no read anywhere returns an
/// old value from Redis (this cache's reads right away; another cache's once the messages arrive).
async fn cluster_wide_invalidate_tags(cl: &Cluster, db: &Db) {
    if !server_invalidates_cluster_wide(cl) {
        println!("SKIPPED cluster_wide_invalidate_tags: the server invalidates node-locally (needs branch cluster-server)");
        return;
    }
    let (a, b) = (cache(cl).await, cache(cl).await);
    let keys = keys_by_master(cl, &a, 24);
    for round in 10..15 {
        for (k, _) in &keys {
            read(&a, db, k).await;
            read(&b, db, k).await;
        }
        for (k, _) in &keys {
            db.put(k, &format!("v{round}-{k}"));
        }
        let n = a.invalidate_tags(&[TAG]).await.expect("invalidate_tags");
        assert!(n >= keys.len() as u64, "cluster-wide count {n} < {} keys", keys.len());
        for (k, m) in &keys {
            assert_eq!(read(&a, db, k).await, format!("v{round}-{k}"), "stale read of {k} (node {m}) after the reply");
        }
        for (k, m) in &keys {
            eventually(&format!("b sees {k} (node {m})"), || async { read(&b, db, k).await == format!("v{round}-{k}") }).await;
        }
    }
}

/// Moves the slot of a cached key to another master (CLUSTER SETSLOT + MIGRATE, what
/// `redis-cli --cluster reshard` does) while caches read it: reads during the move follow ASK, after it
/// MOVED; no load happens (the entry moved with its value) and writes reach the new owner.
async fn moved_during_resharding(cl: &Cluster, db: &Db) {
    let (a, b) = (cache(cl).await, cache(cl).await);
    let keys = keys_by_master(cl, &a, 24);
    let (key, from) = keys[0].clone();
    let full = a.redis_key(&key);
    let s = slot(cl, &full).to_string();
    let to = masters(cl).into_iter().find(|&m| m != from).expect("another master");
    // Its own tag: a RESTOREd entry carrying a tag invalidated within the server's window (the
    // cluster-wide scenario just invalidated TAG) lands invalidated on purpose (the migration race).
    let want = "before-move".to_string();
    a.set(&key, &want, &Opts::default().ttl(Duration::from_secs(120)).tag("moving")).await.expect("set");
    assert_eq!(read(&a, db, &key).await, want);
    let (from_id, to_id) = (cl.id(from), cl.id(to));
    assert!(cl.cli(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]).contains("OK"));
    assert!(cl.cli(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]).contains("OK"));
    let to_port = cl.nodes[to].port.to_string();
    let out = cl.cli(from, &["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS", &full]);
    assert!(out.contains("OK"), "MIGRATE: {out}");
    // Mid-move: the key is on the target, the slot still the source's (ASK redirection).
    let loads = db.total_loads();
    let fresh = cache(cl).await;
    assert_eq!(read(&fresh, db, &key).await, want, "read during the move (ASK)");
    // Target first, then source, then the others (the order redis-cli uses).
    cl.cli(to, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
    for m in masters(cl) {
        cl.cli(m, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
    }
    cl.wait_ok();
    // After: MOVED for every connection that still has the old slot map.
    let fresh2 = cache(cl).await;
    assert_eq!(read(&fresh2, db, &key).await, want, "read after the move (MOVED)");
    assert_eq!(db.total_loads(), loads, "the entry moved with its value: no load");
    assert_eq!(cl.master_of_slot(0, slot(cl, &full)), to);
    // A write through a cache whose slot map is old lands on the new owner; the other cache hears of it.
    read(&b, db, &key).await;
    a.set(&key, &"after-move".to_string(), &opts()).await.expect("set after move");
    assert!(cl.cli(to, &["TIERCACHE.GET", &full]).contains("after-move"));
    eventually("b sees the write to the moved key", || async { read(&b, db, &key).await == "after-move" }).await;
    a.delete(&key).await.expect("delete");
}

/// `CLUSTER FAILOVER` on the replica of a master holding cached keys: the cache notices the new master,
/// drops L1 (see the README's cluster limits: the whole L1), and keeps reading every key with no load
/// (the replica had the entries) and writing to the new master.
async fn failover_of_one_master(cl: &mut Cluster, db: &Db) {
    let c = cache(cl).await;
    let keys = keys_by_master(cl, &c, 24);
    for (k, _) in &keys {
        read(&c, db, k).await;
    }
    let victim = keys[1].1;
    let replica = cl.replica_of(victim);
    let entries = c.metrics().l1_entries;
    assert!(entries >= keys.len() as u64 - 1, "L1 holds the keys: {entries}");
    let resets = c.metrics().l1_resets;
    // The replica must have every write before it takes over.
    cl.cli(victim, &["WAIT", "1", "5000"]);
    let out = cl.cli(replica, &["CLUSTER", "FAILOVER"]);
    assert!(out.contains("OK"), "CLUSTER FAILOVER: {out}");
    eventually("the replica is master", || async { cl.cli(replica, &["ROLE"]).starts_with("master") }).await;
    cl.wait_ok();
    eventually("L1 dropped after the failover", || async {
        let _ = c.get::<String>("item:0").await;
        c.metrics().l1_resets > resets
    })
    .await;
    let loads = db.total_loads();
    for (k, m) in &keys {
        let got = read(&c, db, k).await;
        assert!(got.starts_with('v') && got.ends_with(k.as_str()), "{k} (node {m}) read {got} after the failover");
    }
    assert_eq!(db.total_loads(), loads, "the promoted replica serves the same entries: no load");
    let (k, m) = &keys[1];
    c.set(k, &"after-failover".to_string(), &opts()).await.expect("set after failover");
    assert_eq!(cl.master_of_slot(0, slot(cl, &c.redis_key(k))), replica, "{k} was on node {m}");
    assert!(cl.cli(replica, &["TIERCACHE.GET", &c.redis_key(k)]).contains("after-failover"));
}
