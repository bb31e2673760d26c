//! Redis Cluster: one cluster (3 masters + 3 replicas, `tests/common/cluster.rs`) shared by every test of
//! this binary, one test at a time. Cross-shard INVALIDATE/TAGCOUNT/TAGKEYS from every master (RESP2 and
//! RESP3) reaching the replicas too, LOCAL, the timeout error naming a stopped master (and its late
//! answer ignored), MULTI and Lua, slot migration (entries kept exact, the source's index dropping what
//! left, the migration/invalidation race), resharding under a live tagged load checked key by key, and
//! failover by CLUSTER FAILOVER and by a killed master (entries, invalidated state, fenced fills).

mod common;
#[path = "common/cluster.rs"]
mod harness;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ms, Proto, Value};
use harness::Cluster;

proto_tests!(invalidate_from_every_master, tagcount_and_tagkeys_cluster_wide, tagkeys_cluster_wide_filtered_by_the_callers_acl);

fn with_cluster<R>(f: impl FnOnce(&mut Cluster) -> R) -> R {
    let mut g = harness::shared();
    let c = g.as_mut().expect("cluster");
    f(c)
}

/// Keys named `{prefix}:{n}` until every master serves at least `per_master` of them; key -> master port.
fn keys_on_every_master(c: &mut Cluster, prefix: &str, per_master: usize) -> Vec<(String, u16)> {
    let masters = c.masters();
    let mut out = Vec::new();
    let mut counts: HashMap<u16, usize> = HashMap::new();
    let mut n = 0;
    while masters.iter().any(|m| counts.get(m).copied().unwrap_or(0) < per_master) {
        let key = format!("{prefix}:{n}");
        n += 1;
        let m = c.master_for(key.as_bytes());
        let have = counts.entry(m).or_default();
        if *have < per_master {
            *have += 1;
            out.push((key, m));
        }
    }
    out
}

fn set(c: &Cluster, port: u16, key: &str, value: &str, tags: &[&str]) {
    let mut conn = c.conn(port, Proto::Resp2);
    let mut cmd = cmd!("TIERCACHE.SET", key, value, "EX", 600);
    if !tags.is_empty() {
        cmd.arg("TAGS").arg(tags.len()).arg(tags);
    }
    conn.ok(&cmd);
}

fn get(c: &Cluster, port: u16, key: &str) -> Option<Vec<u8>> {
    c.conn(port, Proto::Resp2).get(key)
}

/// A read on a replica (READONLY), after `WAIT` on its master.
fn get_on_replica(c: &mut Cluster, master: u16, key: &str) -> Option<Vec<u8>> {
    let replica = c.replica_of(master);
    let acked = c.conn(master, Proto::Resp2).int(&cmd!("WAIT", 1, 5000));
    assert_eq!(acked, 1, "replica of {master} did not acknowledge");
    let mut r = c.conn(replica, Proto::Resp2);
    r.ok(&cmd!("READONLY"));
    r.get(key)
}

fn as_int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn invalidate_from_every_master(p: Proto) {
    with_cluster(|c| {
        let masters = c.masters();
        for (round, &from) in masters.iter().enumerate() {
            let tag = format!("inv-{p:?}-{round}");
            let keys = keys_on_every_master(c, &format!("inv:{p:?}:{round}"), 2);
            for (k, m) in &keys {
                set(c, *m, k, "v", &[&tag, "other"]);
            }
            // Before: every key readable on its master and on that master's replica.
            for (k, m) in &keys {
                assert_eq!(get(c, *m, k).as_deref(), Some(&b"v"[..]));
                assert_eq!(get_on_replica(c, *m, k).as_deref(), Some(&b"v"[..]));
            }
            let mut conn = c.conn(from, p);
            let n = as_int(&conn.run(&cmd!("TIERCACHE.INVALIDATE", &tag)));
            assert_eq!(n, keys.len() as i64, "cluster-wide count from {from}");
            // The reply came after every master applied it: nothing is readable anywhere, at once.
            for (k, m) in &keys {
                assert_eq!(get(c, *m, k), None, "{k} on master {m} after INVALIDATE from {from}");
                assert_eq!(get_on_replica(c, *m, k), None, "{k} on the replica of {m}");
            }
            // The other tag still indexes nothing invalidated twice: a second INVALIDATE counts 0.
            assert_eq!(as_int(&conn.run(&cmd!("TIERCACHE.INVALIDATE", &tag))), 0);
        }
    })
}

fn tagcount_and_tagkeys_cluster_wide(p: Proto) {
    with_cluster(|c| {
        let tag = format!("count-{p:?}");
        let keys = keys_on_every_master(c, &format!("cnt:{p:?}"), 3);
        for (k, m) in &keys {
            set(c, *m, k, "v", &[&tag]);
        }
        let masters = c.masters();
        for &m in &masters {
            let mut conn = c.conn(m, p);
            assert_eq!(conn.int(&cmd!("TIERCACHE.TAGCOUNT", &tag)), keys.len() as i64, "from {m}");
            let local = keys.iter().filter(|(_, km)| *km == m).count() as i64;
            assert_eq!(conn.int(&cmd!("TIERCACHE.TAGCOUNT", &tag, "LOCAL")), local);
            let mut got = keys_of(conn.run(&cmd!("TIERCACHE.TAGKEYS", &tag)));
            got.sort();
            let mut want: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
            want.sort();
            assert_eq!(got, want, "TAGKEYS from {m}");
            assert_eq!(keys_of(conn.run(&cmd!("TIERCACHE.TAGKEYS", &tag, "COUNT", 4))).len(), 4);
            let local_keys = keys_of(conn.run(&cmd!("TIERCACHE.TAGKEYS", &tag, "LOCAL", "COUNT", 100)));
            assert_eq!(local_keys.len() as i64, local);
            assert!(local_keys.iter().all(|k| keys.iter().any(|(kk, km)| kk == k && *km == m)));
        }
        // A replica asking counts the masters' entries.
        let replica = c.replica_of(masters[0]);
        assert_eq!(c.conn(replica, p).int(&cmd!("TIERCACHE.TAGCOUNT", &tag)), keys.len() as i64);
        c.conn(masters[1], p).int(&cmd!("TIERCACHE.INVALIDATE", &tag));
        assert_eq!(c.conn(masters[2], p).int(&cmd!("TIERCACHE.TAGCOUNT", &tag)), 0);
    })
}

/// A user limited to `~tenA:*` asks for a tag's keys cluster-wide: the answer lists the tenA keys of
/// every master and none of tenB's (the filter runs on the asking node, by user name, after the other
/// masters answered).
fn tagkeys_cluster_wide_filtered_by_the_callers_acl(p: Proto) {
    with_cluster(|c| {
        let tag = format!("tenA:shared-{p:?}");
        let a = keys_on_every_master(c, &format!("tenA:{p:?}"), 2);
        let b = keys_on_every_master(c, &format!("tenB:{p:?}"), 2);
        for (k, m) in a.iter().chain(&b) {
            set(c, *m, k, "v", &[&tag]);
        }
        let masters = c.masters();
        let user = format!("tenant-{p:?}");
        for &m in &masters {
            c.conn(m, Proto::Resp2).ok(&cmd!("ACL", "SETUSER", &user, "on", "nopass", "~tenA:*", "+@all"));
        }
        let mut want: Vec<String> = a.iter().map(|(k, _)| k.clone()).collect();
        want.sort();
        for &m in &masters {
            let mut conn = c.conn(m, p);
            conn.ok(&cmd!("AUTH", &user, "x"));
            let mut got = keys_of(conn.run(&cmd!("TIERCACHE.TAGKEYS", &tag)));
            got.sort();
            assert_eq!(got, want, "TAGKEYS as {user} from {m}");
            // The unrestricted default user sees both tenants' keys.
            let all = keys_of(c.conn(m, p).run(&cmd!("TIERCACHE.TAGKEYS", &tag)));
            assert_eq!(all.len(), a.len() + b.len(), "TAGKEYS as default from {m}");
        }
        for &m in &masters {
            c.conn(m, Proto::Resp2).int(&cmd!("ACL", "DELUSER", &user));
        }
        c.conn(masters[0], p).int(&cmd!("TIERCACHE.INVALIDATE", &tag));
    })
}

fn keys_of(v: Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|i| match i {
                Value::BulkString(b) => String::from_utf8(b).unwrap(),
                other => panic!("not a key: {other:?}"),
            })
            .collect(),
        other => panic!("not an array: {other:?}"),
    }
}

#[test]
fn local_invalidates_one_master_only() {
    with_cluster(|c| {
        let keys = keys_on_every_master(c, "local", 2);
        for (k, m) in &keys {
            set(c, *m, k, "v", &["local-tag"]);
        }
        let m0 = c.masters()[0];
        let n = c.conn(m0, Proto::Resp2).int(&cmd!("TIERCACHE.INVALIDATE", "LOCAL", "local-tag"));
        assert_eq!(n, 2);
        for (k, m) in &keys {
            let want = if *m == m0 { None } else { Some(b"v".to_vec()) };
            assert_eq!(get(c, *m, k), want, "{k} on {m}");
            assert_eq!(get_on_replica(c, *m, k), want, "{k} on the replica of {m}");
        }
        // `INVALIDATE LOCAL` alone names a tag called LOCAL (no tags follow the option).
        assert_eq!(c.conn(m0, Proto::Resp2).int(&cmd!("TIERCACHE.INVALIDATE", "LOCAL")), 0);
        assert_eq!(c.conn(m0, Proto::Resp2).int(&cmd!("TIERCACHE.INVALIDATE", "local-tag")), 4);
    })
}

#[test]
fn a_master_that_does_not_answer_is_named_in_the_error() {
    with_cluster(|c| {
        let keys = keys_on_every_master(c, "timeout", 1);
        for (k, m) in &keys {
            set(c, *m, k, "v", &["slow-tag"]);
        }
        let masters = c.masters();
        let (from, stopped) = (masters[0], masters[1]);
        let stopped_id = c.id_of(stopped);
        let mut conn = c.conn(from, Proto::Resp3);
        conn.ok(&cmd!("CONFIG", "SET", "tiercache.cluster-timeout-ms", 300));
        let before = stat(&mut conn, "cluster_timeouts");
        c.pause(stopped, true);
        let err = conn.err(&cmd!("TIERCACHE.INVALIDATE", "slow-tag"));
        let count_err = conn.err(&cmd!("TIERCACHE.TAGCOUNT", "slow-tag"));
        c.pause(stopped, false);
        conn.ok(&cmd!("CONFIG", "SET", "tiercache.cluster-timeout-ms", 5000));
        assert!(err.starts_with("TIMEOUT cluster-wide TIERCACHE.INVALIDATE got no answer within 300 ms"), "{err}");
        assert!(err.contains(&stopped_id) && err.contains(&format!("127.0.0.1:{stopped}")), "{err}");
        for m in &masters[2..] {
            assert!(!err.contains(&c.id_of(*m)), "{err} names a master that answered");
        }
        assert!(count_err.contains(&stopped_id) && count_err.contains("TAGCOUNT"), "{count_err}");
        assert_eq!(stat(&mut conn, "cluster_timeouts"), before + 2);
        // The masters that answered applied it; the stopped one applies it when it resumes (its late
        // acknowledgement is dropped). Nothing survives once it ran.
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.conn(stopped, Proto::Resp2).int(&cmd!("TIERCACHE.TAGCOUNT", "slow-tag", "LOCAL")) != 0 {
            assert!(Instant::now() < deadline, "the stopped master never applied the request");
            std::thread::sleep(ms(20));
        }
        for (k, m) in &keys {
            assert_eq!(get(c, *m, k), None, "{k} on {m}");
        }
        // The next request is answered correctly (late acks of the first one do not count towards it).
        for (k, m) in &keys {
            set(c, *m, k, "v", &["slow-tag"]);
        }
        assert_eq!(conn.int(&cmd!("TIERCACHE.INVALIDATE", "slow-tag")), keys.len() as i64);
        assert_eq!(stat(&mut conn, "cluster_pending"), 0);
    })
}

fn stat(conn: &mut common::Conn, name: &str) -> i64 {
    let v = conn.run(&cmd!("TIERCACHE.STATS"));
    let pairs: Vec<(String, i64)> = match v {
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (Value::BulkString(k), Value::Int(v)) => (String::from_utf8(k).unwrap(), v),
                other => panic!("{other:?}"),
            })
            .collect(),
        Value::Array(a) => a
            .chunks(2)
            .map(|p| match (&p[0], &p[1]) {
                (Value::BulkString(k), Value::Int(v)) => (String::from_utf8(k.clone()).unwrap(), *v),
                other => panic!("{other:?}"),
            })
            .collect(),
        other => panic!("{other:?}"),
    };
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no stat {name}"))
}

#[test]
fn multi_and_lua_refuse_the_cluster_wide_form() {
    with_cluster(|c| {
        let (k, m) = keys_on_every_master(c, "multi", 1).remove(0);
        set(c, m, &k, "v", &["multi-tag"]);
        let mut conn = c.conn(m, Proto::Resp2);
        conn.ok(&cmd!("MULTI"));
        conn.run(&cmd!("TIERCACHE.INVALIDATE", "multi-tag"));
        conn.run(&cmd!("TIERCACHE.TAGCOUNT", "multi-tag"));
        conn.run(&cmd!("TIERCACHE.INVALIDATE", "LOCAL", "multi-tag"));
        let exec = conn.run(&cmd!("EXEC"));
        let Value::Array(items) = exec else { panic!("{exec:?}") };
        match &items[0] {
            Value::ServerError(e) => {
                let text = common::error_text(e);
                assert!(text.starts_with("ERR cluster-wide TIERCACHE.INVALIDATE cannot wait"), "{text}");
                assert!(text.contains("TIERCACHE.INVALIDATE LOCAL"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&items[1], Value::ServerError(_)), "{:?}", items[1]);
        assert_eq!(items[2], Value::Int(1));
        assert_eq!(get(c, m, &k), None);
        let err = conn.err(&cmd!("EVAL", "return redis.call('TIERCACHE.INVALIDATE', 'multi-tag')", 0));
        assert!(err.contains("cannot wait for the other masters"), "{err}");
        assert_eq!(conn.int(&cmd!("EVAL", "return redis.call('TIERCACHE.INVALIDATE', 'LOCAL', 'multi-tag')", 0)), 0);
    })
}

/// Moves `slot` from its master to `to` with CLUSTER SETSLOT + MIGRATE (what `redis-cli --cluster
/// reshard` does), running `between` after the keys are in MIGRATING/IMPORTING state and before MIGRATE.
fn move_slot(c: &mut Cluster, slot: u16, to: u16, between: impl FnOnce(&mut Cluster)) {
    let from = c.master_for_slot(slot);
    assert_ne!(from, to);
    let (from_id, to_id) = (c.id_of(from), c.id_of(to));
    c.conn(to, Proto::Resp2).ok(&cmd!("CLUSTER", "SETSLOT", slot, "IMPORTING", &from_id));
    c.conn(from, Proto::Resp2).ok(&cmd!("CLUSTER", "SETSLOT", slot, "MIGRATING", &to_id));
    between(c);
    let mut src = c.conn(from, Proto::Resp2);
    loop {
        let keys = src.run(&cmd!("CLUSTER", "GETKEYSINSLOT", slot, 100));
        let keys = keys_of(keys);
        if keys.is_empty() {
            break;
        }
        let mut mig = cmd!("MIGRATE", "127.0.0.1", to, "", 0, 5000, "KEYS");
        mig.arg(&keys);
        src.ok(&mig);
    }
    for m in c.masters() {
        c.conn(m, Proto::Resp2).ok(&cmd!("CLUSTER", "SETSLOT", slot, "NODE", &to_id));
    }
    // Every node (replicas too) learns the new owner before the test reads there.
    c.wait_ok(Duration::from_secs(30));
}

#[test]
fn migration_keeps_entries_and_an_invalidation_racing_it_wins() {
    with_cluster(|c| {
        let masters = c.masters();
        // Two keys in one slot (hash tag), on masters[0]; moved to masters[1].
        let mut n = 0;
        let (keep, racy, slot) = loop {
            let keep = format!("mig:{{h{n}}}:keep");
            if c.master_for(keep.as_bytes()) == masters[0] {
                let slot = c.slot_of(keep.as_bytes());
                break (keep, format!("mig:{{h{n}}}:racy"), slot);
            }
            n += 1;
        };
        let target = masters[1];
        let mut src = c.conn(masters[0], Proto::Resp2);
        src.ok(&cmd!("TIERCACHE.SET", &keep, "kept", "EX", 600, "STALE", 100, "TAGS", 2, "mig-keep", "both"));
        src.ok(&cmd!("TIERCACHE.SET", &racy, "old", "EX", 600, "TAGS", 2, "mig-racy", "both"));
        let meta_before = src.run(&cmd!("TIERCACHE.META", &keep));
        assert_eq!(src.int(&cmd!("TIERCACHE.TAGCOUNT", "both", "LOCAL")), 2);
        move_slot(c, slot, target, |c| {
            // The race: the target has applied its part of a cluster-wide INVALIDATE of mig-racy, the
            // source has not yet (its part arrives after MIGRATE dumped the still-valid entry). Each
            // part is what a master runs for the request: INVALIDATE LOCAL.
            c.conn(target, Proto::Resp2).int(&cmd!("TIERCACHE.INVALIDATE", "LOCAL", "mig-racy"));
        });
        // The source's part lands after the key left: nothing there any more.
        assert_eq!(src.int(&cmd!("TIERCACHE.INVALIDATE", "LOCAL", "mig-racy")), 0);
        // The source's index dropped both keys that left.
        assert_eq!(src.int(&cmd!("TIERCACHE.TAGCOUNT", "both", "LOCAL")), 0);
        assert_eq!(keys_of(src.run(&cmd!("TIERCACHE.TAGKEYS", "both", "LOCAL"))), Vec::<String>::new());
        let mut dst = c.conn(target, Proto::Resp2);
        assert_eq!(dst.get(&racy), None, "the old value survived the invalidation on the target");
        assert_eq!(get_on_replica(c, target, &racy), None, "... on the target's replica");
        assert_eq!(dst.get(&keep).as_deref(), Some(&b"kept"[..]));
        assert_eq!(get_on_replica(c, target, &keep).as_deref(), Some(&b"kept"[..]));
        let meta_after = dst.run(&cmd!("TIERCACHE.META", &keep));
        let (before, after) = (stable_meta(meta_before), stable_meta(meta_after));
        let without = |m: &[(String, String)]| m.iter().filter(|(n, _)| n != "expire_at_ms").cloned().collect::<Vec<_>>();
        assert_eq!(without(&after), without(&before), "META changed by the migration");
        // MIGRATE carries the key's TTL as relative milliseconds (Redis's own rule, for every key type):
        // the absolute expiry may move by a millisecond; the fresh deadline travels in the entry, exact.
        let expire = |m: &[(String, String)]| -> i64 {
            let v = &m.iter().find(|(n, _)| n == "expire_at_ms").unwrap().1;
            v.trim_start_matches("int(").trim_end_matches(')').parse().unwrap()
        };
        assert!((expire(&after) - expire(&before)).abs() <= 2, "{before:?} {after:?}");
        // The target indexes the kept key under its tags: a cluster-wide INVALIDATE finds it there.
        assert_eq!(dst.int(&cmd!("TIERCACHE.TAGCOUNT", "mig-keep", "LOCAL")), 1);
        assert_eq!(c.conn(masters[2], Proto::Resp2).int(&cmd!("TIERCACHE.INVALIDATE", "mig-keep")), 1);
        assert_eq!(dst.get(&keep), None);
    })
}

/// META without the fields that count down.
fn stable_meta(v: Value) -> Vec<(String, String)> {
    let Value::Array(items) = v else { panic!("{v:?}") };
    items
        .chunks(2)
        .filter_map(|p| {
            let name = match &p[0] {
                Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
                other => panic!("{other:?}"),
            };
            (!name.ends_with("_ttl_ms")).then(|| (name, format!("{:?}", p[1])))
        })
        .collect()
}

/// Resharding with `redis-cli --cluster reshard` while writers and readers run tagged traffic through
/// the cluster client (MOVED/ASK followed): afterwards every key holds exactly what was last written to
/// it, with its TTL and tags, invalidated keys stay invalid, and every master's index holds exactly its
/// own keys.
#[test]
fn resharding_under_load_keeps_every_key() {
    with_cluster(|c| {
        let masters = c.masters();
        let nodes: Vec<String> = masters.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect();
        let client = redis::cluster::ClusterClient::new(nodes).expect("cluster client");
        let stop = Arc::new(AtomicBool::new(false));
        const KEYS: usize = 600;
        let writer = {
            let client = client.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut con = client.get_connection().expect("cluster connection");
                let mut last: HashMap<usize, (u64, bool)> = HashMap::new();
                let mut round = 0u64;
                // At least two full passes, then until the resharding is over.
                while round < 2 || !stop.load(Ordering::Relaxed) {
                    for i in 0..KEYS {
                        let key = format!("rs:{i}");
                        let val = format!("{i}:{round}");
                        redis::cmd("TIERCACHE.SET")
                            .arg(&key)
                            .arg(&val)
                            .arg("EX")
                            .arg(3600)
                            .arg("TAGS")
                            .arg(2)
                            .arg(format!("rs-group-{}", i % 10))
                            .arg("rs-all")
                            .query::<()>(&mut con)
                            .expect("SET through the cluster");
                        let got: Option<Vec<u8>> =
                            redis::cmd("TIERCACHE.GET").arg(&key).query(&mut con).expect("GET through the cluster");
                        assert_eq!(got.as_deref(), Some(val.as_bytes()), "read-your-write of {key} during resharding");
                        last.insert(i, (round, true));
                    }
                    round += 1;
                }
                last
            })
        };
        // Move 1000 slots from the first master to the second, then back (both directions under load).
        let (a, b) = (c.id_of(masters[0]), c.id_of(masters[1]));
        for (from, to) in [(&a, &b), (&b, &a)] {
            let out = std::process::Command::new(harness::redis_cli())
                .args(["--cluster", "reshard", &format!("127.0.0.1:{}", masters[2])])
                .args(["--cluster-from", from, "--cluster-to", to, "--cluster-slots", "1000", "--cluster-yes"])
                .output()
                .expect("redis-cli --cluster reshard");
            assert!(
                out.status.success(),
                "reshard: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // redis-cli checks that every node agrees on the slots before it starts.
            c.wait_ok(Duration::from_secs(30));
        }
        stop.store(true, Ordering::Relaxed);
        let last = writer.join().expect("writer");
        let mut con = client.get_connection().expect("cluster connection");
        // Invalidate one group cluster-wide after the load: those keys must read as misses.
        let n: i64 = redis::cmd("TIERCACHE.INVALIDATE").arg("rs-group-3").query(&mut con).expect("INVALIDATE");
        assert_eq!(n, (KEYS / 10) as i64);
        for i in 0..KEYS {
            let key = format!("rs:{i}");
            let got: Option<Vec<u8>> = redis::cmd("TIERCACHE.GET").arg(&key).query(&mut con).unwrap();
            let (round, _) = last[&i];
            let want = (i % 10 != 3).then(|| format!("{i}:{round}").into_bytes());
            assert_eq!(got, want, "{key} after resharding");
            if want.is_some() {
                let ttl: i64 = redis::cmd("TTL").arg(&key).query(&mut con).unwrap();
                assert!(ttl > 3000 && ttl <= 3600, "{key} TTL {ttl}");
            }
        }
        // Each master's index holds exactly its own live keys: the counts add up cluster-wide, and every
        // key listed LOCAL by a master lives on that master.
        let total: i64 = redis::cmd("TIERCACHE.TAGCOUNT").arg("rs-all").query(&mut con).unwrap();
        assert_eq!(total, (KEYS - KEYS / 10) as i64);
        let mut listed = 0;
        for &m in &masters {
            let mut mc = c.conn(m, Proto::Resp2);
            let local = keys_of(mc.run(&cmd!("TIERCACHE.TAGKEYS", "rs-all", "LOCAL", "COUNT", 10_000)));
            for k in &local {
                assert_eq!(c.master_for(k.as_bytes()), m, "{k} indexed on {m} but served elsewhere");
            }
            assert_eq!(mc.int(&cmd!("TIERCACHE.TAGCOUNT", "rs-all", "LOCAL")), local.len() as i64);
            listed += local.len();
        }
        assert_eq!(listed, KEYS - KEYS / 10);
        let _: i64 = redis::cmd("TIERCACHE.INVALIDATE").arg("rs-all").query(&mut con).unwrap();
    })
}

/// The replica promoted by CLUSTER FAILOVER, then by a killed master, serves the same entries, with
/// the invalidated ones still invalid; a lease taken on the dead master ends and its fill is FENCED.
#[test]
fn failover_manual_and_by_kill() {
    with_cluster(|c| {
        for kill in [false, true] {
            let master = c.masters()[0];
            let keys: Vec<String> = (0..200).map(|i| format!("fo:{kill}:{i}")).filter(|_| true).collect();
            let mine: Vec<String> = keys.into_iter().filter(|k| c.master_for(k.as_bytes()) == master).collect();
            assert!(mine.len() > 20);
            for (i, k) in mine.iter().enumerate() {
                let tag = if i % 2 == 0 { "fo-dead" } else { "fo-live" };
                set(c, master, k, &format!("v{i}"), &[tag]);
            }
            let mut mc = c.conn(master, Proto::Resp2);
            assert_eq!(mc.int(&cmd!("TIERCACHE.INVALIDATE", "fo-dead")), mine.len().div_ceil(2) as i64);
            // A lease on a missing key of this master, held by a loader.
            let lease_key = mine.iter().enumerate().find(|(i, _)| i % 2 == 0).map(|(_, k)| k.clone()).unwrap();
            let lease = mc.run(&cmd!("TIERCACHE.GET", &lease_key, "LEASE", 60_000));
            let token = match &lease {
                Value::Array(items) => match &items[2] {
                    Value::BulkString(t) => String::from_utf8(t.clone()).unwrap(),
                    Value::Int(t) => t.to_string(),
                    other => panic!("no token: {lease:?} {other:?}"),
                },
                other => panic!("{other:?}"),
            };
            assert_eq!(mc.int(&cmd!("WAIT", 1, 5000)), 1);
            let replica = c.replica_of(master);
            if kill {
                c.allow_failover(replica);
                c.node_mut(master).kill();
                wait_master(c, replica, Duration::from_secs(30));
            } else {
                c.conn(replica, Proto::Resp2).ok(&cmd!("CLUSTER", "FAILOVER"));
                wait_master(c, replica, Duration::from_secs(30));
            }
            for (i, k) in mine.iter().enumerate() {
                let want = (i % 2 == 1).then(|| format!("v{i}").into_bytes());
                assert_eq!(get(c, replica, k), want, "{k} on the promoted replica (kill: {kill})");
            }
            // The fill of the lease taken on the old master is refused: the new master never granted it.
            let mut nc = c.conn(replica, Proto::Resp2);
            let fill = nc.raw(&cmd!("TIERCACHE.SET", &lease_key, "late", "EX", 60, "LEASE", &token));
            match fill {
                Value::ServerError(e) => assert!(common::error_text(&e).starts_with("FENCED"), "{e:?}"),
                other => panic!("fill after failover: {other:?}"),
            }
            assert_eq!(nc.int(&cmd!("TIERCACHE.INVALIDATE", "fo-live")), mine.len() as i64 / 2);
            c.heal();
        }
    })
}

fn wait_master(c: &mut Cluster, port: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let role = c.conn(port, Proto::Resp2).string(&cmd!("INFO", "replication")).unwrap_or_default();
        if role.contains("role:master") {
            let info = c.conn(port, Proto::Resp2).string(&cmd!("CLUSTER", "INFO")).unwrap_or_default();
            if info.contains("cluster_state:ok") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{port} not promoted within {within:?}");
        std::thread::sleep(ms(100));
    }
}

/// Redis Cluster broadcasts PUBLISH to every node: a subscriber on one master receives the invalidation
/// message of every node (3 masters, 3 replicas), each under its own run id.
#[test]
fn invalidation_messages_reach_a_subscriber_on_any_node() {
    with_cluster(|c| {
        let masters = c.masters();
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", masters[2])).unwrap();
        let mut con = client.get_connection().unwrap();
        con.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut sub = con.as_pubsub();
        sub.subscribe("tiercache:invalidations").unwrap();
        assert_eq!(c.conn(masters[0], Proto::Resp3).int(&cmd!("TIERCACHE.INVALIDATE", "msg-tag")), 0);
        let mut run_ids = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while run_ids.len() < 6 {
            assert!(Instant::now() < deadline, "messages from {} nodes only", run_ids.len());
            let msg = sub.get_message().expect("message");
            let payload: Vec<u8> = msg.get_payload().unwrap();
            let v = rmpv::decode::read_value(&mut &payload[..]).expect("MessagePack");
            let rmpv::Value::Map(kv) = v else { panic!("{v:?}") };
            let field = |name: &str| kv.iter().find(|(k, _)| k.as_str() == Some(name)).map(|(_, v)| v.clone());
            let tags = field("tags").expect("tags");
            if tags.as_array().is_some_and(|t| t.iter().any(|t| t.as_slice() == Some(b"msg-tag"))) {
                run_ids.insert(field("run_id").and_then(|r| r.as_str().map(str::to_string)).expect("run_id"));
            }
        }
    })
}
