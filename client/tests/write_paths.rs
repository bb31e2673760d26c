//! Write-through, invalidations applied after a database commit, and the write-behind accept path,
//! against a real module-enabled redis-server and a real PostgreSQL (one per test binary,
//! `common/pg.rs`; each test has a database of its own).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "common/pg.rs"]
mod pg;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tiercache_client::{Error, Opts, TierCache, TxError};
use tokio::sync::Notify;

fn opts() -> Opts {
    Opts::default().ttl(Duration::from_secs(60)).tag("team:7")
}

async fn cache(server: &common::Server) -> TierCache {
    TierCache::builder(format!("redis://127.0.0.1:{}/", server.port)).namespace("wp").build().await.unwrap()
}

/// MessagePack of a string, as the client stores a `String`.
fn msgpack_str(s: &str) -> Vec<u8> {
    let mut v = Vec::new();
    rmpv::encode::write_value(&mut v, &rmpv::Value::from(s)).unwrap();
    v
}

/// `users(id, name)` with row 1 = `name`.
async fn users_db(name: &str, initial: &str) -> Arc<tokio_postgres::Client> {
    let dsn = pg::database(name).await;
    let db = pg::connect(&dsn).await;
    db.batch_execute("DROP TABLE IF EXISTS users; CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL)").await.unwrap();
    db.execute("INSERT INTO users VALUES (1, $1)", &[&initial]).await.unwrap();
    Arc::new(db)
}

async fn row(db: &tokio_postgres::Client) -> String {
    db.query_one("SELECT name FROM users WHERE id = 1", &[]).await.unwrap().get(0)
}

/// A loader reading row 1, counting its runs.
fn loader(
    db: Arc<tokio_postgres::Client>,
    runs: Arc<AtomicU32>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, tokio_postgres::Error>> + Send>> + Send + 'static
{
    move || {
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            let r = db.query_one("SELECT name FROM users WHERE id = 1", &[]).await?;
            Ok(r.get(0))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_writes_the_database_then_the_cache() {
    let server = common::Server::start();
    let db = users_db("wt_basic", "v1").await;
    let (a, b) = (cache(&server).await, cache(&server).await);
    let runs = Arc::new(AtomicU32::new(0));
    assert_eq!(b.get_or_load("user:1", &opts(), loader(db.clone(), runs.clone())).await.unwrap(), "v1");

    let d = db.clone();
    let n = a
        .write_through("user:1", &"v2".to_string(), &opts(), || async move {
            d.execute("UPDATE users SET name = 'v2' WHERE id = 1", &[]).await
        })
        .await
        .unwrap();
    assert_eq!(n, 1, "write_through returns the database write's output");
    assert_eq!(row(&db).await, "v2");
    // Redis holds the new value, filled through the writer's lease (the module counts no fence).
    assert_eq!(server.conn().get(a.redis_key("user:1")), Some(msgpack_str("v2")));
    assert_eq!(a.metrics().fenced, 0);
    // The other instance dropped its L1 copy (key tracking) and reads v2 without a load.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(b.get_or_load("user:1", &opts(), loader(db.clone(), runs.clone())).await.unwrap(), "v2");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the second read is a hit");
    // The writer itself reads from L1.
    assert_eq!(a.get::<String>("user:1").await.unwrap().as_deref(), Some("v2"));
    assert_eq!(a.metrics().l1_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_caches_nothing() {
    let server = common::Server::start();
    let db = users_db("wt_error", "v1").await;
    let a = cache(&server).await;
    a.set("user:1", &"v1".to_string(), &opts()).await.unwrap();
    let d = db.clone();
    // A primary-key violation: the database refuses the write.
    let r = a
        .write_through("user:1", &"v2".to_string(), &opts(), || async move {
            d.execute("INSERT INTO users VALUES (1, 'v2')", &[]).await
        })
        .await;
    match r {
        Err(Error::Load(e)) => assert!(format!("{e:?}").contains("duplicate key"), "{e:?}"),
        other => panic!("expected the database error, got {other:?}"),
    }
    assert_eq!(row(&db).await, "v1");
    assert_eq!(server.conn().get(a.redis_key("user:1")), None, "v2 must not be cached");
    assert_eq!(a.get::<String>("user:1").await.unwrap(), None);
    // No lease is left behind: the next read loads at once.
    let runs = Arc::new(AtomicU32::new(0));
    assert_eq!(a.get_or_load("user:1", &opts(), loader(db.clone(), runs.clone())).await.unwrap(), "v1");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(server.conn().stats().get("leases"), 0);
}

/// A loader holding the key's lease read the old row, the write-through commits and updates the
/// cache, then the loader fills: its fill is fenced and the old value is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_fill_after_the_write_is_fenced() {
    let server = common::Server::start();
    let db = users_db("wt_race", "v1").await;
    let (a, b) = (cache(&server).await, cache(&server).await);
    let (started, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let paused = {
        let (db, started, resume) = (db.clone(), started.clone(), resume.clone());
        move || async move {
            let v: String = db.query_one("SELECT name FROM users WHERE id = 1", &[]).await?.get(0);
            started.notify_one();
            resume.notified().await;
            Ok::<_, tokio_postgres::Error>(v)
        }
    };
    let o = opts();
    let reader = a.get_or_load("user:1", &o, paused);
    let writer = async {
        started.notified().await;
        let d = db.clone();
        b.write_through("user:1", &"v2".to_string(), &opts(), || async move {
            d.execute("UPDATE users SET name = 'v2' WHERE id = 1", &[]).await
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        resume.notify_one();
    };
    let (first, ()) = tokio::join!(reader, writer);
    assert_eq!(first.unwrap(), "v1", "the racing caller gets what its loader read");
    assert_eq!(a.metrics().fenced, 1, "the older fill was fenced");
    let raw = server.conn().get(a.redis_key("user:1"));
    assert_ne!(raw, Some(msgpack_str("v1")), "Redis must not hold the older value");
    for c in [&a, &b] {
        let runs = Arc::new(AtomicU32::new(0));
        assert_eq!(c.get_or_load("user:1", &opts(), loader(db.clone(), runs)).await.unwrap(), "v2");
    }
}

/// Readers that miss while a write-through is in its database write wait in Redis for its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_during_the_write_receive_the_new_value() {
    let server = common::Server::start();
    let db = users_db("wt_wait", "v1").await;
    let (a, b) = (cache(&server).await, cache(&server).await);
    let (in_write, resume) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (v2, o) = ("v2".to_string(), opts());
    let writer = {
        let (db, in_write, resume) = (db.clone(), in_write.clone(), resume.clone());
        a.write_through("user:1", &v2, &o, move || async move {
            let n = db.execute("UPDATE users SET name = 'v2' WHERE id = 1", &[]).await;
            in_write.notify_one();
            resume.notified().await;
            n
        })
    };
    let runs = Arc::new(AtomicU32::new(0));
    let reader = async {
        in_write.notified().await;
        let r = b.get_or_load("user:1", &o, loader(db.clone(), runs.clone()));
        let release = async {
            // The reader is parked on the writer's lease.
            for _ in 0..200 {
                if server.conn().stats().get("lease_waiters") == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(server.conn().stats().get("lease_waiters"), 1);
            resume.notify_one();
        };
        let (r, ()) = tokio::join!(r, release);
        r
    };
    let (w, r) = tokio::join!(writer, reader);
    w.unwrap();
    assert_eq!(r.unwrap(), "v2");
    assert_eq!(runs.load(Ordering::SeqCst), 0, "the parked reader got the writer's value, no load");
}

/// Writer A commits v2 but is slow to return (its cache step comes later); writer B commits v3 and
/// updates the cache meanwhile. A's cache step must not put v2 over v3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_cache_step_of_an_earlier_commit_loses() {
    let server = common::Server::start();
    let db = users_db("wt_late", "v1").await;
    let (a, b) = (cache(&server).await, cache(&server).await);
    let (committed, b_done) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (v2, o) = ("v2".to_string(), opts());
    let slow = {
        let (db, committed, b_done) = (db.clone(), committed.clone(), b_done.clone());
        a.write_through("user:1", &v2, &o, move || async move {
            let n = db.execute("UPDATE users SET name = 'v2' WHERE id = 1", &[]).await;
            committed.notify_one();
            b_done.notified().await;
            n
        })
    };
    let fast = async {
        committed.notified().await;
        let d = db.clone();
        b.write_through("user:1", &"v3".to_string(), &opts(), || async move {
            d.execute("UPDATE users SET name = 'v3' WHERE id = 1", &[]).await
        })
        .await
        .unwrap();
        b_done.notify_one();
    };
    let (r, ()) = tokio::join!(slow, fast);
    r.unwrap();
    assert_eq!(row(&db).await, "v3");
    let raw = server.conn().get(a.redis_key("user:1"));
    assert!(
        raw.is_none() || raw == Some(msgpack_str("v3")),
        "Redis holds {:?}",
        raw.map(|r| String::from_utf8_lossy(&r).into_owned())
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    for c in [&a, &b] {
        assert_eq!(c.get_or_load("user:1", &opts(), loader(db.clone(), Arc::new(AtomicU32::new(0)))).await.unwrap(), "v3");
    }
}

/// Two instances, four writers each, one key: whatever the interleaving, the cache ends with the last
/// committed value or no entry, never an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_leave_an_older_value() {
    let server = common::Server::start();
    let dsn = pg::database("wt_concurrent").await;
    let setup = pg::connect(&dsn).await;
    setup.batch_execute("DROP TABLE IF EXISTS users; CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL); INSERT INTO users VALUES (1, 'w-0-0')").await.unwrap();
    let caches = [cache(&server).await, cache(&server).await];
    for round in 0..5 {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let c = caches[w % 2].clone();
            let dsn = dsn.clone();
            tasks.push(tokio::spawn(async move {
                let db = Arc::new(pg::connect(&dsn).await);
                for i in 0..10 {
                    let v = format!("w-{w}-{round}-{i}");
                    let (d, v2) = (db.clone(), v.clone());
                    c.write_through("user:1", &v, &opts(), || async move {
                        d.execute("UPDATE users SET name = $1 WHERE id = 1", &[&v2]).await
                    })
                    .await
                    .unwrap();
                    // Readers in between, with loads racing the writers.
                    let d = db.clone();
                    let _ = c
                        .get_or_load("user:1", &opts(), move || async move {
                            let r = d.query_one("SELECT name FROM users WHERE id = 1", &[]).await?;
                            Ok::<String, tokio_postgres::Error>(r.get(0))
                        })
                        .await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let committed = row(&setup).await;
        let raw = server.conn().get(caches[0].redis_key("user:1"));
        assert!(
            raw.is_none() || raw == Some(msgpack_str(&committed)),
            "round {round}: Redis holds {:?}, the database {committed}",
            raw.map(|r| String::from_utf8_lossy(&r).into_owned())
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        for c in &caches {
            let d = Arc::new(pg::connect(&dsn).await);
            let got = c.get_or_load("user:1", &opts(), loader(d, Arc::new(AtomicU32::new(0)))).await.unwrap();
            assert_eq!(got, committed, "round {round}: a reader after the writes");
        }
    }
}

/// Prepares `users` rows 1 and 2 and caches them (row 1 tagged team:7, row 2 by key only).
async fn tx_setup(name: &str, server: &common::Server) -> (TierCache, String) {
    let dsn = pg::database(name).await;
    let db = pg::connect(&dsn).await;
    db.batch_execute(
        "DROP TABLE IF EXISTS users; CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO users VALUES (1, 'a1'), (2, 'b1')",
    )
    .await
    .unwrap();
    let c = cache(server).await;
    c.set("user:1", &"a1".to_string(), &opts()).await.unwrap();
    c.set("user:2", &"b1".to_string(), &Opts::default()).await.unwrap();
    (c, dsn)
}

fn cached(server: &common::Server, c: &TierCache, key: &str) -> Option<Vec<u8>> {
    server.conn().get(c.redis_key(key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_invalidations_apply_after_commit_only() {
    let server = common::Server::start();
    let (c, dsn) = tx_setup("tx_commit", &server).await;
    let mut db = pg::connect(&dsn).await;
    let mut tx = c.tx_invalidations(db.transaction().await.unwrap());
    tx.execute("UPDATE users SET name = 'a2' WHERE id = 1", &[]).await.unwrap();
    tx.execute("UPDATE users SET name = 'b2' WHERE id = 2", &[]).await.unwrap();
    tx.tag("team:7").key("user:2");
    assert_eq!(tx.pending().0, ["user:2".to_string()]);
    // Before the commit nothing is invalidated: readers still get the committed (old) rows' values.
    assert_eq!(cached(&server, &c, "user:1"), Some(msgpack_str("a1")));
    assert_eq!(cached(&server, &c, "user:2"), Some(msgpack_str("b1")));
    tx.commit_with(|t| t.commit()).await.unwrap();
    assert_eq!(cached(&server, &c, "user:1"), None);
    assert_eq!(cached(&server, &c, "user:2"), None);
    assert_eq!(c.get::<String>("user:1").await.unwrap(), None, "L1 dropped too");
    let d = Arc::new(pg::connect(&dsn).await);
    assert_eq!(c.get_or_load("user:1", &opts(), loader(d, Arc::new(AtomicU32::new(0)))).await.unwrap(), "a2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_invalidations_are_dropped_on_rollback_and_failed_commit() {
    let server = common::Server::start();
    let (c, dsn) = tx_setup("tx_rollback", &server).await;
    let mut db = pg::connect(&dsn).await;

    // Explicit rollback.
    let mut tx = c.tx_invalidations(db.transaction().await.unwrap());
    tx.execute("UPDATE users SET name = 'a2' WHERE id = 1", &[]).await.unwrap();
    tx.tag("team:7").key("user:2");
    tx.rollback_with(|t| t.rollback()).await.unwrap();
    assert_eq!(cached(&server, &c, "user:1"), Some(msgpack_str("a1")));
    assert_eq!(cached(&server, &c, "user:2"), Some(msgpack_str("b1")));

    // Dropped (an early return): the transaction rolls back, nothing is invalidated.
    {
        let mut tx = c.tx_invalidations(db.transaction().await.unwrap());
        tx.execute("UPDATE users SET name = 'a3' WHERE id = 1", &[]).await.unwrap();
        tx.tag("team:7");
    }
    assert_eq!(cached(&server, &c, "user:1"), Some(msgpack_str("a1")));

    // A commit the database refuses (a deferred check fails at COMMIT): nothing is invalidated.
    db.batch_execute(
        "CREATE TABLE teams (id int PRIMARY KEY);
         CREATE TABLE members (user_id int, team_id int REFERENCES teams (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}"));
    let mut tx = c.tx_invalidations(db.transaction().await.unwrap());
    tx.execute("INSERT INTO members VALUES (1, 99)", &[]).await.unwrap();
    tx.tag("team:7").key("user:2");
    match tx.commit_with(|t| t.commit()).await {
        Err(TxError::Commit(e)) => assert!(format!("{e:?}").contains("foreign key"), "{e:?}"),
        other => panic!("expected a failed commit, got {:?}", other.map(|_| ())),
    }
    assert_eq!(cached(&server, &c, "user:1"), Some(msgpack_str("a1")));
    assert_eq!(cached(&server, &c, "user:2"), Some(msgpack_str("b1")));
    assert_eq!(
        pg::connect(&dsn).await.query_one("SELECT name FROM users WHERE id = 1", &[]).await.unwrap().get::<_, String>(0),
        "a1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_accepts_into_the_stream_and_updates_the_cache() {
    let server = common::Server::start();
    let (a, b) = (cache(&server).await, cache(&server).await);
    b.set("user:9", &"old".to_string(), &opts()).await.unwrap();
    assert_eq!(b.get::<String>("user:9").await.unwrap().as_deref(), Some("old"));
    let acc = a.write_behind("user:9", &"new".to_string(), &opts(), Some("req-1")).await.unwrap();
    assert!(acc.new);
    // Readers see the write at once: Redis, the writer's L1 and (after its push) the other's.
    assert_eq!(server.conn().get(a.redis_key("user:9")), Some(msgpack_str("new")));
    assert_eq!(a.get::<String>("user:9").await.unwrap().as_deref(), Some("new"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(b.get::<String>("user:9").await.unwrap().as_deref(), Some("new"));

    // The message: in the key's stream, with its fields.
    let stream = tiercache_client::write_behind_stream("wp", tiercache_client::write_behind_shard("user:9"));
    let mut conn = server.conn();
    let entries = conn.run(&common_cmd(&["XRANGE", &stream, "-", "+"]));
    let text = format!("{entries:?}");
    assert_eq!(conn.int(&common_cmd(&["XLEN", &stream])), 1);
    for needle in ["user:9", "\"new\"", "req-1", &acc.stream_id] {
        assert!(text.contains(&needle.replace('"', "\\\"")) || text.contains(needle), "{needle} not in {text}");
    }

    // The same idempotency id again (a retry): not queued, not cached again.
    a.set("user:9", &"newer".to_string(), &opts()).await.unwrap();
    let again = a.write_behind("user:9", &"new".to_string(), &opts(), Some("req-1")).await.unwrap();
    assert_eq!(again, tiercache_client::Accepted { stream_id: acc.stream_id.clone(), new: false });
    assert_eq!(conn.int(&common_cmd(&["XLEN", &stream])), 1);
    assert_eq!(server.conn().get(a.redis_key("user:9")), Some(msgpack_str("newer")));

    // A delete: queued with op del, the entry gone at once.
    let del = a.write_behind_delete("user:9", None).await.unwrap();
    assert!(del.new && del.stream_id > acc.stream_id);
    assert_eq!(conn.int(&common_cmd(&["XLEN", &stream])), 2);
    assert_eq!(server.conn().get(a.redis_key("user:9")), None);
    assert_eq!(a.get::<String>("user:9").await.unwrap(), None);
}

fn common_cmd(parts: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(parts[0]);
    for p in &parts[1..] {
        c.arg(*p);
    }
    c
}
