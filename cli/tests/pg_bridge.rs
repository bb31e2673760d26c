//! `tiercache pg install` + `tiercache pg bridge` against a real PostgreSQL (one cluster per test binary,
//! a fresh database per test) and a real module-enabled redis-server per test: rollbacks invalidate
//! nothing, an update invalidates its old and new rows' tags, re-installing updates the triggers, and no
//! committed change is lost when the bridge, Redis or PostgreSQL crash. The checker test runs a write and
//! read load (the Rust client's get_or_load) while it kills the bridge and Redis at random.

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;
#[path = "../../client/tests/common/pg.rs"]
mod pg;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::{wait_until, Proc, TempDir};
use tiercache_client::{Opts, TierCache};

const MAPPING: &str = r#"
[tables.users]
tags = ["user:{id}", "org:{org_id}"]
"#;

async fn setup_db(dsn: &str) -> tokio_postgres::Client {
    let c = pg::connect(dsn).await;
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, org_id int, name text, version bigint NOT NULL DEFAULT 0);
         INSERT INTO users (id, org_id, name) SELECT g, g % 10, 'u' || g FROM generate_series(1, 200) g;",
    )
    .await
    .expect("create users");
    c
}

fn write_map(dir: &TempDir, text: &str) -> String {
    let p = dir.path().join("tiercache.toml");
    std::fs::write(&p, text).expect("write mapping");
    p.display().to_string()
}

fn run_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(harness::bin()).args(args).output().expect("run tiercache");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn install(dsn: &str, map: &str) {
    let (ok, out) = run_cli(&["pg", "install", "--dsn", dsn, "--map", map]);
    assert!(ok, "pg install failed:\n{out}");
}

fn bridge(dir: &TempDir, name: &str, dsn: &str, map: &str, redis: &common::Server) -> Proc {
    bridge_with(dir, name, dsn, map, redis, &[])
}

fn bridge_with(dir: &TempDir, name: &str, dsn: &str, map: &str, redis: &common::Server, extra: &[&str]) -> Proc {
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let mut args = vec!["pg", "bridge", "--dsn", dsn, "--map", map, "--redis", &url];
    args.extend_from_slice(&["--backoff-min-ms", "20", "--backoff-max-ms", "200", "--recheck-ms", "200"]);
    args.extend_from_slice(extra);
    harness::tiercache(dir, name, &args)
}

/// The value of a sample line `name value` in an OpenMetrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

async fn outbox_len(c: &tokio_postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM tiercache.outbox", &[]).await.map(|r| r.get(0)).unwrap_or(-1)
}

/// Sets `key` live with `tags`.
fn cache(r: &mut common::Conn, key: &str, tags: &[&str]) {
    let n = tags.len().to_string();
    let mut opts = vec!["TAGS", n.as_str()];
    opts.extend_from_slice(tags);
    r.set(key, "v", &opts);
}

async fn gone(redis: &common::Server, key: &str) -> bool {
    let mut r = redis.conn();
    wait_until(Duration::from_secs(20), || {
        let alive = r.get(key).is_some();
        async move { !alive }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_invalidates_nothing_update_invalidates_old_and_new() {
    let (dsn, _guard) = pg::fresh_db("basic").await;
    let dir = TempDir::new("pg-basic");
    let db = setup_db(&dsn).await;
    let map = write_map(&dir, MAPPING);
    install(&dsn, &map);
    install(&dsn, &map); // idempotent
    let redis = common::Server::start();
    let mut r = redis.conn();
    for (k, t) in [("u1", "user:1"), ("u2", "user:2"), ("u3", "user:3"), ("u4", "user:4"), ("o1", "org:1"), ("o2", "org:2")] {
        cache(&mut r, k, &[t]);
    }
    let mut b = bridge(&dir, "bridge", &dsn, &map, &redis);

    // A rolled-back transaction leaves no outbox row and invalidates nothing; a later commit does.
    db.batch_execute("BEGIN; UPDATE users SET name = 'rolled back' WHERE id = 2; ROLLBACK;").await.unwrap();
    db.batch_execute("UPDATE users SET name = 'marker' WHERE id = 3").await.unwrap();
    assert!(gone(&redis, "u3").await, "the committed update of user 3 was not invalidated:\n{}", b.log_text());
    assert!(r.get("u2").is_some(), "a rolled-back update invalidated user:2");

    // Moving user 1 from org 1 to org 2 invalidates user:1, org:1 (old row) and org:2 (new row).
    db.batch_execute("UPDATE users SET org_id = 2 WHERE id = 1").await.unwrap();
    for k in ["u1", "o1", "o2"] {
        assert!(gone(&redis, k).await, "{k} not invalidated:\n{}", b.log_text());
    }
    // An update that changes nothing invalidates nothing; a DELETE invalidates the old row.
    db.batch_execute("UPDATE users SET name = name WHERE id = 4").await.unwrap();
    cache(&mut r, "u3", &["user:3"]);
    db.batch_execute("DELETE FROM users WHERE id = 3").await.unwrap();
    assert!(gone(&redis, "u3").await, "DELETE did not invalidate");
    assert!(r.get("u4").is_some(), "a no-op UPDATE invalidated user:4");
    assert!(wait_until(Duration::from_secs(20), || async { outbox_len(&db).await == 0 }).await, "outbox not drained");

    // Re-install with an edited mapping (a tag prefix, a new template): the trigger follows.
    let map = write_map(&dir, "tag_prefix = \"app/\"\n[tables.users]\ntags = [\"user:{id}\", \"name:{name}\"]\n");
    install(&dsn, &map);
    cache(&mut r, "p5", &["app/user:5"]);
    cache(&mut r, "n5", &["app/name:u5"]);
    cache(&mut r, "plain6", &["user:6"]);
    db.batch_execute("UPDATE users SET version = version + 1 WHERE id = 5").await.unwrap();
    assert!(gone(&redis, "p5").await && gone(&redis, "n5").await, "the re-installed trigger did not apply the new mapping");
    // Removing the table from the mapping removes its trigger: writes no longer reach the outbox.
    let map = write_map(&dir, "[tables]\n");
    install(&dsn, &map);
    db.batch_execute("UPDATE users SET version = version + 1 WHERE id = 6").await.unwrap();
    assert_eq!(outbox_len(&db).await, 0, "a table removed from the mapping still writes the outbox");
    assert!(r.get("plain6").is_some());
    b.assert_running();

    // Uninstall refuses while rows are pending, then removes everything.
    install(&dsn, &write_map(&dir, MAPPING));
    drop(b);
    db.batch_execute("UPDATE users SET version = version + 1 WHERE id = 7").await.unwrap();
    let (ok, out) = run_cli(&["pg", "uninstall", "--dsn", &dsn, "--map", &map]);
    assert!(!ok && out.contains("undelivered"), "uninstall with a pending row: {out}");
    let (ok, out) = run_cli(&["pg", "uninstall", "--dsn", &dsn, "--map", &map, "--force"]);
    assert!(ok, "{out}");
    let left: i64 =
        db.query_one("SELECT count(*) FROM pg_trigger WHERE tgname = 'tiercache_invalidate'", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    assert!(db.query_one("SELECT to_regnamespace('tiercache')::text", &[]).await.unwrap().get::<_, Option<String>>(0).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_rejects_unknown_columns() {
    let (dsn, _guard) = pg::fresh_db("badcol").await;
    let dir = TempDir::new("pg-badcol");
    setup_db(&dsn).await;
    let map = write_map(&dir, "[tables.users]\ntags = [\"user:{idd}\"]\n");
    let (ok, out) = run_cli(&["pg", "install", "--dsn", &dsn, "--map", &map]);
    assert!(!ok && out.contains("no column \"idd\""), "{out}");
    let map = write_map(&dir, "[tables.nope]\ntags = [\"x:{id}\"]\n");
    let (ok, out) = run_cli(&["pg", "install", "--dsn", &dsn, "--map", &map]);
    assert!(!ok && out.contains("does not exist"), "{out}");
    // A table whose trigger function name would pass PostgreSQL's 63-byte identifier limit, in its own
    // schema: installs, re-installs (idempotent) and writes the outbox.
    let long = "a_table_with_a_rather_long_name_of_55_characters_______";
    assert_eq!(long.len(), 55);
    let db = pg::connect(&dsn).await;
    db.batch_execute(&format!(
        "CREATE SCHEMA app; CREATE TABLE app.{long} (id int PRIMARY KEY); INSERT INTO app.{long} VALUES (1)"
    ))
    .await
    .unwrap();
    let map = write_map(&dir, &format!("[tables.\"app.{long}\"]\ntags = [\"t:{{id}}\"]\n"));
    install(&dsn, &map);
    install(&dsn, &map);
    db.batch_execute(&format!("UPDATE app.{long} SET id = 2")).await.unwrap();
    let tags: Vec<String> = db.query_one("SELECT tags FROM tiercache.outbox", &[]).await.unwrap().get(0);
    assert_eq!(tags, vec!["t:1".to_string(), "t:2".to_string()]);
}

/// Rows committed while the bridge is dead, and rows whose commit overtakes an earlier-id row of a
/// longer transaction, are all delivered by a restarted bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_killed_and_out_of_id_order_commits_lose_nothing() {
    let (dsn, _guard) = pg::fresh_db("killbridge").await;
    let dir = TempDir::new("pg-killbridge");
    let db = setup_db(&dsn).await;
    let map = write_map(&dir, MAPPING);
    install(&dsn, &map);
    let redis = common::Server::start();
    let mut r = redis.conn();
    let b = bridge(&dir, "bridge1", &dsn, &map, &redis);
    // A long transaction takes the smaller outbox id, a short one commits first with a larger id.
    let long = pg::connect(&dsn).await;
    long.batch_execute("BEGIN; UPDATE users SET version = version + 1 WHERE id = 10").await.unwrap();
    cache(&mut r, "u11", &["user:11"]);
    cache(&mut r, "u10", &["user:10"]);
    db.batch_execute("UPDATE users SET version = version + 1 WHERE id = 11").await.unwrap();
    assert!(gone(&redis, "u11").await);
    assert!(r.get("u10").is_some(), "an uncommitted change was invalidated");
    long.batch_execute("COMMIT").await.unwrap();
    assert!(gone(&redis, "u10").await, "a row that committed after a larger id was skipped");

    // The bridge deletes a row just after Redis acknowledged its INVALIDATE: wait for that, or a kill in
    // between leaves the u10 row to be delivered again (at-least-once) and the counts below off by one.
    assert!(wait_until(Duration::from_secs(20), || async { outbox_len(&db).await == 0 }).await, "outbox not drained");
    // SIGKILL the bridge; commit changes while none runs; a new bridge delivers them.
    drop(b);
    for id in 20..40 {
        cache(&mut r, &format!("u{id}"), &[&format!("user:{id}")]);
    }
    for id in 20..40 {
        db.execute("UPDATE users SET version = version + 1 WHERE id = $1", &[&id]).await.unwrap();
    }
    assert_eq!(outbox_len(&db).await, 20);
    let mport = harness::free_port();
    let listen = format!("127.0.0.1:{mport}");
    let mut b = bridge_with(&dir, "bridge2", &dsn, &map, &redis, &["--metrics-listen", &listen]);
    for id in 20..40 {
        assert!(gone(&redis, &format!("u{id}")).await, "u{id} lost across a bridge kill:\n{}", b.log_text());
    }
    assert!(wait_until(Duration::from_secs(20), || async { outbox_len(&db).await == 0 }).await);
    // The metrics: 20 rows delivered, each with a lag observation.
    let text = reqwest::get(format!("http://{listen}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(sample(&text, "tiercache_bridge_rows_total"), Some(20.0), "{text}");
    assert_eq!(sample(&text, "tiercache_bridge_lag_seconds_count"), Some(20.0), "{text}");
    assert!(sample(&text, "tiercache_bridge_invalidate_commands_total").unwrap_or(0.0) >= 1.0, "{text}");
    // A second bridge stands by while the first holds the lock.
    let b3 = bridge(&dir, "bridge3", &dsn, &map, &redis);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let l = b3.log_text();
            async move { l.contains("standing by") }
        })
        .await,
        "the second bridge did not stand by:\n{}",
        b3.log_text()
    );
    b.assert_running();
}

/// Redis killed (AOF, fsync always) while changes commit: the bridge retries until the restarted Redis
/// acknowledges, and the rows stay in the outbox meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_nothing() {
    let (dsn, _guard) = pg::fresh_db("killredis").await;
    let dir = TempDir::new("pg-killredis");
    let db = setup_db(&dsn).await;
    let map = write_map(&dir, MAPPING);
    install(&dsn, &map);
    let mut redis = common::Server::builder().args(&["--appendonly", "yes", "--appendfsync", "always"]).start();
    {
        let mut r = redis.conn();
        for id in 50..70 {
            cache(&mut r, &format!("u{id}"), &[&format!("user:{id}")]);
        }
    }
    let mut b = bridge(&dir, "bridge", &dsn, &map, &redis);
    redis.kill();
    for id in 50..70 {
        db.execute("UPDATE users SET version = version + 1 WHERE id = $1", &[&id]).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            let l = b.log_text();
            async move { l.contains("Redis:") }
        })
        .await
    );
    assert_eq!(outbox_len(&db).await, 20, "rows were deleted while Redis was down");
    redis.restart();
    for id in 50..70 {
        assert!(gone(&redis, &format!("u{id}")).await, "u{id} lost across a Redis crash:\n{}", b.log_text());
    }
    assert!(wait_until(Duration::from_secs(20), || async { outbox_len(&db).await == 0 }).await);
    b.assert_running();
}

/// PostgreSQL crashes (immediate stop): rows committed before the crash are delivered after it, and
/// the bridge reconnects and follows new commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_nothing() {
    let (dsn, _guard) = pg::fresh_db_exclusive("pgrestart").await;
    let dir = TempDir::new("pg-restart");
    let db = setup_db(&dsn).await;
    let map = write_map(&dir, MAPPING);
    install(&dsn, &map);
    let redis = common::Server::start();
    let mut r = redis.conn();
    for id in 80..100 {
        cache(&mut r, &format!("u{id}"), &[&format!("user:{id}")]);
    }
    // Committed while no bridge runs, then PostgreSQL crashes.
    for id in 80..90 {
        db.execute("UPDATE users SET version = version + 1 WHERE id = $1", &[&id]).await.unwrap();
    }
    let pg = pg::shared();
    pg.stop_immediate();
    let mut b = bridge(&dir, "bridge", &dsn, &map, &redis);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let l = b.log_text();
            async move { l.contains("reconnecting") }
        })
        .await
    );
    pg.start();
    for id in 80..90 {
        assert!(gone(&redis, &format!("u{id}")).await, "u{id} lost across a PostgreSQL crash:\n{}", b.log_text());
    }
    // A crash while the bridge listens: it reconnects and delivers the next commits.
    pg.stop_immediate();
    pg.start();
    let db = pg::connect_retry(&dsn).await;
    for id in 90..100 {
        db.execute("UPDATE users SET version = version + 1 WHERE id = $1", &[&id]).await.unwrap();
    }
    for id in 90..100 {
        assert!(gone(&redis, &format!("u{id}")).await, "u{id} not delivered after PostgreSQL restarted:\n{}", b.log_text());
    }
    b.assert_running();
}

/// A small deterministic PRNG (xorshift64*), seeded per task.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const USERS: i32 = 200;

/// The issue's checker: writers update users (some transactions roll back), readers read them through
/// the Rust client's get_or_load (user tag), and the bridge and Redis are SIGKILLed at random. After each
/// round the load stops and the outbox drains (that moment is "commit + bridge lag" for every change of
/// the round): then no entry in Redis may hold anything but its row's committed version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_random_kills_of_bridge_and_redis_serve_nothing_stale() {
    let (dsn, _guard) = pg::fresh_db("checker").await;
    let dir = TempDir::new("pg-checker");
    let db = setup_db(&dsn).await;
    let map = write_map(&dir, MAPPING);
    install(&dsn, &map);
    let mut redis = common::Server::builder().args(&["--appendonly", "yes", "--appendfsync", "always"]).start();
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let mut b = Some(bridge(&dir, "bridge0", &dsn, &map, &redis));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut checked_live = 0usize;
    let mut kills = (0, 0);
    for round in 0..4 {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..2u64 {
            let (dsn, stop) = (dsn.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let c = pg::connect(&dsn).await;
                let mut rng = Rng(round * 100 + w + 1);
                while !stop.load(Ordering::Relaxed) {
                    let id = 1 + rng.below(USERS as u64) as i32;
                    let org = rng.below(10) as i32;
                    let rollback = rng.below(10) == 0;
                    let sql = format!(
                        "BEGIN; UPDATE users SET version = version + 1, org_id = {org} WHERE id = {id}; {}",
                        if rollback { "ROLLBACK" } else { "COMMIT" }
                    );
                    if c.batch_execute(&sql).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        for rd in 0..2u64 {
            let (dsn, stop, url) = (dsn.clone(), stop.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let Ok(cache) = TierCache::builder(url).namespace("chk").build().await else { return };
                let c = Arc::new(pg::connect(&dsn).await);
                let mut rng = Rng(round * 100 + rd + 50);
                while !stop.load(Ordering::Relaxed) {
                    let id = 1 + rng.below(USERS as u64) as i32;
                    let c = c.clone();
                    let opts = Opts::default().ttl(Duration::from_secs(600)).tag(format!("user:{id}"));
                    let _ = cache
                        .get_or_load(&format!("user:{id}"), &opts, move || async move {
                            c.query_one("SELECT version FROM users WHERE id = $1", &[&id]).await.map(|r| r.get::<_, i64>(0))
                        })
                        .await;
                }
            }));
        }
        // Let the load run, killing the bridge or Redis at a random moment.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(500))).await;
        if rng.below(2) == 0 {
            kills.0 += 1;
            drop(b.take());
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            b = Some(bridge(&dir, &format!("bridge{}", round + 1), &dsn, &map, &redis));
        } else {
            kills.1 += 1;
            redis.kill();
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            redis.restart();
        }
        tokio::time::sleep(Duration::from_millis(300 + rng.below(500))).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        // Commit + bridge lag: every change of the round is delivered once the outbox is empty.
        assert!(
            wait_until(Duration::from_secs(60), || async { outbox_len(&db).await == 0 }).await,
            "outbox not drained after round {round}:\n{}",
            b.as_ref().map(|b| b.log_text()).unwrap_or_default()
        );
        let cache = TierCache::builder(url.clone()).namespace("chk").build().await.expect("client");
        let mut r = redis.conn();
        for row in db.query("SELECT id, version FROM users", &[]).await.unwrap() {
            let (id, version): (i32, i64) = (row.get(0), row.get(1));
            let key = cache.redis_key(&format!("user:{id}"));
            if let Some(raw) = r.get(key.as_str()) {
                let served: i64 = rmp_serde_decode(&raw);
                assert_eq!(served, version, "round {round}: user {id} served version {served} after its row committed {version}");
                checked_live += 1;
            }
        }
    }
    assert!(checked_live > 50, "the checker saw only {checked_live} live entries: it checked nothing");
    assert!(kills.0 + kills.1 == 4);
    if let Some(b) = b.as_mut() {
        b.assert_running();
    }
}

/// The client stores an i64 as a MessagePack integer.
fn rmp_serde_decode(raw: &[u8]) -> i64 {
    let v = rmpv::decode::read_value(&mut &raw[..]).expect("MessagePack");
    v.as_i64().expect("an integer")
}
