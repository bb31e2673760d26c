//! monitoring/grafana-dashboard.json is valid JSON with well-formed panels, and every series that it
//! and monitoring/cache_monitoring.yml query is one that tiercache exports: the exporter's fields, the
//! Rust client's metrics, the purger's metrics, or a recording rule of the rules file.

use std::collections::BTreeSet;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tiercache_cli::exporter::{Kind, FIELDS, REDIS_FIELDS};

/// Identifiers starting with `tiercache_` or `tiercache:` in `text`.
fn series_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let is_id = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut i = 0;
    while i < b.len() {
        if is_id(b[i]) && (i == 0 || !is_id(b[i - 1])) {
            let start = i;
            while i < b.len() && is_id(b[i]) {
                i += 1;
            }
            let tok = &text[start..i];
            if tok.starts_with("tiercache_") || tok.starts_with("tiercache:") {
                out.insert(tok.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Names in a text exposition's `# TYPE` lines, with the sample suffixes each type produces.
fn exposed(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let (Some(name), Some(ty)) = (it.next(), it.next()) else {
            continue;
        };
        match ty {
            "counter" => {
                out.insert(format!("{}_total", name.trim_end_matches("_total")));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name.to_string());
            }
        }
    }
    out
}

fn known_series(rules: &str) -> BTreeSet<String> {
    let mut known = BTreeSet::new();
    for (name, kind, _) in FIELDS {
        known.insert(if *kind == Kind::Counter { format!("{name}_total") } else { name.to_string() });
    }
    for (_, name, kind, _) in REDIS_FIELDS {
        known.insert(if *kind == Kind::Counter { format!("{name}_total") } else { name.to_string() });
    }
    known.insert("tiercache_up".into());
    known.extend(exposed(&tiercache_client::Snapshot::default().to_prometheus()));
    let metrics = Arc::new(tiercache_cli::purge::Metrics::new());
    let mut registry = Registry::default();
    metrics.register(&mut registry, &Gauge::<f64, std::sync::atomic::AtomicU64>::default());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    known.extend(exposed(&text));
    for l in rules.lines() {
        if let Some(r) = l.trim().strip_prefix("- record: ") {
            known.insert(r.trim().to_string());
        }
    }
    known
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn rules_query_only_exported_series() {
    let rules = read("monitoring/cache_monitoring.yml");
    let known = known_series(&rules);
    let code: String = rules.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
    // Summaries mention "tiercache exporter" etc.: only identifiers with _ or : count.
    let used = series_names(&code);
    assert!(used.len() > 15, "{used:?}");
    let unknown: Vec<&String> = used.difference(&known).collect();
    assert!(unknown.is_empty(), "rules query series nobody exports: {unknown:?}");
    for alert in [
        "TiercacheHitRatioLow",
        "TiercacheOriginLoadSpike",
        "TiercacheLeaseTimeouts",
        "TiercacheFencedFills",
        "TiercacheReclaimBacklog",
        "TiercacheClientDegraded",
        "TiercacheRedisMemoryNearMax",
        "TiercacheEvictions",
        "TiercacheInvalidationLag",
    ] {
        assert!(rules.contains(&format!("- alert: {alert}\n")), "no alert {alert}");
    }
}

#[test]
fn dashboard_is_valid_and_queries_exported_series() {
    let text = read("monitoring/grafana-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("grafana-dashboard.json is not valid JSON");
    assert_eq!(dash["uid"], "tiercache-overview");
    assert!(dash["title"].is_string());
    let vars: Vec<&str> =
        dash["templating"]["list"].as_array().expect("templating").iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(vars, ["datasource", "node"]);
    let known = known_series(&read("monitoring/cache_monitoring.yml"));
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut graphs = 0;
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} repeated");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "panel {id} gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        graphs += 1;
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {id}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let names = series_names(expr);
            assert!(!names.is_empty(), "panel {id}: {expr}");
            used.extend(names);
        }
    }
    assert!(graphs >= 15, "{graphs} graph panels");
    let unknown: Vec<&String> = used.difference(&known).collect();
    assert!(unknown.is_empty(), "dashboard queries series nobody exports: {unknown:?}");
    // Every server field appears somewhere on the dashboard.
    for (name, kind, _) in FIELDS {
        let n = if *kind == Kind::Counter { format!("{name}_total") } else { name.to_string() };
        assert!(used.contains(&n), "dashboard does not show {n}");
    }
}
