//! A fill refused by Redis for another reason than fencing (here: more tags than `tiercache.max-tags`)
//! is counted in `fill_errors`, logged through `tracing` at warn level, and the loaded value is still
//! returned; the lease is released with PASS, so a reader parked on it loads for itself at once.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::fmt::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiercache_client::{Opts, TierCache};
use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};

/// A `tracing` subscriber keeping the text of every warn (and error) event.
struct Capture(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, "{}={} ", field.name(), value);
    }
}

impl Subscriber for Capture {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        *m.level() <= Level::WARN
    }
    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        span::Id::from_u64(1)
    }
    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut f = Fields(format!("{} ", e.metadata().level()));
        e.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
    fn enter(&self, _: &span::Id) {}
    fn exit(&self, _: &span::Id) {}
}

/// Polls the server's stats until `field` reads `n` (a hang guard, not a timing assertion).
async fn wait_stat(server: &common::Server, field: &str, n: i64) {
    let t0 = Instant::now();
    loop {
        let v = server.conn().stats().get(field);
        if v == n {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{field} is {v}, expected {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fill_is_counted_logged_and_its_value_returned() {
    let logs = Arc::new(Mutex::new(Vec::new()));
    tracing::subscriber::set_global_default(Capture(logs.clone())).expect("the only subscriber of this test binary");

    let server = common::Server::start();
    let mut c = server.conn();
    // The client adds its namespace tag: with two tags of the caller's, a fill carries three.
    c.ok(&cmd!("CONFIG", "SET", "tiercache.max-tags", "1"));
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace("fe").build().await.unwrap();
    // B parks on A's lease: a long WAIT, so that it is answered by A's release, never by its deadline.
    let b = TierCache::builder(&url).namespace("fe").wait_timeout(Duration::from_secs(50)).build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("t1").tag("t2");

    let (open, gate) = watch::channel(false);
    let (a_runs, b_runs) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let ha = {
        let (a, o, runs, mut gate) = (a.clone(), o.clone(), a_runs.clone(), gate.clone());
        tokio::spawn(async move {
            a.get_or_load("k", &o, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = gate.wait_for(|open| *open).await;
                Ok::<_, String>("from A".to_string())
            })
            .await
        })
    };
    wait_stat(&server, "leases", 1).await;
    let hb = {
        let (b, o, runs) = (b.clone(), o.clone(), b_runs.clone());
        tokio::spawn(async move {
            b.get_or_load("k", &o, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, String>("from B".to_string())
            })
            .await
        })
    };
    wait_stat(&server, "lease_waiters", 1).await;
    open.send_replace(true);

    assert_eq!(ha.await.unwrap().expect("A's value despite the refused fill"), "from A");
    assert_eq!(hb.await.unwrap().expect("B's own load"), "from B");
    let (ma, mb) = (a.metrics(), b.metrics());
    println!("A {ma:?}\nB {mb:?}");
    let stats = c.stats();
    assert_eq!(a_runs.load(Ordering::SeqCst), 1);
    assert_eq!(ma.fenced, 0, "a refusal is not a fence");
    assert_eq!(c.meta(a.redis_key("k")), None, "nothing was stored");
    assert_eq!(stats.get("leases"), 0, "A gave its lease back");
    assert_eq!(stats.get("passes"), 1, "released with PASS");
    assert_eq!(b_runs.load(Ordering::SeqCst), 1, "B loaded for itself");
    assert_eq!(mb.fill_errors, 0, "B was passed, not handed a lease whose fill is refused again: {mb:?}");

    let warned: Vec<String> = logs.lock().unwrap().iter().filter(|l| l.starts_with("WARN")).cloned().collect();
    println!("warn events: {warned:#?}");
    let full = a.redis_key("k");
    assert_eq!(warned.len(), 1, "one warn event: {warned:?}");
    assert!(warned[0].contains(&format!("key={full} ")), "the key in the event: {warned:?}");
    assert!(warned[0].contains("too many tags"), "the server's error in the event: {warned:?}");
    // Last, so that everything above is checked first: the counter.
    assert_eq!(ma.fill_errors, 1, "fill_errors after a fill refused with too many tags: {ma:?}");

    // B was answered PASS: the value it loaded is cached nowhere, not even in its own L1, so a second
    // read loads again.
    let runs = b_runs.clone();
    let again = b
        .get_or_load("k", &o, move || async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>("again".to_string())
        })
        .await;
    assert_eq!(again.expect("B's second load"), "again");
    assert_eq!(b_runs.load(Ordering::SeqCst), 2, "after PASS nothing may be kept in L1");
}
