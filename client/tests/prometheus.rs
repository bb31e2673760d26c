//! The Prometheus text exposition: every counter (as `<name>_total`) and every gauge, with its value.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use tiercache_client::{Opts, Snapshot, TierCache};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_text_has_every_counter_and_gauge() {
    let server = common::Server::start();
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let a = TierCache::builder(&url).namespace("prom").build().await.unwrap();
    let b = TierCache::builder(&url).namespace("prom").build().await.unwrap();
    let o = Opts::default().ttl(Duration::from_secs(60)).tag("t");
    // Some activity, so that values are not all 0.
    for i in 0..3 {
        let key = format!("k{i}");
        let v = a.get_or_load(&key, &o, move || async move { Ok::<_, std::io::Error>(i) }).await.unwrap();
        assert_eq!(v, i);
        assert_eq!(a.get_or_load(&key, &o, move || async move { Ok::<_, std::io::Error>(99) }).await.unwrap(), i);
    }
    b.invalidate_tags(&["t"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    let s = a.metrics();
    let text = s.to_prometheus();
    println!("{text}");

    // Exhaustive on purpose (no `..`): a new field of Snapshot must be added here too.
    let Snapshot {
        l1_hits,
        l1_misses,
        l2_hits,
        l2_stale,
        l2_misses,
        loads,
        load_errors,
        coalesced_local,
        coalesced_server,
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
    } = s;
    let counters = [
        ("l1_hits", l1_hits),
        ("l1_misses", l1_misses),
        ("l2_hits", l2_hits),
        ("l2_stale", l2_stale),
        ("l2_misses", l2_misses),
        ("loads", loads),
        ("load_errors", load_errors),
        ("coalesced_local", coalesced_local),
        ("coalesced_server", coalesced_server),
        ("fenced", fenced),
        ("fill_errors", fill_errors),
        ("fail_safe", fail_safe),
        ("redis_errors", redis_errors),
        ("degraded_loads", degraded_loads),
        ("invalidations_received", invalidations_received),
        ("l1_resets", l1_resets),
    ];
    let gauges = [("l1_entries", l1_entries), ("l1_bytes", l1_bytes), ("degraded", degraded)];
    assert_eq!((l1_hits, loads), (3, 3), "activity: {s:?}");
    assert!(invalidations_received >= 1, "{s:?}");

    // Samples: name -> value; TYPE lines: name -> type.
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    let mut helps = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(types.insert(name.to_string(), ty.to_string()).is_none(), "TYPE {name} twice");
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP name text");
            assert!(!help.trim().is_empty(), "empty HELP for {name}");
            helps.insert(name.to_string(), help.to_string());
        } else if !line.is_empty() {
            let (name, v) = line.split_once(' ').unwrap_or_else(|| panic!("sample line {line:?}"));
            let v: u64 = v.parse().unwrap_or_else(|_| panic!("value of {name}: {v:?}"));
            assert!(samples.insert(name.to_string(), v).is_none(), "{name} twice");
        }
    }
    for (name, v) in counters {
        let full = format!("tiercache_client_{name}_total");
        assert_eq!(samples.get(&full), Some(&v), "counter {full}");
        assert_eq!(types.get(&full).map(String::as_str), Some("counter"), "TYPE of {full}");
        assert!(helps.contains_key(&full), "HELP of {full}");
    }
    for (name, v) in gauges {
        let full = format!("tiercache_client_{name}");
        assert_eq!(samples.get(&full), Some(&v), "gauge {full}");
        assert_eq!(types.get(&full).map(String::as_str), Some("gauge"), "TYPE of {full}");
        assert!(helps.contains_key(&full), "HELP of {full}");
    }
    assert_eq!(samples.len(), counters.len() + gauges.len(), "no other samples: {samples:?}");
    assert!(!text.contains("_total_total"));
}
