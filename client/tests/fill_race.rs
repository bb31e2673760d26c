//! Fill/invalidate races: a loader is paused while another instance invalidates the entry's tag, writes
//! or deletes the key. The value the paused loader read must not be served afterwards from any tier.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tiercache_client::{Opts, TierCache};
use tokio::sync::Notify;

const KEY: &str = "product";
const TAG: &str = "product:1";

fn opts() -> Opts {
    Opts::default().ttl(Duration::from_secs(60)).tag(TAG)
}

/// The "database" row and the loader's run count.
#[derive(Clone)]
struct Db {
    row: Arc<Mutex<String>>,
    runs: Arc<AtomicU32>,
}

impl Db {
    fn new(v: &str) -> Db {
        Db { row: Arc::new(Mutex::new(v.to_string())), runs: Arc::new(AtomicU32::new(0)) }
    }
    fn set(&self, v: &str) {
        *self.row.lock().unwrap() = v.to_string();
    }
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
    /// A loader reading the row at once.
    fn loader(
        &self,
    ) -> impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, std::io::Error>> + Send>> + Send + 'static
    {
        let db = self.clone();
        move || {
            Box::pin(async move {
                db.runs.fetch_add(1, Ordering::SeqCst);
                let v = db.row.lock().unwrap().clone();
                Ok(v)
            })
        }
    }
}

/// Raw `TIERCACHE.GET` of the key (what any other client of Redis would be served).
fn raw_get(server: &common::Server, full_key: &str) -> Option<Vec<u8>> {
    server.conn().get(full_key)
}

/// What B does while A's loader is paused.
#[derive(Clone, Copy, Debug)]
enum Race {
    InvalidateTag,
    SetKey,
    DeleteKey,
}

async fn race(kind: Race) {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace("race").build().await.unwrap();
    let b = TierCache::builder(&url).namespace("race").build().await.unwrap();
    let db = Db::new("v1");
    let started = Arc::new(Notify::new());
    let resume = Arc::new(Notify::new());

    let paused_loader = {
        let (db, started, resume) = (db.clone(), started.clone(), resume.clone());
        move || async move {
            db.runs.fetch_add(1, Ordering::SeqCst);
            let v = db.row.lock().unwrap().clone();
            started.notify_one();
            resume.notified().await;
            Ok::<_, std::io::Error>(v)
        }
    };
    let o = opts();
    let a_read = a.get_or_load(KEY, &o, paused_loader);
    let control = async {
        started.notified().await;
        // The row changes, then B tells the cache.
        db.set("v2");
        match kind {
            Race::InvalidateTag => {
                b.invalidate_tags(&[TAG]).await.unwrap();
            }
            Race::SetKey => b.set(KEY, &"v2".to_string(), &opts()).await.unwrap(),
            Race::DeleteKey => b.delete(KEY).await.unwrap(),
        }
        // Let A's listener hear of it too before the fill goes out.
        tokio::time::sleep(Duration::from_millis(50)).await;
        resume.notify_one();
    };
    let (first, ()) = tokio::join!(a_read, control);
    let first = first.expect("the racing get_or_load");
    let m = a.metrics();
    println!("{kind:?}: racing read returned {first:?}; A metrics {m:?}");
    assert_eq!(first, "v1", "the racing caller gets what its loader read");
    assert_eq!(db.runs(), 1);

    // Every check is made, then the failures are reported together.
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, msg: String| {
        if !ok {
            failures.push(msg);
        }
    };
    // The fill was fenced, or at least not cached in L1.
    check(
        m.fenced == 1 || m.l1_entries == 0,
        format!("fill neither fenced nor kept out of L1: fenced {}, {} L1 entries", m.fenced, m.l1_entries),
    );

    // Redis does not hold the stale value.
    let full = a.redis_key(KEY);
    let raw = raw_get(&server, &full);
    let expected_raw = match kind {
        Race::SetKey => Some(msgpack_str("v2")),
        _ => None,
    };
    check(
        raw == expected_raw,
        format!(
            "Redis holds {:?} after the race, expected {:?}",
            raw.as_deref().map(String::from_utf8_lossy),
            expected_raw.as_deref().map(String::from_utf8_lossy)
        ),
    );

    // The next read of every instance returns the new value.
    let runs_before = db.runs();
    let next_a = a.get_or_load(KEY, &opts(), db.loader()).await.unwrap();
    check(next_a == "v2", format!("A's next read returned {next_a:?}"));
    match kind {
        // B's write is in Redis: no load needed.
        Race::SetKey => check(db.runs() == runs_before, "A did not read B's value from Redis".into()),
        // Nothing usable in Redis: A loads again (second loader run).
        _ => check(db.runs() == runs_before + 1, format!("no second loader run ({} runs)", db.runs())),
    }
    let next_b = b.get_or_load(KEY, &opts(), db.loader()).await.unwrap();
    check(next_b == "v2", format!("B's next read returned {next_b:?}"));
    let c = TierCache::builder(&url).namespace("race").build().await.unwrap();
    let next_c = c.get_or_load(KEY, &opts(), db.loader()).await.unwrap();
    check(next_c == "v2", format!("a new instance's read returned {next_c:?}"));
    let raw = raw_get(&server, &full);
    check(
        raw.as_deref() == Some(&msgpack_str("v2")[..]),
        format!("Redis finally holds {:?}", raw.as_deref().map(String::from_utf8_lossy)),
    );
    let hits = a.metrics().l1_hits;
    let again = a.get_or_load(KEY, &opts(), db.loader()).await.unwrap();
    check(again == next_a && a.metrics().l1_hits == hits + 1, format!("A's L1 read returned {again:?}"));
    assert!(failures.is_empty(), "{kind:?} while A was loading:\n{}", failures.join("\n"));
}

/// MessagePack of a string, as the client stores it.
fn msgpack_str(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &rmpv::Value::from(s)).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_fenced_by_a_tag_invalidation_while_loading() {
    race(Race::InvalidateTag).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_fenced_by_a_write_of_the_key_while_loading() {
    race(Race::SetKey).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_fenced_by_a_delete_of_the_key_while_loading() {
    race(Race::DeleteKey).await;
}

/// The invalidation lands on the server while A's loader is paused, but A's listener hears of it only
/// after the fill (no sleep): the fill must still be fenced by Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_fenced_even_when_the_fill_overtakes_the_invalidation_message() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace("race2").build().await.unwrap();
    let db = Db::new("v1");
    let started = Arc::new(Notify::new());
    let resume = Arc::new(Notify::new());
    let paused_loader = {
        let (db, started, resume) = (db.clone(), started.clone(), resume.clone());
        move || async move {
            db.runs.fetch_add(1, Ordering::SeqCst);
            let v = db.row.lock().unwrap().clone();
            started.notify_one();
            resume.notified().await;
            Ok::<_, std::io::Error>(v)
        }
    };
    let o = opts();
    let a_read = a.get_or_load(KEY, &o, paused_loader);
    let control = async {
        started.notified().await;
        db.set("v2");
        // A plain client invalidates (no TierCache involved).
        let mut c = server.conn();
        c.int(&{
            let mut cmd = redis::cmd("TIERCACHE.INVALIDATE");
            cmd.arg(TAG);
            cmd
        });
        resume.notify_one();
    };
    let (first, ()) = tokio::join!(a_read, control);
    assert_eq!(first.unwrap(), "v1");
    let full = a.redis_key(KEY);
    assert_eq!(raw_get(&server, &full), None, "the stale fill did not land in Redis");
    assert_eq!(a.metrics().fenced, 1);
    // Wait for the message, then A must load v2.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(a.get_or_load(KEY, &opts(), db.loader()).await.unwrap(), "v2");
    assert_eq!(db.runs(), 2);
}
