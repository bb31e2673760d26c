//! The OpenMetrics exposition (`prometheus-client`): every counter (samples `<name>_total`) and every
//! gauge with its value, HELP and TYPE, and the two histograms, whose counts are the loads and Redis
//! round trips this test made.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use tiercache_client::prometheus_client::registry::Registry;
use tiercache_client::{Opts, Snapshot, TierCache};

/// Every counter and gauge with its HELP, as the hand-written exposition had them (and the Python
/// client has them): a dashboard or alert built on one must not notice the move to prometheus-client.
const COUNTERS: [(&str, &str); 15] = [
    ("l1_hits", "Reads answered from the in-process cache."),
    ("l1_misses", "Reads the in-process cache could not answer."),
    ("l2_hits", "Reads answered fresh by Redis."),
    ("l2_stale", "Reads answered with a stale value by Redis (one caller refreshes)."),
    ("l2_misses", "Reads Redis could not answer (this caller loads or waits)."),
    ("loads", "Loader calls."),
    ("load_errors", "Loader calls that failed."),
    ("coalesced_local", "Reads that waited for another task of this process loading the same key."),
    ("fenced", "Fills refused by Redis because the key or a tag changed while loading."),
    (
        "fill_errors",
        "Fills refused by Redis for another reason than fencing (OOM, too many tags...): the value is returned, not cached.",
    ),
    ("fail_safe", "Stale values served because the loader failed."),
    ("redis_errors", "Redis calls that failed or timed out."),
    ("degraded_loads", "Loads done without Redis while it was unreachable."),
    ("invalidations_received", "Invalidation pushes and messages applied to the in-process cache."),
    ("l1_resets", "Times the in-process cache was dropped whole (gap, reset, reconnect)."),
];
const GAUGES: [(&str, &str); 3] = [
    ("l1_entries", "Entries in the in-process cache."),
    ("l1_bytes", "Bytes of keys and encoded values in the in-process cache."),
    ("degraded", "1 while Redis is bypassed after repeated failures."),
];
const LOAD_BUCKETS: [&str; 13] =
    ["0.001", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "+Inf"];

/// A sample's name and labels, with the labels sorted (their order in the text is the encoder's).
fn canonical(sample: &str) -> (String, Vec<String>) {
    match sample.split_once('{') {
        Some((name, labels)) => {
            let mut labels: Vec<String> =
                labels.strip_suffix('}').expect("closing brace").split(',').filter(|l| !l.is_empty()).map(String::from).collect();
            labels.sort();
            (name.to_string(), labels)
        }
        None => (sample.to_string(), Vec::new()),
    }
}

/// One parsed exposition: samples (name with labels -> value), TYPE, HELP and UNIT by family.
#[derive(Debug, Default)]
struct Parsed {
    samples: Vec<((String, Vec<String>), f64)>,
    types: HashMap<String, String>,
    helps: HashMap<String, String>,
    units: HashMap<String, String>,
}

impl Parsed {
    /// `repeated`: one family may come once per cache (several caches in one registry: prometheus-client
    /// does not merge collectors), always with the same HELP and TYPE.
    fn new(text: &str, repeated: bool) -> Parsed {
        let mut p = Parsed::default();
        assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF: {text}");
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE name type");
                let old = p.types.insert(name.to_string(), ty.to_string());
                assert!(old.is_none() || (repeated && old.as_deref() == Some(ty)), "TYPE {name} twice");
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                let old = p.helps.insert(name.to_string(), help.to_string());
                assert!(old.is_none() || (repeated && old.as_deref() == Some(help)), "HELP {name} twice");
            } else if let Some(rest) = line.strip_prefix("# UNIT ") {
                let (name, unit) = rest.split_once(' ').expect("UNIT name unit");
                p.units.insert(name.to_string(), unit.to_string());
            } else {
                assert!(!line.starts_with('#'), "unexpected line {line:?}");
                let (name, v) = line.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {line:?}"));
                let v: f64 = v.parse().unwrap_or_else(|_| panic!("value of {name}: {v:?}"));
                let key = canonical(name);
                assert!(!p.samples.iter().any(|(n, _)| *n == key), "{name} twice");
                p.samples.push((key, v));
            }
        }
        p
    }

    /// The value of a sample, `name{labels}` in any label order.
    fn get(&self, name: &str) -> Option<f64> {
        let key = canonical(name);
        self.samples.iter().find(|(n, _)| *n == key).map(|(_, v)| *v)
    }

    /// Checks the counters and gauges against `s`, with their exact HELP and TYPE.
    fn check_counters_and_gauges(&self, s: &Snapshot, labels: &str) {
        let values = snapshot_values(s);
        for (name, help) in COUNTERS {
            let family = format!("tiercache_client_{name}");
            let sample = format!("{family}_total{labels}");
            assert_eq!(self.get(&sample), Some(values[name] as f64), "counter {sample}");
            assert_eq!(self.types.get(&family).map(String::as_str), Some("counter"), "TYPE of {family}");
            assert_eq!(self.helps.get(&family).map(String::as_str), Some(help), "HELP of {family}");
        }
        for (name, help) in GAUGES {
            let family = format!("tiercache_client_{name}");
            let sample = format!("{family}{labels}");
            assert_eq!(self.get(&sample), Some(values[name] as f64), "gauge {sample}");
            assert_eq!(self.types.get(&family).map(String::as_str), Some("gauge"), "TYPE of {family}");
            assert_eq!(self.helps.get(&family).map(String::as_str), Some(help), "HELP of {family}");
        }
    }

    /// The `le` bounds and cumulative counts of one histogram series, checked for consistency; returns
    /// its `_count`.
    fn histogram(&self, family: &str, labels: &str, buckets: Option<&[&str]>) -> u64 {
        assert_eq!(self.types.get(family).map(String::as_str), Some("histogram"), "TYPE of {family}");
        assert_eq!(self.units.get(family).map(String::as_str), Some("seconds"), "UNIT of {family}");
        assert!(self.helps.contains_key(family), "HELP of {family}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let (_, want) = canonical(&format!("{family}_bucket{braces}"));
        let bucket = format!("{family}_bucket");
        // In the text's order, which is the buckets' order.
        let series: Vec<(String, f64)> = self
            .samples
            .iter()
            .filter(|((n, _), _)| *n == bucket)
            .filter_map(|((_, l), v)| {
                let le = l.iter().find_map(|l| l.strip_prefix("le=\""))?.strip_suffix('"')?.to_string();
                let rest: Vec<String> = l.iter().filter(|l| !l.starts_with("le=")).cloned().collect();
                (rest == want).then_some((le, *v))
            })
            .collect();
        if let Some(b) = buckets {
            let les: Vec<&str> = series.iter().map(|(le, _)| le.as_str()).collect();
            assert_eq!(les, b, "buckets of {family}{{{labels}}}");
        }
        assert!(series.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative buckets: {series:?}");
        let count = self.get(&format!("{family}_count{braces}")).unwrap_or_else(|| panic!("{family}_count{braces}"));
        assert_eq!(series.last().map(|(le, v)| (le.as_str(), *v)), Some(("+Inf", count)), "+Inf bucket of {family}");
        let sum = self.get(&format!("{family}_sum{braces}")).unwrap_or_else(|| panic!("{family}_sum{braces}"));
        assert!(sum >= 0.0 && (count > 0.0 || sum == 0.0), "{family}_sum {sum}");
        count as u64
    }
}

/// The snapshot's fields by name. Exhaustive on purpose (no `..`): a new field of Snapshot must be
/// added here (and to COUNTERS or GAUGES) too.
fn snapshot_values(s: &Snapshot) -> HashMap<&'static str, u64> {
    let Snapshot {
        l1_hits,
        l1_misses,
        l2_hits,
        l2_stale,
        l2_misses,
        loads,
        load_errors,
        coalesced_local,
        fenced,
        fill_errors,
        fail_safe,
        redis_errors,
        degraded_loads,
        invalidations_received,
        l1_resets,
        l1_entries,
        l1_bytes,
        degraded,
    } = *s;
    HashMap::from([
        ("l1_hits", l1_hits),
        ("l1_misses", l1_misses),
        ("l2_hits", l2_hits),
        ("l2_stale", l2_stale),
        ("l2_misses", l2_misses),
        ("loads", loads),
        ("load_errors", load_errors),
        ("coalesced_local", coalesced_local),
        ("fenced", fenced),
        ("fill_errors", fill_errors),
        ("fail_safe", fail_safe),
        ("redis_errors", redis_errors),
        ("degraded_loads", degraded_loads),
        ("invalidations_received", invalidations_received),
        ("l1_resets", l1_resets),
        ("l1_entries", l1_entries),
        ("l1_bytes", l1_bytes),
        ("degraded", degraded),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_has_every_counter_gauge_and_histogram() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace("prom").build().await.unwrap();
    let b = TierCache::builder(&url).namespace("prom").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("t");
    // A: three misses (a lease read answered FILL, a load, a fill each), then three L1 hits (no Redis).
    for i in 0..3 {
        let key = format!("k{i}");
        let v = a.get_or_load(&key, &o, move || async move { Ok::<_, std::io::Error>(i) }).await.unwrap();
        assert_eq!(v, i);
        assert_eq!(a.get_or_load(&key, &o, move || async move { Ok::<_, std::io::Error>(99) }).await.unwrap(), i);
    }
    // A: a failing load (a lease read, a load, a release: no fill).
    let failed = a.get_or_load("bad", &o, || async { Err::<u32, _>(std::io::Error::other("db down")) }).await;
    assert!(failed.is_err());
    // B: one lease read answered HIT, no load, no fill.
    assert_eq!(b.get_or_load("k0", &o, || async { Ok::<_, std::io::Error>(99) }).await.unwrap(), 0);
    b.invalidate_tags(&["t"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let s = a.metrics();
    let text = a.render_prometheus();
    println!("{text}");
    assert_eq!((s.l1_hits, s.loads, s.load_errors), (3, 4, 1), "activity: {s:?}");
    assert!(s.invalidations_received >= 1, "{s:?}");
    assert_eq!(a.metrics(), s, "nothing moved since the snapshot");

    let p = Parsed::new(&text, false);
    p.check_counters_and_gauges(&s, "");
    let load = "tiercache_client_load_duration_seconds";
    let l2 = "tiercache_client_l2_latency_seconds";
    assert_eq!(p.histogram(load, "", Some(&LOAD_BUCKETS)), 4, "one observation per loader call, the failed one included");
    assert_eq!(p.histogram(l2, "op=\"lease_read\"", None), 4, "A's lease reads");
    assert_eq!(p.histogram(l2, "op=\"fill\"", None), 3, "A's fills");
    let histogram_lines = p.samples.iter().filter(|((n, _), _)| n.starts_with(load) || n.starts_with(l2)).count();
    assert_eq!(p.samples.len(), COUNTERS.len() + GAUGES.len() + histogram_lines, "no other samples: {:?}", p.samples);
    assert!(!text.contains("_total_total"));

    // The snapshot alone: the same counters and gauges, no histogram.
    let snap = Parsed::new(&s.to_prometheus(), false);
    snap.check_counters_and_gauges(&s, "");
    assert_eq!(snap.samples.len(), COUNTERS.len() + GAUGES.len(), "{:?}", snap.samples);

    // In an application's registry, under a label per cache.
    let mut registry = Registry::default();
    a.register_metrics(registry.sub_registry_with_label(("cache".into(), "a".into())));
    b.register_metrics(registry.sub_registry_with_label(("cache".into(), "b".into())));
    let mut out = String::new();
    tiercache_client::prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    let both = Parsed::new(&out, true);
    both.check_counters_and_gauges(&s, "{cache=\"a\"}");
    both.check_counters_and_gauges(&b.metrics(), "{cache=\"b\"}");
    assert_eq!(both.histogram(load, "cache=\"b\"", Some(&LOAD_BUCKETS)), 0, "B loaded nothing");
    assert_eq!(both.histogram(l2, "cache=\"b\",op=\"lease_read\"", None), 1, "B's lease read");
    assert_eq!(both.histogram(l2, "cache=\"b\",op=\"fill\"", None), 0, "B filled nothing");
    assert_eq!(both.histogram(l2, "cache=\"a\",op=\"fill\"", None), 3);

    // The registry does not keep a cache alive: once dropped, its metrics are gone.
    drop(b);
    let mut out = String::new();
    tiercache_client::prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
    assert!(out.contains("cache=\"a\"") && !out.contains("cache=\"b\""), "{out}");
}
