//! `tiercache warm` against a real PostgreSQL (one cluster per test binary, a database per test) and
//! SQLite, into a real module-enabled redis-server: the shipped examples/cache_warming.sql loads
//! entries the Rust client reads (lz4 included) with their tags; existing entries are skipped; a newer
//! write or an invalidation that lands between the warmer's lease and its fill wins; an interrupted run
//! resumes from its state file.

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;
#[path = "../../client/tests/common/pg.rs"]
mod pg;

use std::process::Command;
use std::time::Duration;

use harness::{wait_until, TempDir};
use serde::{Deserialize, Serialize};
use tiercache_client::{Opts, TierCache};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: i32,
    org_id: Option<i32>,
    name: String,
    email: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Product {
    id: i32,
    category_id: i32,
    description: Option<String>,
    price_cents: i64,
    views: i64,
}

async fn fixture_db(what: &str) -> (String, tokio_postgres::Client, tokio::sync::RwLockReadGuard<'static, ()>) {
    let (dsn, guard) = pg::fresh_db(what).await;
    let c = pg::connect(&dsn).await;
    let sql = std::fs::read_to_string(harness::repo_root().join("cli/tests/fixtures/warm_pg.sql")).expect("fixture");
    c.batch_execute(&sql).await.expect("load the fixture");
    (dsn, c, guard)
}

fn warm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(harness::bin()).arg("warm").args(args).output().expect("run tiercache warm");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// (loaded, skipped, errors) of the summary line.
fn summary(stdout: &str) -> (u64, u64, u64) {
    let line = stdout.lines().find(|l| l.starts_with("warm: loaded")).unwrap_or_else(|| panic!("no summary in {stdout:?}"));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .filter(|s| !s.is_empty() && !s.contains('.'))
        .map(|s| s.parse().unwrap())
        .collect();
    (n[0], n[1], n[2])
}

fn example() -> String {
    harness::repo_root().join("examples/cache_warming.sql").display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_file_loads_what_the_client_reads_and_skips_existing_entries() {
    let (dsn, db, _guard) = fixture_db("example").await;
    let dir = TempDir::new("warm-example");
    let redis = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let cache = TierCache::builder(url.clone()).build().await.unwrap();
    // An entry the application already wrote: the warmer must leave it alone.
    let mine = User { id: 1, org_id: Some(1), name: "written by the app".into(), email: None };
    cache.set("user:1", &mine, &Opts::default().tag("user:1")).await.unwrap();

    let state = dir.path().join("state.json").display().to_string();
    let (ok, out, err) =
        warm(&["--dsn", &dsn, "--file", &example(), "--redis", &url, "--state", &state, "--concurrency", "3", "--batch", "7"]);
    assert!(ok, "{out}\n{err}");
    // 40 hot users and 30 viewed products; user 1 already cached.
    assert_eq!(summary(&out), (69, 1, 0), "{out}\n{err}");
    assert!(err.contains("hot_users: 40/40 keys"), "plain log lines without a terminal:\n{err}");
    assert!(!std::path::Path::new(&state).exists(), "the state file stays after a complete run");

    let reader = TierCache::builder(url.clone()).build().await.unwrap();
    assert_eq!(reader.get::<User>("user:1").await.unwrap(), Some(mine));
    let u14: User = reader.get("user:14").await.unwrap().expect("user 14 warmed");
    assert_eq!(u14, User { id: 14, org_id: Some(4), name: "user 14".into(), email: None });
    assert_eq!(reader.get::<User>("user:41").await.unwrap(), None, "a user inactive today was warmed");
    let p7: Product = reader.get("product:7").await.unwrap().expect("product 7 warmed");
    assert_eq!((p7.id, p7.category_id, p7.price_cents), (7, 3, 700));
    assert!(p7.views > 0 && p7.description.unwrap().len() > 1024);
    let mut r = redis.conn();
    let (encoding, _) = r.get_encoded("app:v1:product:7").expect("product 7 in Redis");
    assert_eq!(encoding, "lz4", "a large value is lz4-framed like the client frames it");
    // The tags of the annotation (and the client's namespace tag) are on the entries.
    assert_eq!(r.int(&cmd!("TIERCACHE.INVALIDATE", "org:2")), 8, "users 2, 7, ..., 37 carry org:2");
    assert!(r.get("app:v1:user:12").is_none());
    assert!(r.get("app:v1:user:13").is_some());
    reader.flush_namespace().await.unwrap();
    assert!(r.get("app:v1:user:13").is_none(), "warmed entries lack the namespace tag");
    drop(db);
}

/// The race: the warmer holds its leases and is reading the rows again (held at a gate in the query)
/// when the application writes user 1 in the cache and commits a change of user 2 (invalidating its
/// tag, as the pg bridge does). Both fills are fenced: the newer write and the invalidation win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_or_invalidation_between_lease_and_fill_wins() {
    let (dsn, db, _guard) = fixture_db("race").await;
    let dir = TempDir::new("warm-race");
    db.batch_execute(
        "CREATE TABLE calls (n int NOT NULL); INSERT INTO calls VALUES (0);
         CREATE FUNCTION gate() RETURNS bool LANGUAGE plpgsql AS $$
         DECLARE k int;
         BEGIN
           UPDATE calls SET n = n + 1 RETURNING n INTO k;
           IF k >= 2 THEN PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242); END IF;
           RETURN true;
         END $$;",
    )
    .await
    .unwrap();
    let file = dir.path().join("race.sql");
    std::fs::write(&file, "-- tiercache: name=u key=user:{id} tags=user:{id}\nSELECT id, org_id, name, email FROM users WHERE id <= 5 AND (SELECT gate());\n").unwrap();
    let redis = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let gatekeeper = pg::connect(&dsn).await;
    gatekeeper.batch_execute("SELECT pg_advisory_lock(4242)").await.unwrap();
    let (file_s, dsn2, url2) = (file.display().to_string(), dsn.clone(), url.clone());
    let run = tokio::task::spawn_blocking(move || warm(&["--dsn", &dsn2, "--file", &file_s, "--redis", &url2, "--restart"]));
    // Wait until the second (filtered) read is blocked at the gate: the leases are held by then.
    assert!(
        wait_until(Duration::from_secs(30), || {
            let db = &db;
            async move {
                db.query_one("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted", &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) > 0)
                    .unwrap_or(false)
            }
        })
        .await,
        "the warmer never reached its second read"
    );
    let app = TierCache::builder(url.clone()).build().await.unwrap();
    let newer = User { id: 1, org_id: None, name: "newer".into(), email: None };
    app.set("user:1", &newer, &Opts::default().tag("user:1")).await.unwrap();
    db.batch_execute("UPDATE users SET name = 'renamed' WHERE id = 2").await.unwrap();
    app.invalidate_tags(&["user:2"]).await.unwrap();
    gatekeeper.batch_execute("SELECT pg_advisory_unlock(4242)").await.unwrap();
    let (ok, out, err) = run.await.unwrap();
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out), (3, 2, 0), "{out}\n{err}");
    let reader = TierCache::builder(url).build().await.unwrap();
    assert_eq!(reader.get::<User>("user:1").await.unwrap(), Some(newer), "the warmer overwrote a newer write");
    assert_eq!(reader.get::<User>("user:2").await.unwrap(), None, "a fill fenced by the invalidation was stored");
    assert_eq!(reader.get::<User>("user:3").await.unwrap().map(|u| u.name), Some("user 3".into()));
}

/// An interrupted run (SIGKILL, rate-limited so it is still running) resumes from its state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_resumes() {
    let (dsn, _db, _guard) = fixture_db("resume").await;
    let dir = TempDir::new("warm-resume");
    let file = dir.path().join("all.sql");
    std::fs::write(&file, "-- tiercache: name=all key=user:{id} tags=user:{id}\nSELECT id, name FROM users;\n").unwrap();
    let state = dir.path().join("state.json");
    let redis = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let file_s = file.display().to_string();
    let state_s = state.display().to_string();
    let args =
        ["warm", "--dsn", &dsn, "--file", &file_s, "--redis", &url, "--state", &state_s, "--batch", "5", "--concurrency", "1"];
    let mut first = harness::Proc::spawn(
        "warm1",
        Command::new(harness::bin()).args(args).args(["--rate", "50"]),
        dir.path().join("warm1.log"),
    );
    let done_at_kill = {
        let state = state.clone();
        assert!(
            wait_until(Duration::from_secs(30), || {
                let s = std::fs::read_to_string(&state).unwrap_or_default();
                async move { s.contains("\"all\":") && !s.contains("\"all\":0") }
            })
            .await,
            "no progress in the state file:\n{}",
            first.log_text()
        );
        first.assert_running();
        drop(first); // SIGKILL
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
        s["done"]["all"].as_u64().unwrap()
    };
    assert!(done_at_kill > 0 && done_at_kill < 100, "killed after {done_at_kill} keys");
    let out = Command::new(harness::bin()).args(args).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("resuming after {done_at_kill} of 100 keys")), "{stderr}");
    let (loaded, skipped, errors) = summary(&stdout);
    // Keys of batches finished but not yet recorded when killed are skipped (already cached), not reloaded.
    assert_eq!((loaded + skipped, errors), (100 - done_at_kill, 0), "{stdout}");
    let mut r = redis.conn();
    for id in 1..=100 {
        assert!(r.get(format!("app:v1:user:{id}")).is_some(), "user {id} missing after the resumed run");
    }
    assert!(!state.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warms_from_sqlite() {
    let dir = TempDir::new("warm-sqlite");
    let path = dir.path().join("app.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, org_id INTEGER, name TEXT NOT NULL, email TEXT, hits INTEGER);
             INSERT INTO users VALUES (1, 1, 'ann', 'ann@example.com', 9), (2, NULL, 'bob', NULL, 5), (3, 1, 'cid', NULL, 0);",
        )
        .unwrap();
    }
    let file = dir.path().join("warm.sql");
    std::fs::write(
        &file,
        "-- tiercache: key=user:{id} tags=user:{id},org:{org_id} ttl=60\nSELECT id, org_id, name, email FROM users WHERE hits > 0 ORDER BY hits DESC;\n",
    )
    .unwrap();
    let redis = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    let (ok, out, err) = warm(&["--sqlite", &path.display().to_string(), "--file", &file.display().to_string(), "--redis", &url]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(summary(&out), (2, 0, 0));
    let reader = TierCache::builder(url).build().await.unwrap();
    assert_eq!(reader.get::<User>("user:2").await.unwrap(), Some(User { id: 2, org_id: None, name: "bob".into(), email: None }));
    assert!(reader.get::<User>("user:3").await.unwrap().is_none());
    let mut r = redis.conn();
    assert_eq!(r.int(&cmd!("TIERCACHE.INVALIDATE", "org:1")), 1, "user 1 carries org:1; user 2 (NULL org) no org tag");
    assert!(r.pttl("app:v1:user:2") <= 60_000);
}

/// On a terminal (a pty from `script`), a progress bar instead of log lines; `--rate` still completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_bar_on_a_terminal() {
    let dir = TempDir::new("warm-tty");
    let path = dir.path().join("app.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY); WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 30) INSERT INTO t SELECT n FROM g;")
            .unwrap();
    }
    let file = dir.path().join("warm.sql");
    std::fs::write(&file, "-- tiercache: name=ids key=t:{id}\nSELECT id FROM t;\n").unwrap();
    let redis = common::Server::start();
    let line = format!(
        "{} warm --sqlite {} --file {} --redis redis://127.0.0.1:{}/ --batch 5 --rate 300",
        harness::bin(),
        path.display(),
        file.display(),
        redis.port
    );
    let out = Command::new("script").args(["-qec", &line, "/dev/null"]).output().expect("run script(1)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("30/30 keys") && text.contains("[="), "no progress bar on a terminal:\n{text}");
    assert!(!text.contains("(loaded"), "log lines on a terminal:\n{text}");
    assert!(text.contains("warm: loaded 30, skipped 0, errors 0"), "{text}");
}
