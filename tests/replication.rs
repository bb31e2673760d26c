//! A replica answers TIERCACHE.GET / META exactly like its master: for writes streamed after the link
//! is up, after a full resync (disk-based and diskless, with diskless load), whatever the replica's own
//! configs, and it refuses writes.

#[macro_use]
mod common;

use std::thread::sleep;

use common::*;

proto_tests!(
    live_stream_matches_master,
    full_resync_disk_based,
    full_resync_diskless,
    full_resync_diskless_load_swapdb,
    replicaof_command_replaces_replica_data,
    live_overwrite_delete_ttl_changes,
    stale_state_on_replica,
);

/// Waits until the replica has acknowledged everything written so far.
fn wait_replicated(master: &mut Conn) {
    assert_eq!(master.int(&cmd!("WAIT", 1, 5000)), 1, "WAIT 1: the replica did not acknowledge");
}

/// Touches the keys that must be gone on the master (expiring them lazily there, which replicates a
/// DEL), then waits for the replica.
fn settle(master: &mut Conn) {
    for (db, key) in absent_keys() {
        master.select(db);
        assert!(!master.exists(&key[..]));
    }
    master.select(0);
    wait_replicated(master);
}

fn compare_master_replica(m: &mut Conn, r: &mut Conn) {
    let ms_ = snapshot(m);
    check_fixture(&ms_);
    let rs = snapshot(r);
    compare_snapshots(&ms_, &rs, "replica vs master");
    for (db, key) in absent_keys() {
        r.select(db);
        assert!(!r.exists(&key[..]), "db {db} key {:?} exists on the replica", String::from_utf8_lossy(&key));
    }
    r.select(0);
    assert_eq!(r.string(&cmd!("GET", "native")).as_deref(), Some("string"));
    assert_eq!(aggregate_stats(r), aggregate_stats(m), "STATS entries/compressed/bytes on replica vs master");
}

fn live_stream_matches_master(p: Proto) {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn_proto(p);
    let mut r = replica.conn_proto(p);
    populate(&mut m);
    settle(&mut m);
    compare_master_replica(&mut m, &mut r);
}

fn full_resync(p: Proto, master_args: &[&str], replica_args: &[&str]) {
    let master = Server::builder().args(master_args).start();
    let mut m = master.conn_proto(p);
    populate(&mut m);
    // Expire the short-lived key on the master before the sync.
    for (db, key) in absent_keys() {
        m.select(db);
        assert!(!m.exists(&key[..]));
    }
    m.select(0);
    let replica = master.start_replica(Server::builder().args(replica_args));
    let info = replica.conn().info("replication");
    assert!(info.contains("master_link_status:up"), "{info}");
    wait_replicated(&mut m);
    let mut r = replica.conn_proto(p);
    compare_master_replica(&mut m, &mut r);
    // The link keeps streaming after the sync.
    m.set("later", "after sync", &["PX", "60000", "STALE", "2", "TAGS", "1", "late"]);
    wait_replicated(&mut m);
    assert_eq!(r.meta("later").unwrap().stable(), m.meta("later").unwrap().stable());
    assert_eq!(r.get("later").as_deref(), Some(&b"after sync"[..]));
}

fn full_resync_disk_based(p: Proto) {
    full_resync(p, &["--repl-diskless-sync", "no"], &[]);
}

fn full_resync_diskless(p: Proto) {
    full_resync(p, &["--repl-diskless-sync", "yes"], &[]);
}

fn full_resync_diskless_load_swapdb(p: Proto) {
    full_resync(p, &["--repl-diskless-sync", "yes"], &["--repl-diskless-load", "swapdb"]);
}

fn replicaof_command_replaces_replica_data(p: Proto) {
    let master = Server::start();
    let other = Server::start();
    let mut m = master.conn_proto(p);
    populate(&mut m);
    let mut r = other.conn_proto(p);
    // The future replica has entries of its own, which the sync must drop (and forget in STATS).
    r.set("mine", "replica's own", &["TAGS", "1", "own"]);
    r.ok(&cmd!("TIERCACHE.SET", "mine2", compressible(5000)));
    assert_eq!(r.stats().get("entries"), 2);
    r.ok(&cmd!("REPLICAOF", "127.0.0.1", master.port));
    other.wait_link_up();
    master.wait_replica_online(other.port);
    settle(&mut m);
    assert!(!r.exists("mine"), "replica kept its own data after the full sync");
    compare_master_replica(&mut m, &mut r);
    // Promote it back: it keeps the data and accepts writes.
    r.ok(&cmd!("REPLICAOF", "NO", "ONE"));
    r.set("own-again", "v", &[]);
    assert_eq!(r.stats().get("entries"), m.stats().get("entries") + 1);
}

fn live_overwrite_delete_ttl_changes(p: Proto) {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn_proto(p);
    let mut r = replica.conn_proto(p);
    let check = |m: &mut Conn, r: &mut Conn, key: &str| {
        wait_replicated(m);
        let mm = m.meta(key).map(|x| x.stable());
        assert_eq!(r.meta(key).map(|x| x.stable()), mm, "META {key} on replica");
        assert_eq!(r.get_encoded(key), m.get_encoded(key), "stored bytes of {key} on replica");
        let (mp, rp) = (m.pttl(key), r.pttl(key));
        if mp < 0 {
            assert_eq!(rp, mp, "PTTL {key}");
        } else {
            assert_near(rp, mp, 200, &format!("PTTL {key}"));
        }
    };
    m.ok(&cmd!("TIERCACHE.SET", "k", compressible(4000), "PX", 100000, "STALE", 30, "TAGS", 2, "a", "b"));
    check(&mut m, &mut r, "k");
    m.set("k", "small now", &["EX", "700"]);
    check(&mut m, &mut r, "k");
    m.set("k", "keep", &["PX", "9000", "KEEPTTL", "CREATED", "17"]);
    check(&mut m, &mut r, "k");
    assert_eq!(r.meta("k").unwrap().created_ms, 17);
    m.int(&cmd!("EXPIRE", "k", 300));
    check(&mut m, &mut r, "k");
    m.int(&cmd!("PERSIST", "k"));
    check(&mut m, &mut r, "k");
    m.ok(&cmd!("TIERCACHE.SET", "c", lz4_frame(b"client compressed"), "ENCODING", "lz4"));
    check(&mut m, &mut r, "c");
    m.ok(&cmd!("RENAME", "c", "c2"));
    check(&mut m, &mut r, "c2");
    m.int(&cmd!("COPY", "c2", "c3"));
    check(&mut m, &mut r, "c3");
    m.int(&cmd!("DEL", "k"));
    check(&mut m, &mut r, "k");
    assert!(!r.exists("k"));
    assert_eq!(aggregate_stats(&mut r), aggregate_stats(&mut m));
    m.ok(&cmd!("FLUSHALL"));
    wait_replicated(&mut m);
    assert_eq!(aggregate_stats(&mut r), vec![0, 0, 0, 0], "replica STATS after FLUSHALL");
}

fn stale_state_on_replica(p: Proto) {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn_proto(p);
    let mut r = replica.conn_proto(p);
    m.set("k", "v", &["PX", "300", "STALE", "5"]);
    wait_replicated(&mut m);
    let got = r.get("k");
    assert_eq!(
        got.as_deref(),
        Some(&b"v"[..]),
        "fresh on the replica right after WAIT: replica META {:?}, master META {:?}, now {}",
        r.meta("k"),
        m.meta("k"),
        now_ms()
    );
    assert_eq!(r.meta("k").unwrap().state, "fresh");
    sleep(ms(400));
    assert_eq!(r.get("k"), None, "stale on the replica too");
    let rm = r.meta("k").unwrap();
    assert_eq!(rm.state, "stale");
    assert_eq!(rm.fresh_ttl_ms, 0);
    assert_eq!(rm.stable(), m.meta("k").unwrap().stable());
}

#[test]
fn replica_refuses_writes_and_serves_reads() {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn();
    m.set("k", "v", &["TAGS", "1", "t"]);
    wait_replicated(&mut m);
    let mut r = replica.conn();
    let e = r.err(&cmd!("TIERCACHE.SET", "k", "other"));
    assert!(e.starts_with("READONLY"), "TIERCACHE.SET on a replica: {e}");
    let e = r.err(&cmd!("TIERCACHE.SET", "new", "other"));
    assert!(e.starts_with("READONLY"), "TIERCACHE.SET on a replica: {e}");
    assert!(!r.exists("new"));
    assert_eq!(r.get("k").as_deref(), Some(&b"v"[..]));
    assert_eq!(r.get_encoded("k"), Some(("raw".to_string(), b"v".to_vec())));
    assert_eq!(r.meta("k").unwrap().tags_str(), vec!["t"]);
    assert_eq!(r.stats().get("entries"), 1);
}

#[test]
fn replica_keeps_master_encoding_whatever_its_compress_min_size() {
    // Master compresses from 64 bytes, replica only from the default 1024.
    let master = Server::builder().module_args(&["compress-min-size", "64"]).start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn();
    let mut r = replica.conn();
    let v = compressible(200);
    m.ok(&cmd!("TIERCACHE.SET", "small-lz4", &v, "TAGS", 1, "t"));
    wait_replicated(&mut m);
    let mm = m.meta("small-lz4").unwrap();
    assert_eq!(mm.encoding, "lz4", "master compresses a 200-byte value with compress-min-size 64");
    assert_eq!(r.meta("small-lz4").map(|x| x.stable()), Some(mm.stable()), "replica must keep master's encoding");
    assert_eq!(r.get_encoded("small-lz4"), m.get_encoded("small-lz4"));
    assert_eq!(r.get("small-lz4"), Some(v));

    // And the other way round: master stores raw, replica would have compressed.
    let master2 = Server::start();
    let replica2 = master2.start_replica(Server::builder().module_args(&["compress-min-size", "0"]));
    let mut m2 = master2.conn();
    let mut r2 = replica2.conn();
    let v = compressible(500);
    m2.ok(&cmd!("TIERCACHE.SET", "k", &v));
    wait_replicated(&mut m2);
    assert_eq!(m2.meta("k").unwrap().encoding, "raw");
    assert_eq!(r2.meta("k").map(|x| x.stable()), m2.meta("k").map(|x| x.stable()));
    assert_eq!(r2.get_encoded("k"), Some(("raw".to_string(), v)));
}

#[test]
fn replica_keeps_all_tags_whatever_its_max_tags() {
    // The replica's own tiercache.max-tags (2) must not drop a replicated entry with 5 tags.
    let master = Server::start();
    let replica = master.start_replica(Server::builder().module_args(&["max-tags", "2"]));
    let mut m = master.conn();
    let mut r = replica.conn();
    assert_eq!(r.config_get("tiercache.max-tags"), "2");
    m.ok(&cmd!("TIERCACHE.SET", "tagged", "v", "TAGS", 5, "t1", "t2", "t3", "t4", "t5"));
    wait_replicated(&mut m);
    let mm = Some(m.meta("tagged").unwrap().stable());
    let live = r.meta("tagged").map(|x| x.stable());
    // Same through a full resync (RDB load is not limited by max-tags either).
    let late = master.start_replica(Server::builder().module_args(&["max-tags", "2"]));
    let synced = late.conn().meta("tagged").map(|x| x.stable());
    assert!(
        live == mm && synced == mm,
        "replica with max-tags 2 must hold the master's 5-tag entry\n master: {mm:?}\n live stream: {live:?}\n full sync: {synced:?}"
    );
}

#[test]
fn tracking_on_replica_invalidates_on_replicated_set() {
    let master = Server::start();
    let replica = master.start_replica(Server::builder());
    let mut m = master.conn();
    m.set("k", "v1", &[]);
    wait_replicated(&mut m);
    let mut t = replica.conn3();
    let (tx, rx) = std::sync::mpsc::channel();
    t.con.set_push_sender(tx);
    t.ok(&cmd!("CLIENT", "TRACKING", "ON"));
    assert_eq!(t.get("k").as_deref(), Some(&b"v1"[..]));
    m.set("k", "v2", &[]);
    wait_replicated(&mut m);
    t.run(&cmd!("PING"));
    let mut keys = Vec::new();
    while let Ok(push) = rx.try_recv() {
        if push.kind == redis::PushKind::Invalidate {
            if let Some(Value::Array(ks)) = push.data.first() {
                keys.extend(ks.iter().filter_map(as_bytes));
            }
        }
    }
    assert_eq!(keys, vec![b"k".to_vec()], "invalidation on the replica's tracking connection");
    assert_eq!(t.get("k").as_deref(), Some(&b"v2"[..]));
}

/// A master without replicas or AOF propagates its SETs verbatim (nobody reads the stream; see
/// src/propagation.rs). The effect form must be back before anything reaches a replica that syncs
/// (disk-based, and diskless after its delay, with a writer running all along) or an AOF turned on later.
/// The replica's own compress-min-size would store these values raw, and its clock would give other
/// creation times: META and the stored bytes tell which form arrived.
#[test]
fn effects_resume_when_a_replica_attaches_or_aof_starts() {
    let v = compressible(200);
    for master_args in [&["--repl-diskless-sync", "no"][..], &["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "1"]]
    {
        let master = Server::builder().module_args(&["compress-min-size", "64"]).args(master_args).start();
        let mut m = master.conn();
        m.set("first", &v, &["EX", "100"]);
        // The first poll (1 s after the first SET) finds no backlog and no replica: verbatim from then on.
        sleep(ms(1300));
        let url = master.url(Proto::Resp2);
        let value = v.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let writer = std::thread::spawn(move || {
            let mut c = redis::Client::open(url).unwrap().get_connection().unwrap();
            let mut n = 0;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) || n < 50 {
                let _: () =
                    cmd!("TIERCACHE.SET", format!("w:{n}"), &value, "EX", 100, "STALE", 5, "TAGS", 1, "t").query(&mut c).unwrap();
                n += 1;
                sleep(ms(2));
            }
            n
        });
        let replica = master.start_replica(Server::builder());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let written = writer.join().unwrap();
        m.set("after", &v, &["EX", "100", "TAGS", "1", "t"]);
        wait_replicated(&mut m);
        let mut r = replica.conn();
        let keys: Vec<String> =
            ["first".to_string(), "after".to_string()].into_iter().chain((0..written).map(|n| format!("w:{n}"))).collect();
        for k in &keys {
            let mm = m.meta(k).unwrap_or_else(|| panic!("{k} missing on the master"));
            assert_eq!(mm.encoding, "lz4", "{k}: the master compresses from 64 bytes");
            assert_eq!(r.meta(k).map(|x| x.stable()), Some(mm.stable()), "{k} ({master_args:?}): the replica got a verbatim SET");
            assert_eq!(r.get_encoded(k), m.get_encoded(k), "{k}: stored bytes");
        }
    }

    // AOF turned on at run time: what follows the rewrite is appended in effect form, so a restart with
    // another compress-min-size keeps the master's encoding and creation time.
    let mut s = Server::builder().module_args(&["compress-min-size", "64"]).start();
    let mut c = s.conn();
    c.set("first", &v, &["EX", "100"]);
    sleep(ms(1300));
    c.ok(&cmd!("CONFIG", "SET", "appendonly", "yes"));
    assert!(
        wait_until(READY_TIMEOUT, || info_field(&c.info("persistence"), "aof_rewrite_in_progress").as_deref() == Some("0")
            && info_field(&c.info("persistence"), "aof_rewrite_scheduled").as_deref() == Some("0")),
        "the AOF rewrite did not finish"
    );
    // The rewrite's fork counted as a listener for a while; wait for the poll to drop that, so only the
    // AOF flag itself keeps the effect form.
    sleep(ms(1300));
    c.set("appended", &v, &["EX", "100", "TAGS", "1", "t"]);
    let before = c.meta("appended").unwrap();
    assert_eq!(before.encoding, "lz4");
    drop(c);
    s.restart_with_args(&["--appendonly", "yes", "--tiercache.compress-min-size", "100000"]);
    let mut c = s.conn();
    assert_eq!(c.meta("appended").map(|x| x.stable()), Some(before.stable()), "the AOF got a verbatim SET");
}
