//! Tag invalidation (spec: TAGS.md): TIERCACHE.INVALIDATE / TAGCOUNT / TAGKEYS semantics and replies,
//! the incremental reclaim (budget, overwrites racing it, replicas receiving its deletes), the exactness
//! of the tag index on every keyspace path (checked against a full SCAN of the keyspace), a churn run
//! with eviction, expiry and a replica, persistence in the middle of a large reclaim, and the
//! MessagePack invalidation messages.

#[macro_use]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::*;

proto_tests!(invalidate_semantics, tagkeys_and_tagcount, errors, overwrites_with_the_same_tags);

type B = Vec<u8>;

fn b(s: &str) -> B {
    s.as_bytes().to_vec()
}

fn show(k: &[u8]) -> String {
    String::from_utf8_lossy(k).into_owned()
}

/// `TIERCACHE.SET key value [opts...] TAGS n tags...` (no TAGS when `tags` is empty).
fn set_cmd(key: &[u8], value: &[u8], tags: &[&[u8]], opts: &[&str]) -> redis::Cmd {
    let mut c = cmd!("TIERCACHE.SET", key, value);
    for o in opts {
        c.arg(*o);
    }
    if !tags.is_empty() {
        c.arg("TAGS").arg(tags.len());
        for t in tags {
            c.arg(*t);
        }
    }
    c
}

fn tset(c: &mut Conn, key: &str, value: &str, tags: &[&str], opts: &[&str]) {
    let tags: Vec<&[u8]> = tags.iter().map(|t| t.as_bytes()).collect();
    c.ok(&set_cmd(key.as_bytes(), value.as_bytes(), &tags, opts));
}

fn invalidate(c: &mut Conn, tags: &[&str]) -> i64 {
    let mut cm = cmd!("TIERCACHE.INVALIDATE");
    for t in tags {
        cm.arg(*t);
    }
    c.int(&cm)
}

fn tagcount(c: &mut Conn, tag: impl redis::ToRedisArgs) -> i64 {
    c.int(&cmd!("TIERCACHE.TAGCOUNT", tag))
}

fn list_of_bulks(v: &Value, what: &str) -> Vec<B> {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::BulkString(b) => b.clone(),
                other => panic!("{what}: element not a bulk string: {other:?}"),
            })
            .collect(),
        other => panic!("{what}: expected an array, got {other:?}"),
    }
}

fn tagkeys(c: &mut Conn, tag: impl redis::ToRedisArgs, count: Option<i64>) -> Vec<B> {
    let mut cm = cmd!("TIERCACHE.TAGKEYS", tag);
    if let Some(n) = count {
        cm.arg("COUNT").arg(n);
    }
    let v = c.run(&cm);
    list_of_bulks(&v, "TIERCACHE.TAGKEYS")
}

fn keyset(keys: &[&str]) -> BTreeSet<B> {
    keys.iter().map(|k| b(k)).collect()
}

fn dbsize(c: &mut Conn) -> i64 {
    c.int(&cmd!("DBSIZE"))
}

/// Polls STATS until reclaim_pending is 0 (bounded).
fn wait_reclaimed(c: &mut Conn, timeout: Duration) {
    let mut last = -1;
    let ok = wait_until(timeout, || {
        last = c.stats().get("reclaim_pending");
        last == 0
    });
    assert!(ok, "reclaim_pending still {last} after {timeout:?}");
}

fn wait_replicated(m: &mut Conn) {
    assert_eq!(m.int(&cmd!("WAIT", 1, 10_000)), 1, "WAIT 1: the replica did not acknowledge");
}

fn info_int(c: &mut Conn, section: &str, field: &str) -> i64 {
    let info = c.info(section);
    info_field(&info, field)
        .unwrap_or_else(|| panic!("no {field} in INFO {section}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("INFO {field}: {e}"))
}

fn run_id(c: &mut Conn) -> String {
    let info = c.info("server");
    info_field(&info, "run_id").expect("run_id in INFO server").trim().to_string()
}

/// Tags of a TIERCACHE.META reply (`None` for nil).
fn meta_tags(v: &Value, proto: Proto) -> Option<Vec<B>> {
    if *v == Value::Nil {
        return None;
    }
    let p = pairs(v, &META_FIELDS, proto, "TIERCACHE.META");
    Some(list_of_bulks(&p[5].1, "META tags"))
}

/// Databases listed in INFO keyspace.
fn nonempty_dbs(c: &mut Conn) -> Vec<i64> {
    let info = c.info("keyspace");
    info.lines().filter_map(|l| l.strip_prefix("db").and_then(|r| r.split_once(':')).and_then(|(n, _)| n.parse().ok())).collect()
}

/// Every key of the selected db (SCAN; also expires logically expired keys on a master).
fn scan_keys(c: &mut Conn) -> BTreeSet<B> {
    let mut keys = BTreeSet::new();
    let mut cursor = b("0");
    loop {
        let v = c.run(&cmd!("SCAN", &cursor[..], "COUNT", 1000));
        let items = as_list(&v).unwrap_or_else(|| panic!("SCAN: {v:?}")).to_vec();
        cursor = as_bytes(&items[0]).expect("SCAN cursor");
        keys.extend(list_of_bulks(&items[1], "SCAN keys"));
        if cursor == b"0" {
            return keys;
        }
    }
}

/// db -> tag -> keys carrying it, as seen from the keyspace.
type IndexView = BTreeMap<i64, BTreeMap<B, BTreeSet<B>>>;

/// Waits for reclaim to settle, then scans every non-empty db (SCAN + TYPE + META) and checks STATS
/// (entries, tags, tag_index_entries, reclaim_pending) and TAGCOUNT / TAGKEYS of every tag seen against
/// the keyspace. Every tiercache key left must answer META (an invalidated entry must have been
/// reclaimed). Tags in `zero` must have TAGCOUNT 0 / no TAGKEYS in dbs 0..16 where no key carries them.
/// `tags` is counted per (db, tag) (a tag is a per-database namespace). Leaves db 0 selected.
fn assert_index_exact_with(c: &mut Conn, zero: &[&[u8]]) -> IndexView {
    wait_reclaimed(c, Duration::from_secs(60));
    let mut view: IndexView = BTreeMap::new();
    let mut entries = 0i64;
    let dbs = nonempty_dbs(c);
    for &db in &dbs {
        c.select(db);
        let keys: Vec<B> = scan_keys(c).into_iter().collect();
        let types = c.pipeline_ok(&keys.iter().map(|k| cmd!("TYPE", &k[..])).collect::<Vec<_>>());
        let tc: Vec<B> = keys
            .iter()
            .zip(&types)
            .filter(|(_, t)| as_string(t).as_deref() == Some("tiercache"))
            .map(|(k, _)| k.clone())
            .collect();
        let metas = c.pipeline_ok(&tc.iter().map(|k| cmd!("TIERCACHE.META", &k[..])).collect::<Vec<_>>());
        let tags_of_db = view.entry(db).or_default();
        for (k, m) in tc.iter().zip(&metas) {
            let tags = meta_tags(m, c.proto).unwrap_or_else(|| {
                panic!(
                    "db {db} key {:?}: TYPE tiercache but META nil with reclaim_pending 0 (invalidated, not reclaimed?)",
                    show(k)
                )
            });
            entries += 1;
            for t in tags {
                tags_of_db.entry(t).or_default().insert(k.clone());
            }
        }
        if tags_of_db.is_empty() {
            view.remove(&db);
        }
    }
    // The entries gauge falls in the free callback, which FLUSHDB ASYNC (and lazy-free in general) runs on
    // Redis's background thread: let it catch up (bounded) before comparing.
    wait_until(Duration::from_secs(10), || c.stats().get("entries") == entries);
    let st = c.stats();
    let want_tags: i64 = view.values().map(|m| m.len() as i64).sum();
    let want_idx: i64 = view.values().flat_map(|m| m.values()).map(|s| s.len() as i64).sum();
    assert_eq!(st.get("reclaim_pending"), 0, "reclaim_pending: {st:?}");
    assert_eq!(st.get("entries"), entries, "STATS entries vs tiercache keys in the keyspace: {st:?}");
    assert_eq!(
        st.get("tag_index_entries"),
        want_idx,
        "STATS tag_index_entries vs keyspace: {st:?}\nkeyspace view: {}",
        fmt_view(&view)
    );
    assert_eq!(
        st.get("tags"),
        want_tags,
        "STATS tags vs distinct (db, tag) in the keyspace: {st:?}\nkeyspace view: {}",
        fmt_view(&view)
    );
    for (&db, tags) in &view {
        c.select(db);
        let names: Vec<&B> = tags.keys().collect();
        let counts = c.pipeline_ok(&names.iter().map(|t| cmd!("TIERCACHE.TAGCOUNT", &t[..])).collect::<Vec<_>>());
        let lists = c.pipeline_ok(
            &names.iter().map(|t| cmd!("TIERCACHE.TAGKEYS", &t[..], "COUNT", tags[*t].len() + 10)).collect::<Vec<_>>(),
        );
        for ((t, n), l) in names.iter().zip(&counts).zip(&lists) {
            let want = &tags[*t];
            assert_eq!(as_int(n), Some(want.len() as i64), "db {db} TAGCOUNT {:?}", show(t));
            let got = list_of_bulks(l, "TAGKEYS");
            assert_eq!(got.len(), want.len(), "db {db} TAGKEYS {:?} has duplicates or wrong length: {got:?}", show(t));
            let got: BTreeSet<B> = got.into_iter().collect();
            assert_eq!(&got, want, "db {db} TAGKEYS {:?}", show(t));
        }
    }
    for db in 0..16 {
        c.select(db);
        for t in zero {
            if view.get(&db).is_some_and(|m| m.contains_key(*t)) {
                continue;
            }
            assert_eq!(tagcount(c, *t), 0, "db {db} TAGCOUNT {:?}: no key carries it", show(t));
            assert_eq!(tagkeys(c, *t, None), Vec::<B>::new(), "db {db} TAGKEYS {:?}: no key carries it", show(t));
        }
    }
    c.select(0);
    view
}

fn assert_index_exact(c: &mut Conn) -> IndexView {
    assert_index_exact_with(c, &[])
}

fn fmt_view(v: &IndexView) -> String {
    let mut s = String::new();
    for (db, tags) in v {
        for (t, keys) in tags {
            s.push_str(&format!("\n  db{db} {:?}: {} keys", show(t), keys.len()));
            if keys.len() <= 5 {
                s.push_str(&format!(" {:?}", keys.iter().map(|k| show(k)).collect::<Vec<_>>()));
            }
        }
    }
    s
}

/// The view expected from a literal description: (db, tag, keys).
fn view_of(spec: &[(i64, &str, &[&str])]) -> IndexView {
    let mut v: IndexView = BTreeMap::new();
    for (db, tag, keys) in spec {
        if keys.is_empty() {
            continue;
        }
        v.entry(*db).or_default().insert(b(tag), keyset(keys));
    }
    v
}

fn multi(c: &mut Conn, cmds: &[redis::Cmd]) -> Vec<Value> {
    c.ok(&cmd!("MULTI"));
    for cm in cmds {
        let v = c.run(cm);
        assert!(matches!(&v, Value::SimpleString(s) if s == "QUEUED"), "{:?} not QUEUED: {v:?}", cmd_text(cm));
    }
    match c.run(&cmd!("EXEC")) {
        Value::Array(items) => items,
        other => panic!("EXEC: {other:?}"),
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// =============================================================================================
// 1. INVALIDATE / TAGCOUNT / TAGKEYS semantics

fn invalidate_semantics(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    tset(&mut c, "k1", "v1", &["a"], &[]);
    tset(&mut c, "k2", "v2", &["a", "b"], &["EX", "1000"]);
    tset(&mut c, "k3", "v3", &["b"], &[]);
    tset(&mut c, "k4", "v4", &["c"], &[]);
    tset(&mut c, "k5", "v5", &[], &[]);
    tset(&mut c, "k6", "v6", &["a", "c"], &[]);
    c.ok(&cmd!("SET", "native", "x"));
    c.select(1);
    tset(&mut c, "k1", "db1", &["a"], &[]);
    c.select(0);
    assert_eq!(tagcount(&mut c, "a"), 3);
    assert_eq!(tagcount(&mut c, "c"), 2);
    let before = c.stats();

    // Atomically: the invalidation is visible at once, before any reclaim.
    let r = multi(
        &mut c,
        &[
            cmd!("TIERCACHE.INVALIDATE", "a", "b"),
            cmd!("TIERCACHE.GET", "k1"),
            cmd!("TIERCACHE.META", "k2"),
            cmd!("TIERCACHE.GET", "k3"),
            cmd!("TIERCACHE.GET", "k6"),
            cmd!("EXISTS", "k1", "k2", "k3", "k6"),
            cmd!("TIERCACHE.TAGCOUNT", "c"),
            cmd!("TIERCACHE.TAGCOUNT", "a"),
            cmd!("TIERCACHE.INVALIDATE", "c"),
        ],
    );
    // The reply is the sum over the tags of the entries under each: a has k1 k2 k6, b has k2 k3, so k2
    // counts twice (5, where the 4 distinct entries would be k1 k2 k3 k6).
    assert_eq!(r[0], Value::Int(5), "INVALIDATE a b: 3 under a + 2 under b");
    assert_eq!(r[1], Value::Nil, "GET k1 right after INVALIDATE");
    assert_eq!(r[2], Value::Nil, "META k2 right after INVALIDATE");
    assert_eq!(r[3], Value::Nil, "GET k3");
    assert_eq!(r[4], Value::Nil, "GET k6");
    assert_eq!(r[5], Value::Int(4), "keys are deleted later by the reclaim timer, not by INVALIDATE");
    assert_eq!(r[6], Value::Int(2), "TAGCOUNT c: k6 still counts under c until reclaimed");
    assert_eq!(r[7], Value::Int(0), "TAGCOUNT a after INVALIDATE a");
    // r[8] (INVALIDATE c) is checked at the end.

    // Untagged and other-tag entries (and other types) untouched; k4 was just invalidated by tag c.
    assert_eq!(c.get("k5").as_deref(), Some(&b"v5"[..]));
    assert_eq!(c.get("k4"), None);
    assert_eq!(c.string(&cmd!("GET", "native")).as_deref(), Some("x"));
    c.select(1);
    assert_eq!(c.get("k1").as_deref(), Some(&b"db1"[..]), "db 1 untouched by INVALIDATE in db 0");
    assert_eq!(tagcount(&mut c, "a"), 1);
    c.select(0);

    // Reclaim: the keys go away.
    wait_reclaimed(&mut c, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || c.int(&cmd!("EXISTS", "k1", "k2", "k3", "k4", "k6")) == 0));
    assert!(c.exists("k5"));
    let st = c.stats();
    assert_eq!(st.get("reclaimed") - before.get("reclaimed"), 5);
    assert_eq!(st.get("invalidations") - before.get("invalidations"), 2);
    assert_eq!(st.get("tag_index_entries"), 1, "only db1 k1 (tag a) left: {st:?}");
    assert_eq!(st.get("tags"), 1, "{st:?}");

    // Already invalidated / unknown tags -> 0.
    assert_eq!(invalidate(&mut c, &["a"]), 0);
    assert_eq!(invalidate(&mut c, &["never-used"]), 0);
    assert_eq!(invalidate(&mut c, &["a", "a", "zz"]), 0);

    // A new SET under an invalidated tag is live.
    tset(&mut c, "k1", "again", &["a"], &[]);
    tset(&mut c, "k7", "v7", &["a", "b"], &[]);
    assert_eq!(c.get("k1").as_deref(), Some(&b"again"[..]));
    assert_eq!(c.meta("k7").expect("META k7").tags, vec![b("a"), b("b")]);
    assert_eq!(tagcount(&mut c, "a"), 2);
    assert_eq!(tagkeys(&mut c, "b", None), vec![b("k7")]);
    // A tag named twice counts once; an entry under two of the named tags counts twice (k7: a and b).
    assert_eq!(invalidate(&mut c, &["a", "b", "a"]), 3);
    assert_eq!(c.get("k1"), None);
    assert_eq!(c.get("k7"), None);

    // Per db: INVALIDATE in db 1 only touches db 1.
    tset(&mut c, "z", "db0", &["shared"], &[]);
    c.select(1);
    tset(&mut c, "z", "db1", &["shared"], &[]);
    assert_eq!(invalidate(&mut c, &["shared"]), 1);
    assert_eq!(c.get("z"), None);
    assert_eq!(c.get("k1").as_deref(), Some(&b"db1"[..]));
    c.select(0);
    assert_eq!(c.get("z").as_deref(), Some(&b"db0"[..]));
    assert_eq!(tagcount(&mut c, "shared"), 1);

    // Binary tags: NUL and 0xff, distinct from their prefixes.
    let t1: &[u8] = b"\0x\xff";
    let t2: &[u8] = b"\0x";
    let t3: &[u8] = b"\xff\xfe\0";
    c.ok(&set_cmd(b"bin1", b"1", &[t1], &[]));
    c.ok(&set_cmd(b"bin2", b"2", &[t2], &[]));
    c.ok(&set_cmd(b"bin\0\xff3", b"3", &[t1, t3], &[]));
    assert_eq!(tagcount(&mut c, t1), 2);
    assert_eq!(tagkeys(&mut c, t3, None), vec![b"bin\0\xff3".to_vec()]);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", t1)), 2);
    assert_eq!(c.get("bin1"), None);
    assert_eq!(c.get(&b"bin\0\xff3"[..]), None);
    assert_eq!(c.get("bin2").as_deref(), Some(&b"2"[..]));
    assert_eq!(tagcount(&mut c, t2), 1);
    assert_eq!(tagcount(&mut c, t1), 0);
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", t2)), 1);
    assert_eq!(c.get("bin2"), None);

    assert_index_exact_with(&mut c, &[b"a", b"b", b"c", t1, t2, t3]);
    // Counts live entries only: k6 (tags a, c) was already invalidated through a in the same transaction.
    // Counting stays O(1): k6, invalidated through `a` and not reclaimed yet inside the MULTI, is still
    // indexed under `c` and counted with k4 (documented in COMMANDS.md).
    assert_eq!(r[8], Value::Int(2), "MULTI; INVALIDATE a b; ...; INVALIDATE c: k4 plus k6 awaiting reclaim");
}

/// An overwrite with the same tags in the same order takes the old entry's place in the index (no detach
/// and attach): counts, keys, invalidation, deletion and persistence must not tell the difference.
fn overwrites_with_the_same_tags(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    for i in 0..3 {
        tset(&mut c, "k", &format!("v{i}"), &["a", "b"], &[]);
    }
    tset(&mut c, "other", "o", &["a"], &[]);
    assert_eq!((tagcount(&mut c, "a"), tagcount(&mut c, "b")), (2, 1));
    assert_eq!(tagkeys(&mut c, "b", None), vec![b("k")]);
    assert_eq!(c.get("k"), Some(b("v2")));
    assert_eq!(invalidate(&mut c, &["b"]), 1);
    assert_eq!(c.get("k"), None, "the carried-over entry is invalidated with its tag");
    assert_eq!(c.get("other"), Some(b("o")));
    // Overwriting an invalidated entry attaches afresh; a different order or set detaches and attaches.
    tset(&mut c, "k", "w", &["a", "b"], &[]);
    assert_eq!(c.get("k"), Some(b("w")));
    tset(&mut c, "k", "x", &["b", "a"], &[]);
    tset(&mut c, "k", "y", &["b", "a"], &[]);
    assert_eq!((tagcount(&mut c, "a"), tagcount(&mut c, "b")), (2, 1));
    tset(&mut c, "k", "z", &["b"], &[]);
    assert_eq!((tagcount(&mut c, "a"), tagcount(&mut c, "b")), (1, 1));
    tset(&mut c, "k", "z2", &["b"], &[]);
    c.ok(&cmd!("DEBUG", "RELOAD"));
    assert_eq!(c.get("k"), Some(b("z2")), "persisted and reloaded");
    assert_eq!(tagkeys(&mut c, "b", None), vec![b("k")]);
    assert_eq!(c.int(&cmd!("DEL", "k")), 1);
    assert_eq!((tagcount(&mut c, "a"), tagcount(&mut c, "b")), (1, 0), "DEL detaches the carried entry");
    assert_eq!(invalidate(&mut c, &["a"]), 1);
    assert_eq!(c.get("other"), None);
}

fn tagkeys_and_tagcount(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let all: BTreeSet<B> = (0..150).map(|i| format!("many:{i}").into_bytes()).collect();
    let cmds: Vec<redis::Cmd> = all.iter().map(|k| set_cmd(k, b"v", &[b"many", b"other"], &[])).collect();
    c.pipeline_ok(&cmds);
    tset(&mut c, "single", "v", &["one"], &[]);

    // Reply shapes: integers and an array of bulk strings, RESP2 and RESP3 alike.
    assert_eq!(c.run(&cmd!("TIERCACHE.TAGCOUNT", "many")), Value::Int(150));
    assert_eq!(c.run(&cmd!("TIERCACHE.TAGCOUNT", "nope")), Value::Int(0));
    assert_eq!(c.run(&cmd!("TIERCACHE.TAGKEYS", "one")), Value::Array(vec![Value::BulkString(b("single"))]));
    assert_eq!(c.run(&cmd!("TIERCACHE.TAGKEYS", "nope")), Value::Array(vec![]));
    assert_eq!(c.run(&cmd!("TIERCACHE.INVALIDATE", "nope")), Value::Int(0));

    let dflt = tagkeys(&mut c, "many", None);
    assert_eq!(dflt.len(), 100, "TAGKEYS default COUNT 100");
    let d: BTreeSet<B> = dflt.iter().cloned().collect();
    assert_eq!(d.len(), 100, "TAGKEYS returned duplicates");
    assert!(d.is_subset(&all));
    let five = tagkeys(&mut c, "many", Some(5));
    assert_eq!(five.len(), 5);
    assert!(five.iter().all(|k| all.contains(k)));
    assert_eq!(tagkeys(&mut c, "many", Some(1)).len(), 1);
    let full = tagkeys(&mut c, "many", Some(1000));
    assert_eq!(full.len(), 150);
    assert_eq!(full.into_iter().collect::<BTreeSet<B>>(), all);
    assert_eq!(tagkeys(&mut c, "many", Some(150)).len(), 150);
    assert_eq!(tagkeys(&mut c, "one", Some(100)), vec![b("single")]);

    // Counts follow deletes and overwrites.
    assert_eq!(c.int(&cmd!("DEL", "many:0", "many:1")), 2);
    tset(&mut c, "many:2", "v", &["one"], &[]);
    assert_eq!(tagcount(&mut c, "many"), 147);
    assert_eq!(tagcount(&mut c, "other"), 147);
    assert_eq!(tagcount(&mut c, "one"), 2);
    let st = c.stats();
    assert_eq!(st.get("tags"), 3);
    assert_eq!(st.get("tag_index_entries"), 147 * 2 + 2);

    assert_eq!(invalidate(&mut c, &["many"]), 147);
    assert_eq!(tagcount(&mut c, "many"), 0);
    assert_eq!(tagkeys(&mut c, "many", None), Vec::<B>::new());
    assert_index_exact_with(&mut c, &[b"many", b"other"]);
    assert_eq!(tagcount(&mut c, "other"), 0, "entries reclaimed: no longer counted under their other tag");
}

fn errors(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    tset(&mut c, "k", "v", &["t"], &[]);
    c.expect_err(&cmd!("TIERCACHE.INVALIDATE"), "ERR wrong number of arguments for 'tiercache.invalidate' command");
    c.expect_err(&cmd!("TIERCACHE.INVALIDATE", ""), "ERR tags must not be empty strings");
    c.expect_err(&cmd!("TIERCACHE.INVALIDATE", "t", ""), "ERR tags must not be empty strings");
    let mut too_many = cmd!("TIERCACHE.INVALIDATE");
    for i in 0..1025 {
        too_many.arg(format!("x{i}"));
    }
    // The last tag is "t": nothing must have been invalidated by the refused commands.
    too_many.arg("t");
    c.expect_err(&too_many, "ERR too many tags: at most 1024 per INVALIDATE");
    assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]), "a refused INVALIDATE must not invalidate");
    let mut max = cmd!("TIERCACHE.INVALIDATE");
    for i in 0..1023 {
        max.arg(format!("x{i}"));
    }
    max.arg("other");
    assert_eq!(c.int(&max), 0, "1024 tags are allowed");
    assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]));
    let st = c.stats();
    assert_eq!(st.get("invalidations"), 1, "refused INVALIDATEs are not counted: {st:?}");

    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "COUNT", 0), "ERR COUNT must be a positive integer");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "COUNT", -1), "ERR COUNT must be a positive integer");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "COUNT", "abc"), "ERR value is not an integer or out of range");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "COUNT", "1.5"), "ERR value is not an integer or out of range");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "FOO"), "ERR syntax error");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "COUNT"), "ERR syntax error");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "FOO", 5), "ERR syntax error");
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS"), "ERR wrong number of arguments for 'tiercache.tagkeys' command");
    c.expect_err(&cmd!("TIERCACHE.TAGCOUNT"), "ERR wrong number of arguments for 'tiercache.tagcount' command");
    assert_eq!(tagkeys(&mut c, "t", None), vec![b("k")]);
    // TAGS.md: "other extra args -> ERR syntax error".
    c.expect_err(&cmd!("TIERCACHE.TAGKEYS", "t", "COUNT", 5, "extra"), "ERR syntax error");
}

// =============================================================================================
// 2. Reclaim

/// Issue 9: one INVALIDATE of 1024 tags x 300 entries used to block every client for seconds, because
/// its reply counted distinct entries by looking every key of every named set up in the others. The
/// reply is now the sum of the tags' counts, and no index operation's work depends on how many keys a
/// tag has. Checked structurally, not by timing: `index_longest_op_steps` is the most table elements
/// (keys and tag names compared or moved) one main-thread index operation touched since the module loaded.
#[test]
fn invalidate_of_many_tags_does_per_tag_work() {
    let s = Server::start();
    let mut c = s.conn();
    const TAGS: usize = 1024;
    const PER_TAG: usize = 300;
    let n = TAGS * PER_TAG / 2;
    // Entry i carries tags i % 1024 and (i + 1) % 1024, so each tag has 300 entries, and all of them carry
    // `ns` (the namespace tag a client puts on every key): one set of 153,600 keys, grown in the test.
    let tag = |t: usize| format!("t{}", t % TAGS).into_bytes();
    let cmds: Vec<redis::Cmd> =
        (0..n).map(|i| set_cmd(format!("k{i}").as_bytes(), b"v", &[&tag(i), &tag(i + 1), b"ns"], &[])).collect();
    c.pipeline_ok(&cmds);
    assert_eq!(tagcount(&mut c, "ns"), n as i64);
    let counts: Vec<i64> = c
        .pipeline_ok(&(0..TAGS).map(|t| cmd!("TIERCACHE.TAGCOUNT", tag(t))).collect::<Vec<_>>())
        .iter()
        .map(|v| as_int(v).expect("TAGCOUNT"))
        .collect();
    assert!(counts.iter().all(|&k| k == PER_TAG as i64), "every tag has {PER_TAG} entries");
    let grown = c.stats().get("index_longest_op_steps");
    assert!(grown > 0, "the attaches were measured");
    // An attach of 3 tags does a name lookup and a set insert (with at most one bucket split) per tag,
    // whatever the set's size: a few buckets of about 4 elements each.
    assert!(grown <= 3 * 64, "an attach touched {grown} elements while `ns` grew to {n} keys");

    let mut all = cmd!("TIERCACHE.INVALIDATE");
    for t in 0..TAGS {
        all.arg(tag(t));
    }
    let reply = c.int(&all);
    // The documented count: the sum of the tags' counts (each entry is under two of them, so twice the
    // number of distinct entries).
    assert_eq!(reply, counts.iter().sum::<i64>());
    assert_eq!(reply, 2 * n as i64);
    let steps = c.stats().get("index_longest_op_steps");
    // O(tags): a few tag-name comparisons per tag. Walking the keys, as the distinct count did, would have
    // touched at least every one of the 307,200 indexed keys.
    assert!(steps <= 64 * TAGS as i64, "one operation touched {steps} elements");
    assert!(steps < n as i64);
    assert_eq!(c.get("k0"), None);
    assert_eq!(c.get(format!("k{}", n - 1)), None);

    wait_reclaimed(&mut c, Duration::from_secs(60));
    assert_eq!(c.int(&cmd!("DBSIZE")), 0);
    assert_eq!(tagcount(&mut c, "ns"), 0, "reclaimed entries leave the namespace tag");
    let after = c.stats();
    assert!(after.get("index_longest_op_steps") <= 64 * TAGS as i64, "reclaim: {after:?}");
    assert_eq!((after.get("tags"), after.get("tag_index_entries")), (0, 0));
}

#[test]
fn reclaim_deletes_invalidated_keys() {
    let s = Server::start();
    let mut c = s.conn();
    let cmds: Vec<redis::Cmd> = (0..50).map(|i| set_cmd(format!("t:{i}").as_bytes(), b"v", &[b"t"], &[])).collect();
    c.pipeline_ok(&cmds);
    for i in 0..10 {
        tset(&mut c, &format!("u:{i}"), "v", &[], &[]);
    }
    tset(&mut c, "keep", "v", &["k"], &[]);
    assert_eq!(invalidate(&mut c, &["t"]), 50);
    assert!(wait_until(Duration::from_secs(10), || dbsize(&mut c) == 11), "dbsize {} after reclaim, want 11", dbsize(&mut c));
    for i in 0..50 {
        assert!(!c.exists(format!("t:{i}")));
    }
    let st = c.stats();
    assert_eq!(st.get("reclaim_pending"), 0);
    assert_eq!(st.get("reclaimed"), 50);
    assert_eq!(st.get("entries"), 11);
    assert_eq!(c.get("keep").as_deref(), Some(&b"v"[..]));
    assert_index_exact_with(&mut c, &[b"t"]);
}

#[test]
fn reclaim_budget_one_takes_many_ticks() {
    let s = Server::builder().args(&["--tiercache.reclaim-budget", "1"]).start();
    let mut c = s.conn();
    assert_eq!(c.config_get("tiercache.reclaim-budget"), "1");
    let n = 300;
    let cmds: Vec<redis::Cmd> = (0..n).map(|i| set_cmd(format!("t:{i}").as_bytes(), b"v", &[b"t"], &[])).collect();
    c.pipeline_ok(&cmds);
    tset(&mut c, "u", "v", &[], &[]);
    let started = Instant::now();
    assert_eq!(invalidate(&mut c, &["t"]), n);
    let first = c.stats().get("reclaim_pending");
    assert!(first > n - 50, "budget 1: at most one key per tick, yet reclaim_pending is {first} right after INVALIDATE");
    let mut seen_between = false;
    let ok = wait_until(Duration::from_secs(30), || {
        let p = c.stats().get("reclaim_pending");
        seen_between |= p > 0 && p < first;
        p == 0
    });
    assert!(ok, "reclaim with budget 1 did not finish in 30 s");
    let took = started.elapsed();
    assert!(seen_between, "never saw reclaim_pending between 0 and {first}");
    // 300 keys at one per 1 ms tick.
    assert!(took >= Duration::from_millis(250), "300 keys reclaimed in {took:?} with budget 1");
    assert!(c.stats().get("reclaim_ticks") >= 300, "one key per tick");
    assert_eq!(c.stats().get("reclaimed"), n);
    assert_eq!(dbsize(&mut c), 1);
    assert_index_exact_with(&mut c, &[b"t"]);
}

#[test]
fn overwrite_between_invalidate_and_reclaim_is_kept() {
    let s = Server::start();
    let mut c = s.conn();
    for k in ["a", "b", "c", "d", "e", "f", "gone"] {
        tset(&mut c, k, "old", &["t"], &[]);
    }
    let r = multi(
        &mut c,
        &[
            cmd!("TIERCACHE.INVALIDATE", "t"),
            cmd!("TIERCACHE.SET", "a", "new", "TAGS", 1, "t"),
            cmd!("TIERCACHE.SET", "b", "new"),
            cmd!("TIERCACHE.SET", "c", "new", "TAGS", 2, "x", "t"),
            cmd!("TIERCACHE.SET", "d", "new", "TAGS", 1, "y"),
            cmd!("SET", "e", "native"),
            cmd!("TIERCACHE.SET", "f", "new", "PX", 100_000, "TAGS", 1, "t"),
        ],
    );
    assert_eq!(r[0], Value::Int(7));
    wait_reclaimed(&mut c, Duration::from_secs(10));
    assert!(wait_until(Duration::from_secs(5), || !c.exists("gone")), "the invalidated key was not reclaimed");
    for k in ["a", "b", "c", "d", "f"] {
        assert_eq!(c.get(k).as_deref(), Some(&b"new"[..]), "{k}: overwritten after INVALIDATE, must survive the reclaim");
    }
    assert_eq!(c.string(&cmd!("GET", "e")).as_deref(), Some("native"), "native key written over a dead entry was reclaimed");
    assert_eq!(c.stats().get("reclaimed"), 1);
    assert_eq!(tagcount(&mut c, "t"), 3);
    let v = assert_index_exact(&mut c);
    assert_eq!(v, view_of(&[(0, "t", &["a", "c", "f"]), (0, "x", &["c"]), (0, "y", &["d"])]));
}

#[test]
fn overwrite_during_slow_reclaim_is_kept() {
    // Not atomic: the overwrites land while the (slow) reclaim is running.
    let s = Server::builder().args(&["--tiercache.reclaim-budget", "1"]).start();
    let mut c = s.conn();
    let n = 400;
    let cmds: Vec<redis::Cmd> = (0..n).map(|i| set_cmd(format!("k:{i}").as_bytes(), b"old", &[b"t"], &[])).collect();
    c.pipeline_ok(&cmds);
    assert_eq!(invalidate(&mut c, &["t"]), n);
    let over: Vec<redis::Cmd> = (0..n).step_by(4).map(|i| set_cmd(format!("k:{i}").as_bytes(), b"new", &[b"t"], &[])).collect();
    c.pipeline_ok(&over);
    assert!(c.stats().get("reclaim_pending") > 0, "the reclaim already finished: the test proves nothing");
    c.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1000"));
    wait_reclaimed(&mut c, Duration::from_secs(10));
    assert_eq!(dbsize(&mut c), n / 4);
    for i in (0..n).step_by(4) {
        assert_eq!(c.get(format!("k:{i}")).as_deref(), Some(&b"new"[..]), "k:{i}");
    }
    assert_eq!(c.stats().get("reclaimed"), n - n / 4);
    let v = assert_index_exact(&mut c);
    assert_eq!(v[&0][&b("t")].len() as i64, n / 4);
}

#[test]
fn replica_receives_reclaim_deletes() {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn();
    let mut r = replica.conn();
    let n = 600;
    let cmds: Vec<redis::Cmd> = (0..n)
        .map(|i| set_cmd(format!("t:{i}").as_bytes(), b"v", if i % 2 == 0 { &[b"t", b"x"] } else { &[b"t"] }, &[]))
        .collect();
    m.pipeline_ok(&cmds);
    tset(&mut m, "x_only", "v", &["x"], &[]);
    tset(&mut m, "plain", "v", &[], &[]);
    m.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1"));
    wait_replicated(&mut m);
    assert_eq!(r.get("t:0").as_deref(), Some(&b"v"[..]));
    assert_eq!(tagcount(&mut r, "t"), n);
    assert_eq!(tagcount(&mut r, "x"), n / 2 + 1);
    assert_eq!(invalidate(&mut m, &["t"]), n);
    wait_replicated(&mut m);
    // The replica applied the INVALIDATE: nil at once, while the master's reclaim is still running.
    let gets: Vec<redis::Cmd> = (0..n).map(|i| cmd!("TIERCACHE.GET", format!("t:{i}"))).collect();
    let replies = r.pipeline_ok(&gets);
    let live = replies.iter().filter(|v| **v != Value::Nil).count();
    assert_eq!(live, 0, "replica: invalidated entries answer GET after the INVALIDATE replicated");
    assert_eq!(tagcount(&mut r, "t"), 0);
    assert!(m.stats().get("reclaim_pending") > 0, "master reclaim already done: test proves nothing");
    m.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1000"));
    wait_reclaimed(&mut m, Duration::from_secs(10));
    wait_replicated(&mut m);
    assert_eq!(dbsize(&mut r), 2);
    let ex = r.int(&(0..n).fold(cmd!("EXISTS"), |mut c, i| {
        c.arg(format!("t:{i}"));
        c
    }));
    assert_eq!(ex, 0, "invalidated keys still on the replica");
    let rs = r.stats();
    assert_eq!(rs.get("reclaimed"), 0, "a replica never reclaims itself: {rs:?}");
    assert_eq!(rs.get("reclaim_pending"), 0, "{rs:?}");
    assert_eq!(m.stats().get("reclaimed"), n);
    let vm = assert_index_exact_with(&mut m, &[b"t"]);
    let vr = assert_index_exact_with(&mut r, &[b"t"]);
    assert_eq!(vm, view_of(&[(0, "x", &["x_only"])]));
    assert_eq!(vr, vm);
}

// =============================================================================================
// 3. Index exactness on every keyspace path

#[test]
fn index_overwrite_with_other_tags() {
    let s = Server::start();
    let mut c = s.conn();
    tset(&mut c, "k", "v", &["a", "b"], &[]);
    tset(&mut c, "j", "v", &["a"], &[]);
    tset(&mut c, "k", "v2", &["c"], &[]);
    tset(&mut c, "j", "v2", &["a", "d"], &[]);
    tset(&mut c, "u", "v", &["a"], &[]);
    tset(&mut c, "u", "v2", &[], &["PX", "100000"]);
    tset(&mut c, "kt", "v", &["e"], &["PX", "100000"]);
    c.ok(&cmd!("TIERCACHE.SET", "kt", "v2", "PX", 200_000, "KEEPTTL", "TAGS", 1, "f"));
    let v = assert_index_exact_with(&mut c, &[b"b", b"e"]);
    assert_eq!(v, view_of(&[(0, "a", &["j"]), (0, "c", &["k"]), (0, "d", &["j"]), (0, "f", &["kt"])]));
    // Invalidating an overwritten-away tag touches nothing.
    assert_eq!(invalidate(&mut c, &["b", "e"]), 0);
    assert_eq!(c.get("k").as_deref(), Some(&b"v2"[..]));
    assert_eq!(invalidate(&mut c, &["c"]), 1);
    assert_index_exact_with(&mut c, &[b"b", b"c", b"e"]);
}

#[test]
fn index_del_and_unlink() {
    let s = Server::start();
    let mut c = s.conn();
    for k in ["d1", "d2", "u1", "u2", "keep"] {
        tset(&mut c, k, "v", &["t", k], &[]);
    }
    assert_eq!(c.int(&cmd!("DEL", "d1", "d2", "missing")), 2);
    assert_eq!(c.int(&cmd!("UNLINK", "u1")), 1);
    // A large value so UNLINK may free it lazily.
    c.ok(&cmd!("TIERCACHE.SET", "big", incompressible(200_000, 7), "NOCOMPRESS", "TAGS", 1, "t"));
    assert_eq!(c.int(&cmd!("UNLINK", "big", "u2")), 2);
    let v = assert_index_exact_with(&mut c, &[b"d1", b"d2", b"u1", b"u2"]);
    assert_eq!(v, view_of(&[(0, "t", &["keep"]), (0, "keep", &["keep"])]));
    assert_eq!(invalidate(&mut c, &["t"]), 1);
}

#[test]
fn index_rename() {
    let s = Server::start();
    let mut c = s.conn();
    tset(&mut c, "src", "v", &["a", "b"], &[]);
    c.ok(&cmd!("RENAME", "src", "dst"));
    let v = assert_index_exact(&mut c);
    assert_eq!(v, view_of(&[(0, "a", &["dst"]), (0, "b", &["dst"])]));
    // Onto an existing tagged key (its tags go away with it).
    tset(&mut c, "other", "o", &["x", "a"], &[]);
    c.ok(&cmd!("RENAME", "dst", "other"));
    let v = assert_index_exact_with(&mut c, &[b"x"]);
    assert_eq!(v, view_of(&[(0, "a", &["other"]), (0, "b", &["other"])]));
    assert_eq!(c.get("other").as_deref(), Some(&b"v"[..]));
    // RENAMENX, and RENAME onto itself.
    assert_eq!(c.int(&cmd!("RENAMENX", "other", "nx")), 1);
    c.ok(&cmd!("RENAME", "nx", "nx"));
    tset(&mut c, "blocker", "b", &["z"], &[]);
    assert_eq!(c.int(&cmd!("RENAMENX", "nx", "blocker")), 0);
    // Onto a native string key and a native key onto a tagged one.
    c.ok(&cmd!("SET", "str", "s"));
    c.ok(&cmd!("RENAME", "nx", "str"));
    c.ok(&cmd!("SET", "str2", "s"));
    c.ok(&cmd!("RENAME", "str2", "blocker"));
    let v = assert_index_exact_with(&mut c, &[b"x", b"z"]);
    assert_eq!(v, view_of(&[(0, "a", &["str"]), (0, "b", &["str"])]));
    assert_eq!(invalidate(&mut c, &["b"]), 1);
    assert_eq!(c.get("str"), None);
    assert_index_exact_with(&mut c, &[b"a", b"b", b"x", b"z"]);
}

#[test]
fn index_move() {
    let s = Server::start();
    let mut c = s.conn();
    tset(&mut c, "m", "v", &["a"], &[]);
    tset(&mut c, "n", "v", &["a", "b"], &[]);
    assert_eq!(c.int(&cmd!("MOVE", "m", 1)), 1);
    // MOVE refused: the target exists.
    c.select(1);
    tset(&mut c, "n", "db1", &["c"], &[]);
    c.select(0);
    assert_eq!(c.int(&cmd!("MOVE", "n", 1)), 0);
    let v = assert_index_exact(&mut c);
    assert_eq!(v, view_of(&[(0, "a", &["n"]), (0, "b", &["n"]), (1, "a", &["m"]), (1, "c", &["n"])]));
    c.select(1);
    assert_eq!(tagkeys(&mut c, "a", None), vec![b("m")]);
    assert_eq!(invalidate(&mut c, &["a"]), 1);
    assert_eq!(c.get("m"), None);
    c.select(0);
    assert_eq!(c.get("n").as_deref(), Some(&b"v"[..]), "db 0 untouched by INVALIDATE a in db 1");
    let v = assert_index_exact(&mut c);
    assert_eq!(v, view_of(&[(0, "a", &["n"]), (0, "b", &["n"]), (1, "c", &["n"])]));
}

#[test]
fn index_copy() {
    let s = Server::start();
    let mut c = s.conn();
    tset(&mut c, "a", "v", &["t", "u"], &["PX", "100000"]);
    assert_eq!(c.int(&cmd!("COPY", "a", "b")), 1);
    assert_eq!(c.int(&cmd!("COPY", "a", "c", "DB", 1)), 1);
    tset(&mut c, "d", "old", &["old"], &[]);
    assert_eq!(c.int(&cmd!("COPY", "a", "d", "REPLACE")), 1);
    assert_eq!(c.int(&cmd!("COPY", "a", "d")), 0, "no REPLACE: refused");
    let v = assert_index_exact_with(&mut c, &[b"old"]);
    assert_eq!(v, view_of(&[(0, "t", &["a", "b", "d"]), (0, "u", &["a", "b", "d"]), (1, "t", &["c"]), (1, "u", &["c"])]));
    c.select(1);
    assert_eq!(tagkeys(&mut c, "t", None), vec![b("c")]);
    assert_eq!(c.get("c").as_deref(), Some(&b"v"[..]));
    c.select(0);
    // The copies are independent entries: invalidating in db 0 leaves the db 1 copy alone.
    assert_eq!(invalidate(&mut c, &["u"]), 3);
    c.select(1);
    assert_eq!(c.get("c").as_deref(), Some(&b"v"[..]));
    c.select(0);
    let v = assert_index_exact_with(&mut c, &[b"old"]);
    assert_eq!(v, view_of(&[(1, "t", &["c"]), (1, "u", &["c"])]));
}

#[test]
fn index_dump_restore() {
    let s = Server::start();
    let mut c = s.conn();
    tset(&mut c, "a", "v", &["t", "x"], &[]);
    tset(&mut c, "b", "vb", &["y"], &[]);
    let dump = c.bytes(&cmd!("DUMP", "a")).expect("DUMP a");
    assert_eq!(c.int(&cmd!("DEL", "a")), 1);
    c.ok(&cmd!("RESTORE", "a", 0, &dump[..]));
    c.ok(&cmd!("RESTORE", "a2", 100_000, &dump[..]));
    c.ok(&cmd!("RESTORE", "b", 0, &dump[..], "REPLACE"));
    assert!(c.try_run(&cmd!("RESTORE", "b", 0, &dump[..])).is_err(), "RESTORE onto an existing key without REPLACE");
    let v = assert_index_exact_with(&mut c, &[b"y"]);
    assert_eq!(v, view_of(&[(0, "t", &["a", "a2", "b"]), (0, "x", &["a", "a2", "b"])]));
    c.select(2);
    c.ok(&cmd!("RESTORE", "a", 0, &dump[..]));
    c.select(0);
    // A dump taken before an invalidation, restored after it: live or dead, the index stays exact.
    assert_eq!(invalidate(&mut c, &["x"]), 3);
    c.ok(&cmd!("RESTORE", "late", 0, &dump[..]));
    c.ok(&cmd!("RESTORE", "b", 0, &dump[..], "REPLACE"));
    let v = assert_index_exact_with(&mut c, &[b"y"]);
    c.select(2);
    assert_eq!(c.get("a").as_deref(), Some(&b"v"[..]), "db 2 untouched");
    c.select(0);
    assert_eq!(v[&2], view_of(&[(2, "t", &["a"]), (2, "x", &["a"])])[&2]);
}

#[test]
fn index_active_expiry() {
    let s = Server::start();
    let mut c = s.conn();
    for i in 0..20 {
        tset(&mut c, &format!("e:{i}"), "v", &["exp", if i % 2 == 0 { "even" } else { "odd" }], &["PX", "50"]);
    }
    tset(&mut c, "stay", "v", &["exp"], &[]);
    c.select(1);
    tset(&mut c, "e1", "v", &["exp"], &["PX", "50"]);
    c.select(0);
    // Do not touch the keys: only the active expiry cycle may delete them.
    let ok = wait_until(Duration::from_secs(10), || info_int(&mut c, "stats", "expired_keys") == 21);
    assert!(ok, "active expiry did not delete the 21 keys: expired_keys {}", info_int(&mut c, "stats", "expired_keys"));
    let st = c.stats();
    assert_eq!(st.get("tag_index_entries"), 1, "{st:?}");
    assert_eq!(st.get("tags"), 1, "{st:?}");
    let v = assert_index_exact_with(&mut c, &[b"even", b"odd", b"exp"]);
    assert_eq!(v, view_of(&[(0, "exp", &["stay"])]));
}

#[test]
fn index_lazy_expiry() {
    let s = Server::start();
    let mut c = s.conn();
    c.ok(&cmd!("DEBUG", "SET-ACTIVE-EXPIRE", 0));
    for i in 0..10 {
        tset(&mut c, &format!("l:{i}"), "v", &["lazy", &format!("own{i}")], &["PX", "50"]);
    }
    tset(&mut c, "stay", "v", &["lazy"], &[]);
    sleep(ms(150));
    assert_eq!(info_int(&mut c, "stats", "expired_keys"), 0, "active expiry is off");
    // Each path that expires a key lazily.
    assert_eq!(c.get("l:0"), None);
    assert_eq!(c.meta("l:1"), None);
    assert!(!c.exists("l:2"));
    assert_eq!(c.int(&cmd!("TTL", "l:3")), -2);
    c.ok(&cmd!("TIERCACHE.SET", "l:4", "new", "TAGS", 1, "fresh"));
    assert_eq!(c.int(&cmd!("COPY", "l:5", "copy5")), 0);
    assert!(c.try_run(&cmd!("RENAME", "l:6", "r6")).is_err());
    assert_eq!(c.int(&cmd!("DEL", "l:7")), 0);
    assert_eq!(info_int(&mut c, "stats", "expired_keys"), 8);
    // SCAN (inside the helper) expires the rest lazily.
    let zero: Vec<B> = (0..10).map(|i| format!("own{i}").into_bytes()).collect();
    let zero: Vec<&[u8]> = zero.iter().map(|t| &t[..]).collect();
    let v = assert_index_exact_with(&mut c, &zero);
    assert_eq!(v, view_of(&[(0, "lazy", &["stay"]), (0, "fresh", &["l:4"])]));
    assert_eq!(info_int(&mut c, "stats", "expired_keys"), 10);
    c.ok(&cmd!("DEBUG", "SET-ACTIVE-EXPIRE", 1));
}

fn flush_fixture(c: &mut Conn) {
    for db in [0, 1, 2] {
        c.select(db);
        tset(c, "a", "v", &["t", &format!("only{db}")], &[]);
        tset(c, "b", "v", &["t"], &["PX", "100000"]);
        tset(c, "plain", "v", &[], &[]);
    }
    c.select(0);
}

#[test]
fn index_flushdb() {
    let s = Server::start();
    let mut c = s.conn();
    flush_fixture(&mut c);
    c.select(1);
    c.ok(&cmd!("FLUSHDB"));
    c.select(2);
    c.ok(&cmd!("FLUSHDB", "ASYNC"));
    c.select(1);
    assert_eq!(tagcount(&mut c, "t"), 0);
    c.select(0);
    assert_eq!(tagcount(&mut c, "t"), 2);
    let v = assert_index_exact_with(&mut c, &[b"only1", b"only2"]);
    assert_eq!(v, view_of(&[(0, "t", &["a", "b"]), (0, "only0", &["a"])]));
    // A flushed db is usable again with the same tags; INVALIDATE there works.
    c.select(1);
    tset(&mut c, "a", "again", &["t"], &[]);
    assert_eq!(invalidate(&mut c, &["t"]), 1);
    tset(&mut c, "a", "third", &["t"], &[]);
    c.select(0);
    // FLUSHDB racing a pending reclaim: a key written after the flush is kept.
    let r =
        multi(&mut c, &[cmd!("TIERCACHE.INVALIDATE", "t"), cmd!("FLUSHDB"), cmd!("TIERCACHE.SET", "a", "after", "TAGS", 1, "t")]);
    assert_eq!(r[0], Value::Int(2));
    wait_reclaimed(&mut c, Duration::from_secs(10));
    sleep(ms(20));
    assert_eq!(c.get("a").as_deref(), Some(&b"after"[..]), "a key written after FLUSHDB was reclaimed");
    let v = assert_index_exact_with(&mut c, &[b"only0", b"only1", b"only2"]);
    assert_eq!(v, view_of(&[(0, "t", &["a"]), (1, "t", &["a"])]));
}

#[test]
fn index_flushall() {
    let s = Server::start();
    let mut c = s.conn();
    flush_fixture(&mut c);
    c.ok(&cmd!("FLUSHALL"));
    let st = c.stats();
    assert_eq!((st.get("tags"), st.get("tag_index_entries"), st.get("entries")), (0, 0, 0), "{st:?}");
    assert_index_exact_with(&mut c, &[b"t", b"only0", b"only1", b"only2"]);
    flush_fixture(&mut c);
    // FLUSHALL in the middle of a pending reclaim, then new entries under the same names.
    let r = multi(&mut c, &[cmd!("TIERCACHE.INVALIDATE", "t"), cmd!("FLUSHALL", "ASYNC")]);
    assert_eq!(r[0], Value::Int(2));
    tset(&mut c, "a", "after", &["t"], &[]);
    wait_reclaimed(&mut c, Duration::from_secs(10));
    sleep(ms(20));
    assert_eq!(c.get("a").as_deref(), Some(&b"after"[..]));
    let v = assert_index_exact_with(&mut c, &[b"only0", b"only1", b"only2"]);
    assert_eq!(v, view_of(&[(0, "t", &["a"])]));
}

#[test]
fn index_swapdb() {
    let s = Server::start();
    let mut c = s.conn();
    tset(&mut c, "a1", "db0", &["x"], &[]);
    tset(&mut c, "a2", "db0", &["z"], &[]);
    c.select(1);
    tset(&mut c, "b1", "db1", &["x"], &[]);
    tset(&mut c, "b2", "db1", &["y"], &[]);
    c.select(0);
    c.ok(&cmd!("SWAPDB", 0, 1));
    assert_eq!(tagkeys(&mut c, "x", None), vec![b("b1")]);
    assert_eq!(tagkeys(&mut c, "y", None), vec![b("b2")]);
    assert_eq!(tagcount(&mut c, "z"), 0);
    c.select(1);
    assert_eq!(tagkeys(&mut c, "x", None), vec![b("a1")]);
    assert_eq!(tagkeys(&mut c, "z", None), vec![b("a2")]);
    assert_eq!(tagcount(&mut c, "y"), 0);
    c.select(0);
    let v = assert_index_exact_with(&mut c, &[b"x", b"y", b"z"]);
    assert_eq!(v, view_of(&[(0, "x", &["b1"]), (0, "y", &["b2"]), (1, "x", &["a1"]), (1, "z", &["a2"])]));
    // INVALIDATE follows the data too.
    assert_eq!(invalidate(&mut c, &["x"]), 1);
    assert_eq!(c.get("b1"), None);
    c.select(1);
    assert_eq!(c.get("a1").as_deref(), Some(&b"db0"[..]));
    c.select(0);
    // Swap with an empty db, and a pending reclaim across a swap.
    let r = multi(&mut c, &[cmd!("TIERCACHE.INVALIDATE", "y"), cmd!("SWAPDB", 0, 5)]);
    assert_eq!(r[0], Value::Int(1));
    c.select(5);
    assert_eq!(c.get("b2"), None, "invalidated entry swapped to db 5 came back");
    c.select(0);
    let v = assert_index_exact_with(&mut c, &[b"x", b"y", b"z"]);
    assert_eq!(v, view_of(&[(1, "x", &["a1"]), (1, "z", &["a2"])]));
    c.select(5);
    assert_eq!(dbsize(&mut c), 0, "the invalidated entry in db 5 was not reclaimed");
}

#[test]
fn index_debug_reload() {
    let s = Server::start();
    let mut c = s.conn();
    for i in 0..30 {
        tset(&mut c, &format!("k:{i}"), "v", &["all", &format!("m{}", i % 3)], if i % 2 == 0 { &["PX", "100000"] } else { &[] });
    }
    c.select(1);
    tset(&mut c, "k:0", "v", &["all", "db1"], &[]);
    c.select(0);
    tset(&mut c, "plain", "v", &[], &[]);
    let before = assert_index_exact(&mut c);
    c.ok(&cmd!("DEBUG", "RELOAD"));
    let after = assert_index_exact(&mut c);
    assert_eq!(after, before, "tag index after DEBUG RELOAD");
    assert_eq!(invalidate(&mut c, &["m0"]), 10);
    c.ok(&cmd!("DEBUG", "RELOAD"));
    for i in (0..30).step_by(3) {
        assert_eq!(c.get(format!("k:{i}")), None, "k:{i} came back after DEBUG RELOAD");
    }
    let v = assert_index_exact_with(&mut c, &[b"m0"]);
    assert_eq!(v[&0][&b("all")].len(), 20);
    assert_eq!(v[&1][&b("all")].len(), 1);
}

#[test]
fn dead_entries_stay_dead_when_renamed_copied_moved_or_dumped() {
    let s = Server::start();
    let mut c = s.conn();
    for k in ["r", "c", "m", "d"] {
        tset(&mut c, k, "v", &["t"], &[]);
    }
    tset(&mut c, "live", "v", &["other"], &[]);
    let r = multi(
        &mut c,
        &[
            cmd!("TIERCACHE.INVALIDATE", "t"),
            cmd!("RENAME", "r", "r2"),
            cmd!("COPY", "c", "c2"),
            cmd!("COPY", "c", "c3", "DB", 1),
            cmd!("MOVE", "m", 2),
            cmd!("DUMP", "d"),
        ],
    );
    assert_eq!(r[0], Value::Int(4));
    let dump = as_bytes(&r[5]).expect("DUMP of the invalidated entry");
    assert_eq!(c.get("r2"), None, "renamed invalidated entry is live again");
    assert_eq!(c.get("c2"), None, "copy of an invalidated entry is live");
    c.select(1);
    assert_eq!(c.get("c3"), None, "copy (DB 1) of an invalidated entry is live");
    c.select(2);
    assert_eq!(c.get("m"), None, "moved invalidated entry is live again");
    c.select(0);
    wait_reclaimed(&mut c, Duration::from_secs(10));
    // Restoring the dump of an invalidated entry does not resurrect it.
    match c.try_run(&cmd!("RESTORE", "d2", 0, &dump[..])) {
        Ok(v) => {
            assert!(is_ok(&v));
            assert_eq!(c.get("d2"), None, "RESTORE of an invalidated entry's DUMP is live");
        }
        Err(e) => panic!("RESTORE of a dead entry's dump failed: {e}"),
    }
    assert!(wait_until(Duration::from_secs(5), || dbsize(&mut c) == 1), "dbsize {}", dbsize(&mut c));
    for db in [1, 2] {
        c.select(db);
        assert!(wait_until(Duration::from_secs(5), || dbsize(&mut c) == 0), "db {db}: dead entry not reclaimed");
    }
    c.select(0);
    let v = assert_index_exact_with(&mut c, &[b"t"]);
    assert_eq!(v, view_of(&[(0, "other", &["live"])]));
}

// =============================================================================================
// 4. Churn: eviction, expiry, overwrites, deletes, invalidations, full sync and a live replica

fn used_counted(c: &mut Conn) -> i64 {
    info_int(c, "memory", "used_memory") - info_int(c, "memory", "mem_not_counted_for_evict")
}

#[test]
fn churn_with_eviction_expiry_and_replica() {
    // A minimal backlog: the replication buffer counts towards maxmemory in Redis 7.
    let master = Server::builder().args(&["--maxmemory-policy", "allkeys-lru", "--repl-backlog-size", "16kb"]).start();
    let mut m = master.conn();
    let baseline = used_counted(&mut m);
    let pool: Vec<B> = (0..50).map(|i| format!("tag{i}").into_bytes()).collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let total = 3000u64;
    let mut next_key = 0u64;
    let mut seed = 1u64;

    let mut entry_cmd = |rng: &mut Rng, key: &[u8]| -> redis::Cmd {
        let ntags = 1 + rng.below(3) as usize;
        let mut tags: Vec<&[u8]> = Vec::new();
        while tags.len() < ntags {
            let t = &pool[rng.below(pool.len() as u64) as usize][..];
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        seed += 1;
        let value = incompressible(500 + rng.below(200) as usize, seed);
        if rng.below(5) == 0 {
            let px = (50 + rng.below(251)).to_string();
            set_cmd(key, &value, &tags, &["NOCOMPRESS", "PX", &px])
        } else {
            set_cmd(key, &value, &tags, &["NOCOMPRESS"])
        }
    };

    // Batch 1: half the entries, on the master alone.
    let mut cmds = Vec::new();
    while next_key < total / 2 {
        cmds.push(entry_cmd(&mut rng, format!("key:{next_key}").as_bytes()));
        next_key += 1;
    }
    for chunk in cmds.chunks(50) {
        m.pipeline_ok(chunk);
    }
    // A full sync while a slow reclaim is pending.
    m.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1"));
    let n0 = invalidate(&mut m, &["tag0", "tag1"]);
    assert!(n0 > 0);
    let replica = master.start_replica(Server::builder());
    let mut r = replica.conn();
    m.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1000"));
    wait_reclaimed(&mut m, Duration::from_secs(30));

    // Memory limit a bit below what the data uses now: eviction from here on.
    let used = used_counted(&mut m);
    assert!(used > baseline + 300_000, "batch 1 uses too little memory: {baseline} -> {used}");
    let backlog = info_int(&mut m, "memory", "mem_replication_backlog");
    let limit = baseline + backlog + (used - baseline - backlog) * 6 / 10;
    m.ok(&cmd!("CONFIG", "SET", "maxmemory", limit.to_string()));

    // Batch 2: new entries interleaved with overwrites, deletes, reads (lazy expiry) and invalidations.
    let mut ops = 0;
    while next_key < total {
        let mut chunk = Vec::new();
        for _ in 0..40 {
            if next_key >= total {
                break;
            }
            chunk.push(entry_cmd(&mut rng, format!("key:{next_key}").as_bytes()));
            next_key += 1;
            let old = format!("key:{}", rng.below(next_key));
            match rng.below(10) {
                0 | 1 => chunk.push(entry_cmd(&mut rng, old.as_bytes())),
                2 => chunk.push(cmd!("DEL", &old)),
                3 => chunk.push(cmd!("UNLINK", &old)),
                4 | 5 => chunk.push(cmd!("TIERCACHE.GET", &old)),
                6 => chunk.push(cmd!("SET", format!("native:{}", rng.below(100)), "x")),
                _ => {}
            }
        }
        ops += 1;
        if ops % 3 == 0 {
            let t = &pool[rng.below(pool.len() as u64) as usize];
            chunk.push(cmd!("TIERCACHE.INVALIDATE", &t[..]));
        }
        let replies = m.pipeline(&chunk);
        if let Some((cm, Value::ServerError(e))) = chunk.iter().zip(&replies).find(|(_, v)| matches!(v, Value::ServerError(_))) {
            let mem = m.info("memory");
            let keys = m.info("keyspace");
            let st = m.stats();
            let ev = info_int(&mut m, "stats", "evicted_keys");
            panic!(
                "{:?} failed: {} (limit {limit}, baseline {baseline}, counted now {}, evicted {ev}, keyspace {keys}, stats {st:?})\n{mem}",
                cmd_text(cm),
                error_text(e),
                used_counted(&mut m)
            );
        }
    }
    let evicted = info_int(&mut m, "stats", "evicted_keys");
    assert!(evicted > 0, "no eviction happened (maxmemory {limit}, used {})", used_counted(&mut m));
    // Stop evicting (the checks below must see a still keyspace), let every PX entry expire.
    m.ok(&cmd!("CONFIG", "SET", "maxmemory", "0"));
    // Every PX (<= 300 ms) was applied before the last pipeline's replies came back.
    sleep(ms(400));
    let st = m.stats();
    assert!(st.get("invalidations") >= 10, "{st:?}");
    assert!(st.get("tag_index_entries") > 300, "{st:?}");
    // Master first: its SCAN expires what is left lazily (replicated as DELs); then the replica.
    let vm = assert_index_exact_with(&mut m, &[b"tag0", b"tag1"]);
    wait_replicated(&mut m);
    let vr = assert_index_exact_with(&mut r, &[b"tag0", b"tag1"]);
    assert_eq!(dbsize(&mut r), dbsize(&mut m));
    assert!(vr == vm, "replica's tag view differs from the master's:\nmaster:{}\nreplica:{}", fmt_view(&vm), fmt_view(&vr));
    assert_eq!(r.stats().get("reclaimed"), 0);
    eprintln!(
        "churn: {} keys left, {} evicted, {} tags, {} index entries",
        dbsize(&mut m),
        evicted,
        m.stats().get("tags"),
        m.stats().get("tag_index_entries")
    );
}

// =============================================================================================
// 5. Persistence in the middle of a large reclaim

const BIG: usize = 20_000;
const UNTAGGED: usize = 200;
const U_ONLY: usize = 50;

/// 20k entries tagged t (every 10th also u), 50 tagged u only, 200 untagged; reclaim-budget 1;
/// INVALIDATE t. Returns with the reclaim barely started.
fn load_and_invalidate(c: &mut Conn, rewrite_before: bool) {
    let mut cmds = Vec::with_capacity(BIG + UNTAGGED + U_ONLY);
    for i in 0..BIG {
        let tags: &[&[u8]] = if i % 10 == 0 { &[b"t", b"u"] } else { &[b"t"] };
        cmds.push(set_cmd(format!("t:{i}").as_bytes(), b"value", tags, &[]));
    }
    for i in 0..U_ONLY {
        cmds.push(set_cmd(format!("u:{i}").as_bytes(), b"value", &[b"u"], &[]));
    }
    for i in 0..UNTAGGED {
        cmds.push(set_cmd(format!("plain:{i}").as_bytes(), b"value", &[], &["PX", "3600000"]));
    }
    c.pipeline_ok(&cmds);
    assert_eq!(dbsize(c), (BIG + UNTAGGED + U_ONLY) as i64);
    if rewrite_before {
        c.run(&cmd!("BGREWRITEAOF"));
    }
    c.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1"));
    assert_eq!(invalidate(c, &["t"]), BIG as i64);
    let pending = c.stats().get("reclaim_pending");
    assert!(pending > (BIG as i64) - 1000, "reclaim_pending {pending}: the reclaim is not slow");
}

/// After the reload: no invalidated entry is GET-able, the others are; then the reclaim finishes.
fn check_after_reload(c: &mut Conn) {
    let gets: Vec<redis::Cmd> = (0..BIG).map(|i| cmd!("TIERCACHE.GET", format!("t:{i}"))).collect();
    let replies = c.pipeline_ok(&gets);
    let live: Vec<usize> = (0..BIG).filter(|i| replies[*i] != Value::Nil).collect();
    assert!(
        live.is_empty(),
        "{} invalidated entries answer GET after the reload, e.g. t:{:?}",
        live.len(),
        &live[..live.len().min(5)]
    );
    let metas = c.pipeline_ok(&(0..BIG).step_by(97).map(|i| cmd!("TIERCACHE.META", format!("t:{i}"))).collect::<Vec<_>>());
    assert!(metas.iter().all(|v| *v == Value::Nil), "META of an invalidated entry after the reload");
    for i in 0..U_ONLY {
        assert_eq!(c.get(format!("u:{i}")).as_deref(), Some(&b"value"[..]), "u:{i}");
    }
    for i in 0..UNTAGGED {
        assert_eq!(c.get(format!("plain:{i}")).as_deref(), Some(&b"value"[..]), "plain:{i}");
    }
    c.ok(&cmd!("CONFIG", "SET", "tiercache.reclaim-budget", "1000"));
    wait_reclaimed(c, Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(10), || dbsize(c) == (UNTAGGED + U_ONLY) as i64),
        "dbsize {} after the reclaim, want {}",
        dbsize(c),
        UNTAGGED + U_ONLY
    );
    assert_eq!(tagcount(c, "u"), U_ONLY as i64);
    assert_eq!(tagcount(c, "t"), 0);
    let v = assert_index_exact_with(c, &[b"t"]);
    assert_eq!(v[&0][&b("u")].len(), U_ONLY);
    assert_eq!(v[&0].len(), 1);
}

#[test]
fn persistence_debug_reload_mid_reclaim() {
    let s = Server::start();
    let mut c = s.conn();
    load_and_invalidate(&mut c, false);
    c.ok(&cmd!("DEBUG", "RELOAD"));
    check_after_reload(&mut c);
}

#[test]
fn persistence_rdb_restart_mid_reclaim() {
    let mut s = Server::builder().args(&["--tiercache.reclaim-budget", "1"]).start();
    let mut c = s.conn();
    load_and_invalidate(&mut c, false);
    c.ok(&cmd!("SAVE"));
    drop(c);
    s.restart();
    assert!(s.log().contains("DB loaded from disk"), "restart did not load the RDB");
    let mut c = s.conn();
    assert_eq!(c.config_get("tiercache.reclaim-budget"), "1");
    check_after_reload(&mut c);
}

fn aof_mid_reclaim(preamble: &str, rewrite: Option<bool>) {
    let mut s = Server::builder()
        .args(&["--appendonly", "yes", "--aof-use-rdb-preamble", preamble, "--tiercache.reclaim-budget", "1"])
        .start();
    let mut c = s.conn();
    s.wait_no_background_job();
    load_and_invalidate(&mut c, rewrite == Some(false));
    if rewrite == Some(true) {
        // Rewrite in the middle of the reclaim: the base holds invalidated entries.
        c.run(&cmd!("BGREWRITEAOF"));
    }
    s.wait_no_background_job();
    assert!(c.stats().get("reclaim_pending") > 0, "reclaim finished before the restart: test proves nothing");
    drop(c);
    s.restart();
    let mut c = s.conn();
    let st = c.stats();
    assert_eq!(st.get("invalidation_messages"), 0, "no message published while loading the AOF: {st:?}");
    check_after_reload(&mut c);
}

#[test]
fn persistence_aof_preamble_yes_rewrite_mid_reclaim() {
    aof_mid_reclaim("yes", Some(true));
}

#[test]
fn persistence_aof_preamble_no_rewrite_mid_reclaim() {
    aof_mid_reclaim("no", Some(true));
}

#[test]
fn persistence_aof_preamble_yes_rewrite_before_invalidate() {
    aof_mid_reclaim("yes", Some(false));
}

#[test]
fn persistence_aof_preamble_no_replay_only() {
    aof_mid_reclaim("no", None);
}

// =============================================================================================
// 6. Invalidation messages

#[derive(Debug, PartialEq)]
enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<B>),
    Array(Vec<Resp>),
}

/// A raw RESP2 subscriber connection (no client library state to get in the way).
struct Sub {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Sub {
    fn connect(s: &Server, channels: &[&str]) -> Sub {
        let w = TcpStream::connect(("127.0.0.1", s.port)).expect("connect subscriber");
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap());
        let mut sub = Sub { r, w };
        sub.subscribe(channels);
        sub
    }

    fn send(&mut self, args: &[&[u8]]) {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend(format!("${}\r\n", a.len()).into_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&out).unwrap();
    }

    fn subscribe(&mut self, channels: &[&str]) {
        let mut args: Vec<&[u8]> = vec![b"SUBSCRIBE"];
        args.extend(channels.iter().map(|c| c.as_bytes()));
        self.send(&args);
        for ch in channels {
            let v = self.read();
            match v {
                Resp::Array(ref items) if items.len() == 3 && items[0] == Resp::Bulk(Some(b("subscribe"))) => {
                    assert_eq!(items[1], Resp::Bulk(Some(b(ch))), "{v:?}");
                }
                other => panic!("SUBSCRIBE reply: {other:?}"),
            }
        }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).unwrap_or_else(|e| panic!("subscriber read: {e}"));
        assert!(l.ends_with("\r\n"), "truncated RESP line {l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn read(&mut self) -> Resp {
        let l = self.line();
        let (t, rest) = l.split_at(1);
        match t {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(rest.parse().unwrap()),
            "$" => {
                let n: i64 = rest.parse().unwrap();
                if n < 0 {
                    return Resp::Bulk(None);
                }
                let mut buf = vec![0u8; n as usize + 2];
                self.r.read_exact(&mut buf).unwrap();
                buf.truncate(n as usize);
                Resp::Bulk(Some(buf))
            }
            "*" => {
                let n: i64 = rest.parse().unwrap();
                Resp::Array((0..n.max(0)).map(|_| self.read()).collect())
            }
            _ => panic!("unexpected RESP line {l:?}"),
        }
    }

    /// Next published message as (channel, payload).
    fn message(&mut self) -> (B, B) {
        match self.read() {
            Resp::Array(mut items) if items.len() == 3 && items[0] == Resp::Bulk(Some(b("message"))) => {
                let payload = match items.pop().unwrap() {
                    Resp::Bulk(Some(p)) => p,
                    o => panic!("{o:?}"),
                };
                let ch = match items.pop().unwrap() {
                    Resp::Bulk(Some(c)) => c,
                    o => panic!("{o:?}"),
                };
                (ch, payload)
            }
            other => panic!("expected a pubsub message, got {other:?}"),
        }
    }

    /// Messages received before `marker` (published by the test itself on any subscribed channel).
    fn until_marker(&mut self, marker: &[u8]) -> Vec<(B, B)> {
        let mut out = Vec::new();
        loop {
            let (ch, p) = self.message();
            if p == marker {
                return out;
            }
            out.push((ch, p));
        }
    }
}

#[derive(Debug, PartialEq)]
struct Msg {
    v: u64,
    run_id: String,
    seq: u64,
    db: u64,
    tags: Vec<B>,
}

fn decode(data: &[u8]) -> Msg {
    let mut r = data;
    let val = rmpv::decode::read_value(&mut r).unwrap_or_else(|e| panic!("not MessagePack: {e} ({data:?})"));
    assert!(r.is_empty(), "trailing bytes after the MessagePack value: {r:?}");
    let map = match val {
        rmpv::Value::Map(kv) => kv,
        other => panic!("message is not a map: {other:?}"),
    };
    let keys: Vec<String> = map
        .iter()
        .map(|(k, _)| match k {
            rmpv::Value::String(s) => s.as_str().expect("utf8 key").to_string(),
            other => panic!("map key not a str: {other:?}"),
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(sorted, ["db", "run_id", "seq", "tags", "v"], "message fields {keys:?}");
    let get = |name: &str| &map.iter().find(|(k, _)| k.as_str() == Some(name)).unwrap().1;
    let uint = |name: &str| match get(name) {
        rmpv::Value::Integer(i) => i.as_u64().unwrap_or_else(|| panic!("{name} is negative")),
        other => panic!("{name} is not an integer: {other:?}"),
    };
    let run_id = match get("run_id") {
        rmpv::Value::String(s) => s.as_str().expect("utf8 run_id").to_string(),
        other => panic!("run_id is not a str: {other:?}"),
    };
    let tags = match get("tags") {
        rmpv::Value::Array(items) => items
            .iter()
            .map(|t| match t {
                rmpv::Value::Binary(b) => b.clone(),
                other => panic!("tag is not bin: {other:?}"),
            })
            .collect(),
        other => panic!("tags is not an array: {other:?}"),
    };
    Msg { v: uint("v"), run_id, seq: uint("seq"), db: uint("db"), tags }
}

const CHANNEL: &str = "tiercache:invalidations";

#[test]
fn messages_content_and_sequence() {
    let s = Server::start();
    let mut c = s.conn();
    assert_eq!(c.config_get("tiercache.invalidation-channel"), CHANNEL);
    let rid = run_id(&mut c);
    let mut sub = Sub::connect(&s, &[CHANNEL]);
    tset(&mut c, "k", "v", &["a"], &[]);

    assert_eq!(invalidate(&mut c, &["a", "b"]), 1);
    c.int(&cmd!("PUBLISH", CHANNEL, "marker1"));
    let got = sub.until_marker(b"marker1");
    assert_eq!(got.len(), 1, "one message per INVALIDATE, got {}", got.len());
    assert_eq!(got[0].0, b(CHANNEL));
    assert_eq!(decode(&got[0].1), Msg { v: 1, run_id: rid.clone(), seq: 1, db: 0, tags: vec![b("a"), b("b")] });

    // Order kept, binary tags, other dbs, unknown tags still publish.
    assert_eq!(c.int(&cmd!("TIERCACHE.INVALIDATE", "zz", &b"\0\xff"[..], "a")), 0);
    c.select(3);
    invalidate(&mut c, &["x"]);
    c.select(0);
    c.int(&cmd!("PUBLISH", CHANNEL, "marker2"));
    let got: Vec<Msg> = sub.until_marker(b"marker2").iter().map(|(_, p)| decode(p)).collect();
    assert_eq!(
        got,
        vec![
            Msg { v: 1, run_id: rid.clone(), seq: 2, db: 0, tags: vec![b("zz"), b"\0\xff".to_vec(), b("a")] },
            Msg { v: 1, run_id: rid.clone(), seq: 3, db: 3, tags: vec![b("x")] },
        ]
    );
    // A refused INVALIDATE publishes nothing.
    c.expect_err(&cmd!("TIERCACHE.INVALIDATE", ""), "ERR tags must not be empty strings");
    c.int(&cmd!("PUBLISH", CHANNEL, "marker3"));
    assert!(sub.until_marker(b"marker3").is_empty());
    let st = c.stats();
    assert_eq!((st.get("invalidations"), st.get("invalidation_messages")), (3, 3), "{st:?}");

    // Many tags in one message, in order.
    let mut cm = cmd!("TIERCACHE.INVALIDATE");
    let many: Vec<B> = (0..1024).map(|i| format!("m{i}").into_bytes()).collect();
    for t in &many {
        cm.arg(&t[..]);
    }
    c.int(&cm);
    let (_, p) = sub.message();
    let msg = decode(&p);
    assert_eq!(msg.seq, 4);
    assert_eq!(msg.tags, many);
}

#[test]
fn messages_channel_config() {
    let s = Server::start();
    let mut c = s.conn();
    let mut sub = Sub::connect(&s, &[CHANNEL, "other:chan"]);
    c.ok(&cmd!("CONFIG", "SET", "tiercache.invalidation-channel", "other:chan"));
    assert_eq!(c.config_get("tiercache.invalidation-channel"), "other:chan");
    invalidate(&mut c, &["a"]);
    c.int(&cmd!("PUBLISH", CHANNEL, "m1"));
    let got = sub.until_marker(b"m1");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, b("other:chan"), "message on the configured channel only");
    assert_eq!(decode(&got[0].1).seq, 1);

    // Empty: no publishing at all.
    c.ok(&cmd!("CONFIG", "SET", "tiercache.invalidation-channel", ""));
    assert_eq!(c.config_get("tiercache.invalidation-channel"), "");
    invalidate(&mut c, &["b"]);
    invalidate(&mut c, &["c"]);
    c.int(&cmd!("PUBLISH", CHANNEL, "m2"));
    assert!(sub.until_marker(b"m2").is_empty(), "published with an empty channel config");
    let st = c.stats();
    assert_eq!(st.get("invalidations"), 3);
    assert_eq!(st.get("invalidation_messages"), 1, "last published seq: nothing published while disabled");

    // Back to the default.
    c.ok(&cmd!("CONFIG", "SET", "tiercache.invalidation-channel", CHANNEL));
    invalidate(&mut c, &["d"]);
    c.int(&cmd!("PUBLISH", CHANNEL, "m3"));
    let got = sub.until_marker(b"m3");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, b(CHANNEL));
    let msg = decode(&got[0].1);
    assert_eq!(msg.tags, vec![b("d")]);
    assert_eq!(msg.seq as i64, c.stats().get("invalidation_messages"));

    // Set at startup (module arg and command line).
    drop(sub);
    let s2 = Server::builder().module_args(&["invalidation-channel", "boot:chan"]).start();
    assert_eq!(s2.conn().config_get("tiercache.invalidation-channel"), "boot:chan");
    let s3 = Server::builder().args(&["--tiercache.invalidation-channel", ""]).start();
    assert_eq!(s3.conn().config_get("tiercache.invalidation-channel"), "");
    let mut sub3 = Sub::connect(&s3, &[CHANNEL]);
    let mut c3 = s3.conn();
    invalidate(&mut c3, &["x"]);
    c3.int(&cmd!("PUBLISH", CHANNEL, "m4"));
    assert!(sub3.until_marker(b"m4").is_empty());
}

#[test]
fn messages_from_replica() {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn();
    let mut r = replica.conn();
    let mrid = run_id(&mut m);
    let rrid = run_id(&mut r);
    assert_ne!(mrid, rrid);
    let mut msub = Sub::connect(&master, &[CHANNEL]);
    let mut rsub = Sub::connect(&replica, &[CHANNEL]);
    // The replica's full resync already published reset messages: its own seq continues from there.
    let base = r.stats().get("invalidation_messages") as u64;
    tset(&mut m, "k", "v", &["a"], &[]);
    // Two invalidations on the master before the replica's first: the replica counts its own seq.
    invalidate(&mut m, &["zz"]);
    wait_replicated(&mut m);
    let (_, first) = rsub.message();
    assert_eq!(decode(&first), Msg { v: 1, run_id: rrid.clone(), seq: base + 1, db: 0, tags: vec![b("zz")] });
    m.ok(&cmd!("SELECT", 2));
    invalidate(&mut m, &["a", "b"]);
    m.ok(&cmd!("SELECT", 0));
    assert_eq!(invalidate(&mut m, &["a", "b"]), 1);
    wait_replicated(&mut m);
    r.int(&cmd!("PUBLISH", CHANNEL, "rmark"));
    let got: Vec<Msg> = rsub.until_marker(b"rmark").iter().map(|(_, p)| decode(p)).collect();
    assert_eq!(
        got,
        vec![
            Msg { v: 1, run_id: rrid.clone(), seq: base + 2, db: 2, tags: vec![b("a"), b("b")] },
            Msg { v: 1, run_id: rrid.clone(), seq: base + 3, db: 0, tags: vec![b("a"), b("b")] },
        ],
        "the replica publishes its own messages (own run_id and seq), once per replicated INVALIDATE"
    );
    m.int(&cmd!("PUBLISH", CHANNEL, "mmark"));
    let got: Vec<Msg> = msub.until_marker(b"mmark").iter().map(|(_, p)| decode(p)).collect();
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|g| g.run_id == mrid));
    assert_eq!(got.iter().map(|g| g.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    let rs = r.stats();
    assert_eq!(rs.get("invalidation_messages") as u64, base + 3, "{rs:?}");
    assert_eq!(r.get("k"), None);
}
