//! `tiercache exporter`: every field of the module's INFO section `tiercache_stats`, plus Redis's
//! `used_memory`, `maxmemory` and `evicted_keys`, per node, as Prometheus metrics (OpenMetrics text,
//! built with `prometheus-client`).
//!
//! Each scrape runs one `INFO tiercache memory stats` per node. A field keeps its INFO name
//! (`tiercache_hits`); counters get the `_total` suffix (`tiercache_hits_total`). The kind (counter or
//! gauge) and help come from the INFO table of COMMANDS.md. A field this table does not know (a newer
//! module) is still exported, as type `unknown`. `tiercache_up` is 1 for a node that answered.

use std::sync::Arc;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::Mutex;

/// Counter or gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

use Kind::{Counter, Gauge};

/// The INFO fields of `tiercache_stats` (COMMANDS.md, "INFO tiercache"), in display order.
pub const FIELDS: &[(&str, Kind, &str)] = &[
    ("tiercache_entries", Gauge, "Live entries in all databases."),
    ("tiercache_compressed_entries", Gauge, "Live entries stored as lz4."),
    ("tiercache_bytes_original", Gauge, "Sum of the entries' original value sizes, in bytes."),
    ("tiercache_bytes_stored", Gauge, "Sum of the bytes actually stored (after compression)."),
    (
        "tiercache_hits",
        Counter,
        "TIERCACHE.GET calls that found a fresh entry (plain reads with a value, lease reads answered HIT).",
    ),
    (
        "tiercache_misses",
        Counter,
        "TIERCACHE.GET calls that found no fresh entry (plain reads; lease reads answered FILL or BUSY, or parked).",
    ),
    ("tiercache_sets", Counter, "TIERCACHE.SET calls executed, replicated and AOF ones included."),
    ("tiercache_tags", Gauge, "(database, tag) pairs in the tag index."),
    ("tiercache_tag_index_entries", Gauge, "Sum over the indexed tags of the entries under them."),
    ("tiercache_invalidations", Counter, "TIERCACHE.INVALIDATE calls executed, replicated and AOF ones included."),
    ("tiercache_invalidation_messages", Counter, "Invalidation messages published (the last seq sent)."),
    ("tiercache_reclaim_pending", Gauge, "Keys queued for the reclaim timer."),
    ("tiercache_reclaimed", Counter, "Entries deleted by the reclaim timer."),
    ("tiercache_reclaim_ticks", Counter, "Reclaim timer ticks that ran."),
    ("tiercache_reclaim_max_tick_us", Gauge, "The longest reclaim tick so far, in microseconds."),
    ("tiercache_stale_served", Counter, "Lease reads answered STALE."),
    ("tiercache_leases", Gauge, "Fill leases held now."),
    ("tiercache_lease_waiters", Gauge, "Readers parked with WAIT now."),
    ("tiercache_lease_timers", Gauge, "Module timers pending now (lease expiries and WAIT deadlines)."),
    ("tiercache_leases_granted", Counter, "Leases granted (FILL replies, STALE or HIT replies with a token)."),
    ("tiercache_waiters_parked", Counter, "Lease reads that parked with WAIT."),
    ("tiercache_waiters_woken", Counter, "Parked readers answered before their deadline (HIT, FILL hand-off or PASS)."),
    ("tiercache_wait_timeouts", Counter, "Parked readers answered BUSY at their WAIT deadline."),
    ("tiercache_handoffs", Counter, "Leases that ended without a value and went to a parked reader."),
    ("tiercache_lease_timeouts", Counter, "Leases whose LEASE milliseconds ran out before a fill or a release."),
    ("tiercache_passes", Counter, "TIERCACHE.RELEASE ... PASS calls that released a lease."),
    ("tiercache_fenced", Counter, "TIERCACHE.SET ... LEASE calls refused with a FENCED error."),
    ("tiercache_early_refreshes", Counter, "HIT replies that came with a token (early refresh under BETA)."),
];

/// The Redis fields exported next to the module's: (INFO field, metric name, kind, help).
pub const REDIS_FIELDS: &[(&str, &str, Kind, &str)] = &[
    ("used_memory", "tiercache_redis_used_memory_bytes", Gauge, "Redis used_memory: bytes allocated by Redis."),
    ("maxmemory", "tiercache_redis_maxmemory_bytes", Gauge, "Redis maxmemory (0: no limit)."),
    ("evicted_keys", "tiercache_redis_evicted_keys", Counter, "Redis evicted_keys: keys evicted because of maxmemory."),
];

/// One node's answer.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub node: String,
    pub up: bool,
    /// Every `name:value` line with an integer value.
    pub fields: Vec<(String, i64)>,
}

impl NodeInfo {
    fn get(&self, name: &str) -> Option<i64> {
        self.fields.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
    }
}

/// Parses INFO text into its integer fields.
pub fn parse_info(text: &str) -> Vec<(String, i64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.trim_end().split_once(':')?;
            Some((k.to_string(), v.parse::<i64>().ok()?))
        })
        .collect()
}

/// The `node` label of a Redis URL: host:port (or the socket path), never the credentials.
pub fn node_label(url: &str) -> Result<String, String> {
    use redis::IntoConnectionInfo;
    let info = url.into_connection_info().map_err(|e| format!("invalid Redis URL (not shown: it may hold a password): {e}"))?;
    Ok(match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) | redis::ConnectionAddr::TcpTls { host: h, port: p, .. } => format!("{h}:{p}"),
        redis::ConnectionAddr::Unix(p) => p.display().to_string(),
        other => format!("{other}"),
    })
}

/// The snapshot a scrape encodes.
#[derive(Debug)]
struct Snapshot(Vec<NodeInfo>);

fn encode_one(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    values: &[(&str, i64)],
) -> Result<(), std::fmt::Error> {
    if values.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (node, v) in values {
        let labels = [("node", *node)];
        let fam = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(u64::try_from(*v).unwrap_or(0)).encode(fam)?,
            _ => ConstGauge::new(*v).encode(fam)?,
        }
    }
    Ok(())
}

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let nodes = &self.0;
        let up: Vec<(&str, i64)> = nodes.iter().map(|n| (n.node.as_str(), i64::from(n.up))).collect();
        encode_one(&mut enc, "tiercache_up", "1 if the node answered INFO at this scrape.", MetricType::Gauge, &up)?;
        let per_node =
            |field: &str| -> Vec<(&str, i64)> { nodes.iter().filter_map(|n| Some((n.node.as_str(), n.get(field)?))).collect() };
        let ty = |k: Kind| {
            if k == Counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            }
        };
        for (name, kind, help) in FIELDS {
            encode_one(&mut enc, name, help, ty(*kind), &per_node(name))?;
        }
        // Fields of a newer module that the table does not know yet.
        let mut unknown: Vec<&str> = nodes
            .iter()
            .flat_map(|n| n.fields.iter().map(|(k, _)| k.as_str()))
            .filter(|k| k.starts_with("tiercache_") && !FIELDS.iter().any(|f| f.0 == *k))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        for name in unknown {
            let help = format!("INFO field {name} (not described by this exporter).");
            encode_one(&mut enc, name, &help, MetricType::Unknown, &per_node(name))?;
        }
        for (field, name, kind, help) in REDIS_FIELDS {
            encode_one(&mut enc, name, help, ty(*kind), &per_node(field))?;
        }
        Ok(())
    }
}

/// Renders nodes' answers as OpenMetrics text.
pub fn render(nodes: Vec<NodeInfo>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot(nodes)));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// One Redis node, with a connection kept between scrapes.
pub struct Node {
    pub label: String,
    client: redis::Client,
    conn: Mutex<Option<redis::aio::MultiplexedConnection>>,
    timeout: std::time::Duration,
}

impl Node {
    pub fn new(url: &str, timeout: std::time::Duration) -> Result<Node, String> {
        let label = node_label(url)?;
        Ok(Node {
            client: redis::Client::open(url).map_err(|e| format!("{label}: {e}"))?,
            label,
            conn: Mutex::new(None),
            timeout,
        })
    }

    /// Runs INFO; a failed node reports `up = false` and no fields (and reconnects next time).
    pub async fn scrape(&self) -> NodeInfo {
        let mut guard = self.conn.lock().await;
        let result = tokio::time::timeout(self.timeout, async {
            let conn = match guard.as_mut() {
                Some(c) => c,
                None => guard.insert(self.client.get_multiplexed_async_connection().await?),
            };
            redis::cmd("INFO").arg("tiercache").arg("memory").arg("stats").query_async::<String>(conn).await
        })
        .await;
        match result {
            Ok(Ok(text)) => NodeInfo { node: self.label.clone(), up: true, fields: parse_info(&text) },
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", self.timeout),
                };
                crate::log(&format!("exporter: {}: {why}", self.label));
                *guard = None;
                NodeInfo { node: self.label.clone(), up: false, fields: Vec::new() }
            }
        }
    }
}

/// Scrapes every node (concurrently) and renders the result.
pub async fn scrape_all(nodes: &[Arc<Node>]) -> String {
    let tasks: Vec<_> = nodes
        .iter()
        .map(|n| {
            let n = n.clone();
            tokio::spawn(async move { n.scrape().await })
        })
        .collect();
    let mut infos = Vec::with_capacity(tasks.len());
    for (t, n) in tasks.into_iter().zip(nodes) {
        infos.push(t.await.unwrap_or_else(|_| NodeInfo { node: n.label.clone(), up: false, fields: Vec::new() }));
    }
    render(infos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_kinds_help_and_labels() {
        let info = "# tiercache_stats\r\ntiercache_entries:3\r\ntiercache_hits:7\r\ntiercache_new_field:5\r\n\r\n# Memory\r\nused_memory:1000\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\nevicted_keys:2\r\n";
        let nodes = vec![
            NodeInfo { node: "127.0.0.1:1".into(), up: true, fields: parse_info(info) },
            NodeInfo { node: "127.0.0.1:2".into(), up: false, fields: vec![] },
        ];
        let text = render(nodes);
        for want in [
            "# TYPE tiercache_entries gauge",
            "tiercache_entries{node=\"127.0.0.1:1\"} 3",
            "# TYPE tiercache_hits counter",
            "# HELP tiercache_hits TIERCACHE.GET calls",
            "tiercache_hits_total{node=\"127.0.0.1:1\"} 7",
            "# TYPE tiercache_new_field unknown",
            "tiercache_new_field{node=\"127.0.0.1:1\"} 5",
            "tiercache_redis_used_memory_bytes{node=\"127.0.0.1:1\"} 1000",
            "tiercache_redis_maxmemory_bytes{node=\"127.0.0.1:1\"} 0",
            "tiercache_redis_evicted_keys_total{node=\"127.0.0.1:1\"} 2",
            "tiercache_up{node=\"127.0.0.1:1\"} 1",
            "tiercache_up{node=\"127.0.0.1:2\"} 0",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("maxmemory_policy"));
        // A field no node reports has no descriptor at all.
        assert!(!text.contains("tiercache_fenced"));
    }

    #[test]
    fn node_labels_hide_credentials() {
        assert_eq!(node_label("redis://user:secret@10.0.0.1:6380/2").unwrap(), "10.0.0.1:6380");
        assert_eq!(node_label("redis://127.0.0.1/").unwrap(), "127.0.0.1:6379");
        assert!(node_label("nope://x").is_err());
    }

    #[test]
    fn table_names_are_unique_and_prefixed() {
        let mut names: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FIELDS.len());
        assert!(names.iter().all(|n| n.starts_with("tiercache_")));
    }
}
