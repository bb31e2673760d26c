//! `tiercache write-behind run` against a real module-enabled redis-server and a real PostgreSQL:
//! the worker is SIGKILLed again and again during a write load, and every accepted write still reaches
//! the database exactly once and in order per key; applies are idempotent by stream id (a full
//! redelivery changes nothing); poison entries are retried with backoff then dead-lettered.

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;
#[path = "../../client/tests/common/pg.rs"]
mod pg;

use std::collections::BTreeMap;
use std::time::Duration;

use harness::{free_port, tiercache, wait_until, Proc, TempDir};
use serde::{Deserialize, Serialize};
use tiercache_client::{write_behind_stream, Opts, TierCache, WRITE_BEHIND_SHARDS};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Item {
    seq: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    poison: Option<bool>,
    pad: String,
}

const MAP: &str = r#"
[[route]]
prefix = "item:"
# The value, and a checker row per applied write (no unique constraint: a duplicate would show).
set = """
WITH up AS (INSERT INTO kv (k, v) VALUES ($3, $2::jsonb) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v RETURNING 1)
INSERT INTO wb_log (k, seq, entry_id) SELECT $3, ($2::jsonb->>'seq')::bigint, $4 FROM up
"""
delete = """
WITH d AS (DELETE FROM kv WHERE k = $3 RETURNING 1)
INSERT INTO wb_log (k, seq, entry_id) VALUES ($3, -1, $4)
"""

[[route]]
prefix = "item:special:"
set = "INSERT INTO wb_log (k, seq, entry_id) VALUES ('special:' || $1, ($2::jsonb->>'seq')::bigint, $4)"
"#;

async fn setup_db(name: &str) -> (String, tokio_postgres::Client) {
    let dsn = pg::database(name).await;
    let db = pg::connect(&dsn).await;
    db.batch_execute(
        "DROP TABLE IF EXISTS kv, wb_log, tiercache_write_behind_offsets;
         CREATE TABLE kv (k text PRIMARY KEY, v jsonb NOT NULL CHECK (v->>'poison' IS NULL));
         CREATE TABLE wb_log (n bigserial PRIMARY KEY, k text NOT NULL, seq bigint NOT NULL, entry_id text NOT NULL);",
    )
    .await
    .unwrap();
    (dsn, db)
}

fn worker(dir: &TempDir, name: &str, redis: &str, dsn: &str, ns: &str, consumer: &str, extra: &[&str]) -> Proc {
    let map = dir.path().join("map.toml");
    if !map.exists() {
        std::fs::write(&map, MAP).unwrap();
    }
    let mut args = vec![
        "write-behind",
        "run",
        "--redis",
        redis,
        "--dsn",
        dsn,
        "--map",
        map.to_str().unwrap(),
        "--namespace",
        ns,
        "--consumer",
        consumer,
        "--lock-ttl-ms",
        "1000",
    ];
    args.extend_from_slice(extra);
    tiercache(dir, name, &args)
}

async fn log_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM wb_log", &[]).await.unwrap().get(0)
}

/// Per key, the `seq` of every applied write in the order applied.
async fn applied(db: &tokio_postgres::Client) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for r in db.query("SELECT k, seq FROM wb_log ORDER BY n", &[]).await.unwrap() {
        out.entry(r.get(0)).or_default().push(r.get(1));
    }
    out
}

async fn scrape(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_lose_nothing_and_keep_each_keys_order() {
    let server = common::Server::start();
    let redis = format!("redis://127.0.0.1:{}/", server.port);
    let (dsn, db) = setup_db("wb_kill").await;
    let dir = TempDir::new("wb-kill");
    let cache = TierCache::builder(&redis).namespace("wbk").build().await.unwrap();

    const KEYS: usize = 24;
    const WRITES: i64 = 50;
    let load = {
        let cache = cache.clone();
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            for k in 0..KEYS {
                let cache = cache.clone();
                tasks.push(tokio::spawn(async move {
                    let key = if k == 0 { "item:special:0".to_string() } else { format!("item:{k}") };
                    for seq in 1..=WRITES {
                        let v = Item { seq, poison: None, pad: "x".repeat(k * 10) };
                        let acc = cache.write_behind(&key, &v, &Opts::default(), Some(&format!("{key}/{seq}"))).await.unwrap();
                        assert!(acc.new);
                        // Readers see the write at once (or nothing, if a worker applied it and settled
                        // the entry already; never an older value).
                        let got = cache.get::<Item>(&key).await.unwrap();
                        assert!(got.is_none() || got == Some(v.clone()), "{key}: read {got:?} after accepting {v:?}");
                        tokio::time::sleep(Duration::from_millis(2 + (seq as u64 % 5))).await;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };

    // Kill the worker (SIGKILL) again and again while the load runs; some restarts reuse the consumer
    // name, others are new consumers that must claim the dead one's pending entries.
    let mut kills = 0;
    let mut kills_with_backlog = 0;
    let mut round = 0u64;
    while !load.is_finished() || kills < 6 {
        let consumer = if round.is_multiple_of(2) { "w-same".to_string() } else { format!("w-{round}") };
        let mut w = worker(&dir, &format!("worker-{round}"), &redis, &dsn, "wbk", &consumer, &[]);
        tokio::time::sleep(Duration::from_millis(150 + (round * 137) % 450)).await;
        w.assert_running();
        // The backlog at the kill: accepted (the streams' lengths) minus applied (the checker rows).
        let accepted: i64 =
            (0..WRITE_BEHIND_SHARDS).map(|s| server.conn().int(&cmd!("XLEN", write_behind_stream("wbk", s)))).sum();
        if accepted > log_count(&db).await {
            kills_with_backlog += 1;
        }
        drop(w); // SIGKILL, reaped
        kills += 1;
        round += 1;
        if kills > 40 {
            break;
        }
    }
    load.await.unwrap();
    let before_final = log_count(&db).await;
    let total = KEYS as i64 * WRITES;
    assert!(kills_with_backlog >= 3, "only {kills_with_backlog} of {kills} kills came with writes waiting: nothing was tested");

    let metrics_port = free_port();
    let mp = metrics_port.to_string();
    let mut w = worker(&dir, "worker-final", &redis, &dsn, "wbk", "w-final", &["--metrics-listen", &format!("127.0.0.1:{mp}")]);
    let drained = wait_until(Duration::from_secs(90), || async { log_count(&db).await >= total }).await;
    w.assert_running();
    assert!(drained, "only {} of {total} writes applied:\n{}", log_count(&db).await, w.log_text());
    // Nothing more arrives (no duplicates trickling in), and the queue is empty.
    let empty = wait_until(Duration::from_secs(10), || async {
        metric(&scrape(metrics_port).await, "tiercache_write_behind_queue_depth") == Some(0.0)
    })
    .await;
    assert!(empty, "queue not empty: {}", scrape(metrics_port).await);
    assert_eq!(log_count(&db).await, total);

    let per_key = applied(&db).await;
    assert_eq!(per_key.len(), KEYS);
    for (k, seqs) in &per_key {
        assert_eq!(seqs, &(1..=WRITES).collect::<Vec<_>>(), "key {k}: applied out of order, twice or not at all");
    }
    for k in 1..KEYS {
        let seq: String = db.query_one("SELECT v->>'seq' FROM kv WHERE k = $1", &[&format!("item:{k}")]).await.unwrap().get(0);
        assert_eq!(seq, WRITES.to_string());
    }
    println!(
        "{kills} kills ({kills_with_backlog} with writes waiting); {before_final} of {total} applied before the final worker"
    );

    // Entries a killed worker applied but had not acknowledged came again and were skipped.
    let dups_before = metric(&scrape(metrics_port).await, "tiercache_write_behind_duplicates_total").unwrap();
    println!("{dups_before} entries applied by a killed worker before its XACK were redelivered and skipped");
    // Idempotent by stream id: redeliver every entry (the group's cursor back to the start).
    let mut conn = server.conn();
    for shard in 0..WRITE_BEHIND_SHARDS {
        let s = write_behind_stream("wbk", shard);
        conn.ok(&cmd!("XGROUP", "SETID", &s, "tiercache-write-behind", "0"));
    }
    let redelivered = wait_until(Duration::from_secs(30), || async {
        metric(&scrape(metrics_port).await, "tiercache_write_behind_duplicates_total") == Some(dups_before + total as f64)
    })
    .await;
    assert!(redelivered, "duplicates not all skipped: {}", scrape(metrics_port).await);
    assert_eq!(log_count(&db).await, total, "a redelivered entry was applied again");
    let m = scrape(metrics_port).await;
    assert_eq!(metric(&m, "tiercache_write_behind_dead_lettered_total"), Some(0.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_are_retried_then_dead_lettered() {
    let server = common::Server::start();
    let redis = format!("redis://127.0.0.1:{}/", server.port);
    let (dsn, db) = setup_db("wb_poison").await;
    let dir = TempDir::new("wb-poison");
    let cache = TierCache::builder(&redis).namespace("wbp").build().await.unwrap();
    let item = |seq, poison| Item { seq, poison, pad: String::new() };
    cache.write_behind("item:1", &item(1, None), &Opts::default(), None).await.unwrap();
    // Breaks the CHECK constraint: a statement error on every attempt.
    let bad = cache.write_behind("item:1", &item(2, Some(true)), &Opts::default(), None).await.unwrap();
    cache.write_behind("item:1", &item(3, None), &Opts::default(), None).await.unwrap();
    // No route for this key: dead-lettered at once.
    let lost = cache.write_behind("other:1", &item(1, None), &Opts::default(), None).await.unwrap();
    cache.write_behind_delete("item:2", None).await.unwrap();

    let metrics_port = free_port();
    let mut w = worker(
        &dir,
        "worker",
        &redis,
        &dsn,
        "wbp",
        "w1",
        &["--max-attempts", "3", "--backoff-min-ms", "20", "--metrics-listen", &format!("127.0.0.1:{metrics_port}")],
    );
    let done = wait_until(Duration::from_secs(30), || async { log_count(&db).await >= 3 }).await;
    w.assert_running();
    assert!(done, "{}", w.log_text());
    let per_key = applied(&db).await;
    assert_eq!(per_key.get("item:1"), Some(&vec![1, 3]), "the poison entry is skipped, the key's later writes go on");
    assert_eq!(per_key.get("item:2"), Some(&vec![-1]), "the delete was applied");

    let mut conn = server.conn();
    let dead = conn.run(&cmd!("XRANGE", "tiercache:wb:{wbp}:dead", "-", "+"));
    let text = format!("{dead:?}");
    let common::Value::Array(entries) = &dead else { panic!("{text}") };
    assert_eq!(entries.len(), 2, "{text}");
    assert!(text.contains(&bad.stream_id) && text.contains(&lost.stream_id), "{text}");
    assert!(text.contains("check constraint") || text.contains("23514"), "{text}");
    assert!(text.contains("no route"), "{text}");
    let m = scrape(metrics_port).await;
    assert_eq!(metric(&m, "tiercache_write_behind_dead_lettered_total"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "tiercache_write_behind_retried_total"), Some(2.0), "{m}");
    assert_eq!(metric(&m, "tiercache_write_behind_applied_total"), Some(3.0), "{m}");
    let settled = wait_until(Duration::from_secs(10), || async {
        metric(&scrape(metrics_port).await, "tiercache_write_behind_queue_depth") == Some(0.0)
    })
    .await;
    assert!(settled, "{}", scrape(metrics_port).await);
}

/// An entry that expired while its write was queued is reloaded from the database with the old row;
/// once the worker has applied the key's last queued write, that stale copy is gone and the next read
/// loads the new row. A key with a newer queued write keeps its accepted value until that one applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_loaded_while_queued_is_dropped_once_applied() {
    let server = common::Server::start();
    let redis = format!("redis://127.0.0.1:{}/", server.port);
    let (dsn, db) = setup_db("wb_settle").await;
    db.batch_execute("INSERT INTO kv VALUES ('item:1', '{\"seq\": 0, \"pad\": \"\"}')").await.unwrap();
    let dir = TempDir::new("wb-settle");
    let cache = TierCache::builder(&redis).namespace("wbs").build().await.unwrap();
    let load = |dsn: String| {
        move || async move {
            let db = pg::connect(&dsn).await;
            let v: String = db.query_one("SELECT v::text FROM kv WHERE k = 'item:1'", &[]).await.unwrap().get(0);
            Ok::<Item, std::io::Error>(serde_json::from_str(&v).unwrap())
        }
    };
    cache.write_behind("item:1", &Item { seq: 1, poison: None, pad: String::new() }, &Opts::default(), None).await.unwrap();
    // The entry goes (expiry, eviction) while the write is queued: a reader reloads the old row.
    server.conn().run(&cmd!("DEL", cache.redis_key("item:1")));
    tokio::time::sleep(Duration::from_millis(50)).await; // the tracking push drops the L1 copy
    let stale = cache.get_or_load("item:1", &Opts::default(), load(dsn.clone())).await.unwrap();
    assert_eq!(stale.seq, 0);
    let full = cache.redis_key("item:1");
    assert!(server.conn().get(&full).is_some());

    let mut w = worker(&dir, "worker", &redis, &dsn, "wbs", "w1", &[]);
    let applied_one = wait_until(Duration::from_secs(30), || async { log_count(&db).await >= 1 }).await;
    assert!(applied_one, "{}", w.log_text());
    let settled = wait_until(Duration::from_secs(10), || async { server.conn().get(&full).is_none() }).await;
    w.assert_running();
    assert!(settled, "the stale copy outlived the queue");
    assert_eq!(
        server
            .conn()
            .int(&cmd!("HLEN", format!("{}:latest", write_behind_stream("wbs", tiercache_client::write_behind_shard("item:1"))))),
        0
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(cache.get_or_load("item:1", &Opts::default(), load(dsn.clone())).await.unwrap().seq, 1);
}
