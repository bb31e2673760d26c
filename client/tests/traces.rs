//! `tracing` spans and events of the client, seen by a capturing subscriber (the global one of this test
//! binary): a get_or_load miss makes a `tiercache.lease_wait` span, then a `tiercache.load` span (the
//! loader runs inside it) with a `tiercache.fill` child; an L1 hit makes none; an invalidation received
//! is an event; the circuit opening and closing are a warn and an info event.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tiercache_client::{Opts, TierCache};
use tracing::field::{Field, Visit};
use tracing::{span, Event, Level, Metadata, Subscriber};

#[derive(Clone, Debug)]
struct SpanRec {
    id: u64,
    name: String,
    parent: Option<u64>,
    fields: BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
struct EventRec {
    name: String,
    level: Level,
    parent: Option<u64>,
    fields: BTreeMap<String, String>,
}

#[derive(Default)]
struct Log {
    spans: Vec<SpanRec>,
    events: Vec<EventRec>,
}

/// Records every span and event of the client (and of this test), with their fields and parents.
#[derive(Clone, Default)]
struct Capture {
    log: Arc<Mutex<Log>>,
    next: Arc<AtomicU64>,
}

thread_local! {
    /// The spans entered on this thread, innermost last (a future's span is entered while it is polled).
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.0.insert(field.name().to_string(), s);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

fn current() -> Option<u64> {
    STACK.with(|s| s.borrow().last().copied())
}

impl Subscriber for Capture {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.target().starts_with("tiercache_client") || m.target() == "traces"
    }
    fn new_span(&self, attrs: &span::Attributes<'_>) -> span::Id {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        let parent = if attrs.is_root() { None } else { attrs.parent().map(|p| p.into_u64()).or_else(current) };
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let name = attrs.metadata().name().to_string();
        self.log.lock().unwrap().spans.push(SpanRec { id, name, parent, fields });
        span::Id::from_u64(id)
    }
    fn record(&self, id: &span::Id, values: &span::Record<'_>) {
        let mut log = self.log.lock().unwrap();
        if let Some(s) = log.spans.iter_mut().find(|s| s.id == id.into_u64()) {
            values.record(&mut Fields(&mut s.fields));
        }
    }
    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut fields = BTreeMap::new();
        e.record(&mut Fields(&mut fields));
        let parent = if e.is_root() { None } else { e.parent().map(|p| p.into_u64()).or_else(current) };
        let rec = EventRec { name: e.metadata().name().to_string(), level: *e.metadata().level(), parent, fields };
        self.log.lock().unwrap().events.push(rec);
    }
    fn enter(&self, id: &span::Id) {
        STACK.with(|s| s.borrow_mut().push(id.into_u64()));
    }
    fn exit(&self, id: &span::Id) {
        STACK.with(|s| {
            let mut s = s.borrow_mut();
            if let Some(i) = s.iter().rposition(|x| *x == id.into_u64()) {
                s.remove(i);
            }
        });
    }
}

impl Capture {
    fn spans(&self, name: &str) -> Vec<SpanRec> {
        self.log.lock().unwrap().spans.iter().filter(|s| s.name == name).cloned().collect()
    }
    fn events(&self, name: &str) -> Vec<EventRec> {
        self.log.lock().unwrap().events.iter().filter(|e| e.name == name).cloned().collect()
    }
    /// Polls until an event named `name` matching `f` was recorded (a hang guard, not a timing check).
    async fn wait_event(&self, name: &str, f: impl Fn(&EventRec) -> bool) -> EventRec {
        let t0 = Instant::now();
        loop {
            if let Some(e) = self.events(name).into_iter().find(&f) {
                return e;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no {name} event: {:#?}", self.events(name));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn field<'a>(fields: &'a BTreeMap<String, String>, name: &str) -> &'a str {
    fields.get(name).map(String::as_str).unwrap_or_else(|| panic!("no field {name} in {fields:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_traced_and_the_circuit_logged() {
    let cap = Capture::default();
    tracing::subscriber::set_global_default(cap.clone()).expect("the only subscriber of this test binary");

    let mut server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url)
        .namespace("tr")
        .op_timeout(Duration::from_millis(200))
        .circuit_breaker(1, Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    let b = TierCache::builder(&url).namespace("tr").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("t");
    let full = a.redis_key("k");

    // A miss: lease read (FILL), the loader, the fill.
    let v = a
        .get_or_load("k", &o, || async {
            tracing::info!(name: "test.in_loader", "the loader runs");
            Ok::<_, std::io::Error>(7u32)
        })
        .await
        .unwrap();
    assert_eq!(v, 7);

    let waits = cap.spans("tiercache.lease_wait");
    assert_eq!(waits.len(), 1, "{waits:#?}");
    assert_eq!(field(&waits[0].fields, "key"), full);
    assert_eq!(field(&waits[0].fields, "status"), "FILL");

    let loads = cap.spans("tiercache.load");
    assert_eq!(loads.len(), 1, "one span per loader call: {loads:#?}");
    let load = &loads[0];
    assert_eq!(field(&load.fields, "key"), full);
    assert_eq!(field(&load.fields, "lease"), "true");
    assert_eq!(field(&load.fields, "refresh"), "false");
    assert_eq!(field(&load.fields, "outcome"), "ok");

    let fills = cap.spans("tiercache.fill");
    assert_eq!(fills.len(), 1, "{fills:#?}");
    assert_eq!(fills[0].parent, Some(load.id), "the fill is a child of the load");
    assert_eq!(field(&fills[0].fields, "outcome"), "stored");

    let inside = cap.events("test.in_loader");
    assert_eq!(inside.len(), 1);
    assert_eq!(inside[0].parent, Some(load.id), "the loader runs inside tiercache.load");

    // An L1 hit: no span at all.
    let before = cap.log.lock().unwrap().spans.len();
    assert_eq!(a.get_or_load("k", &o, || async { Ok::<_, std::io::Error>(0u32) }).await.unwrap(), 7);
    assert_eq!(a.metrics().l1_hits, 1);
    assert_eq!(cap.log.lock().unwrap().spans.len(), before, "an L1 hit makes no span");

    // Invalidations received: a tag message, then a key push.
    b.invalidate_tags(&["t"]).await.unwrap();
    let e = cap.wait_event("tiercache.invalidation", |e| e.fields.contains_key("tags")).await;
    assert_eq!(e.level, Level::DEBUG);
    assert_eq!((field(&e.fields, "tags"), field(&e.fields, "reset")), ("1", "false"), "{e:?}");
    b.set("k2", &1u32, &o).await.unwrap();
    let e = cap.wait_event("tiercache.invalidation", |e| e.fields.contains_key("keys")).await;
    assert_eq!((field(&e.fields, "keys"), field(&e.fields, "reset")), ("1", "false"), "{e:?}");

    // Redis goes away: the circuit opens (one warn), and closes once it is back (one info).
    server.stop();
    let v = a.get_or_load("down", &o, || async { Ok::<_, std::io::Error>(1u32) }).await.unwrap();
    assert_eq!(v, 1);
    let warn = cap.wait_event("tiercache.degraded", |e| e.level == Level::WARN).await;
    assert_eq!(field(&warn.fields, "cooldown_ms"), "100");
    server.restart();
    let t0 = Instant::now();
    while cap.events("tiercache.resumed").is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the circuit never closed");
        let _ = a.get_or_load("up", &o, || async { Ok::<_, std::io::Error>(2u32) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Up to the circuit closing: one warn (a probe failing after a cooldown reopens it at debug level).
    // After it, a connection pooled before the restart may fail once more: a new opening, a new warn.
    let events = cap.log.lock().unwrap().events.clone();
    let circuit: Vec<&EventRec> =
        events.iter().filter(|e| e.name == "tiercache.degraded" || e.name == "tiercache.resumed").collect();
    let closed = circuit.iter().position(|e| e.name == "tiercache.resumed").expect("resumed");
    assert_eq!(circuit[closed].level, Level::INFO);
    let warns = circuit[..closed].iter().filter(|e| e.level == Level::WARN).count();
    assert_eq!(warns, 1, "one warn per outage: {circuit:#?}");
}
