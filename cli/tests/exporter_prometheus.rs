//! `tiercache exporter` against real module-enabled redis-servers, scraped by a real Prometheus that
//! also loads monitoring/cache_monitoring.yml: every INFO tiercache field is exported with HELP and
//! the TYPE of COMMANDS.md's table, per node, and Prometheus stores each series and evaluates every
//! rule without error.

#[path = "../../tests/common/mod.rs"]
mod common;
mod harness;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use harness::{Prometheus, TempDir};
use tiercache_cli::exporter::{Kind, FIELDS, REDIS_FIELDS};

/// The metric names the exporter must serve for a node answering `info`.
fn expected_names(info: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = common::info_section_fields(info, "tiercache_stats")
        .expect("INFO tiercache has its section")
        .into_iter()
        .map(|(field, _)| {
            let kind = FIELDS.iter().find(|f| f.0 == field).map(|f| f.1);
            // Fields the table does not know are exported too (type unknown, no suffix).
            if kind == Some(Kind::Counter) {
                format!("{field}_total")
            } else {
                field
            }
        })
        .collect();
    for (_, name, kind, _) in REDIS_FIELDS {
        names.insert(if *kind == Kind::Counter { format!("{name}_total") } else { name.to_string() });
    }
    names.insert("tiercache_up".into());
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_serves_every_field_and_prometheus_stores_them() {
    let dir = TempDir::new("exporter");
    let a = common::Server::builder().args(&["--maxmemory", "64mb"]).start();
    let b = common::Server::start();
    let mut ca = a.conn();
    // Some activity on a: 2 sets (one tagged), 1 hit, 1 miss, 1 invalidation.
    ca.set("k1", "v", &["EX", "60", "TAGS", "1", "t"]);
    ca.set("k2", "v", &["EX", "60"]);
    assert!(ca.get("k2").is_some());
    assert!(ca.get("nope").is_none());
    ca.int(&cmd!("TIERCACHE.INVALIDATE", "t"));
    let info = ca.info("tiercache");
    let want = expected_names(&info);
    let dead = harness::free_port();

    let url_a = format!("redis://127.0.0.1:{}/", a.port);
    let url_b = format!("redis://127.0.0.1:{}/", b.port);
    let url_dead = format!("redis://127.0.0.1:{dead}/");
    let (mut exporter, port) =
        harness::exporter(&dir, &["--redis", &url_a, "--redis", &url_b, "--redis", &url_dead, "--timeout-ms", "1000"]).await;
    let node_a = format!("127.0.0.1:{}", a.port);
    let node_b = format!("127.0.0.1:{}", b.port);
    let node_dead = format!("127.0.0.1:{dead}");

    // The text itself.
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.expect("scrape");
    let ctype = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let text = resp.text().await.unwrap();
    for (field, kind, _) in FIELDS.iter().filter(|f| info.contains(&format!("{}:", f.0))) {
        let ty = if *kind == Kind::Counter { "counter" } else { "gauge" };
        assert!(text.contains(&format!("# TYPE {field} {ty}\n")), "no TYPE {ty} for {field}:\n{text}");
        assert!(text.contains(&format!("# HELP {field} ")), "no HELP for {field}");
    }
    for name in &want {
        for node in [&node_a, &node_b] {
            assert!(text.contains(&format!("{name}{{node=\"{node}\"}} ")), "no {name} for {node}:\n{text}");
        }
    }
    // Values are INFO's.
    let line = |name: &str, node: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(&format!("{name}{{node=\"{node}\"}} "))?.parse().ok())
    };
    assert_eq!(line("tiercache_sets_total", &node_a), Some(2.0));
    assert_eq!(line("tiercache_hits_total", &node_a), Some(1.0));
    assert_eq!(line("tiercache_invalidations_total", &node_a), Some(1.0));
    assert_eq!(line("tiercache_sets_total", &node_b), Some(0.0));
    assert_eq!(line("tiercache_redis_maxmemory_bytes", &node_a), Some(64.0 * 1024.0 * 1024.0));
    assert_eq!(line("tiercache_up", &node_a), Some(1.0));
    assert_eq!(line("tiercache_up", &node_dead), Some(0.0));
    assert_eq!(line("tiercache_entries", &node_dead), None);

    // A real Prometheus scrapes it and evaluates the shipped rules.
    let rules = harness::repo_root().join("monitoring/cache_monitoring.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: tiercache\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n",
        rules.display()
    );
    let prom = Prometheus::start(&dir, &config).await;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let names: BTreeSet<String> = prom
            .api("label/__name__/values")
            .await
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let missing: Vec<&String> = want.iter().filter(|n| !names.contains(*n)).collect();
        if missing.is_empty() {
            break;
        }
        exporter.assert_running();
        assert!(Instant::now() < end, "Prometheus lacks {missing:?}; exporter log:\n{}", exporter.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in &want {
        let r = prom.query(&format!("{name}{{job=\"tiercache\",node=\"{node_a}\"}}")).await;
        assert_eq!(r.len(), 1, "{name}: {r:?}");
    }
    let sets = prom.query(&format!("tiercache_sets_total{{node=\"{node_a}\"}}")).await;
    assert_eq!(sets[0]["value"][1], "2");
    let up = prom.query("tiercache_up == 0").await;
    assert_eq!(up.len(), 1);
    assert_eq!(up[0]["metric"]["node"], node_dead.as_str());

    // Every shipped rule is loaded and evaluates cleanly against these series.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = prom.api("rules").await["groups"].as_array().cloned().unwrap_or_default();
        let rules: Vec<serde_json::Value> =
            groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
        let bad: Vec<String> = rules.iter().filter(|r| r["health"] != "ok").map(|r| r.to_string()).collect();
        if rules.len() >= 15 && bad.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "{} rules, not all healthy:\n{}\n{}", rules.len(), bad.join("\n"), prom.proc.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
