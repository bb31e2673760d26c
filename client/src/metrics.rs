//! Counters and gauges of one [`crate::TierCache`], rendered as Prometheus text.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// Live counters (atomics); read them through [`Metrics::snapshot`] or render them.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(pub(crate) $name: AtomicU64,)*
        }

        /// A copy of every counter at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Snapshot {
            $(pub $name: u64,)*
            /// Entries in L1 now.
            pub l1_entries: u64,
            /// Bytes (keys and encoded values) in L1 now.
            pub l1_bytes: u64,
            /// 1 while Redis is bypassed (circuit open), else 0.
            pub degraded: u64,
        }

        impl Metrics {
            pub(crate) fn snapshot(&self, l1_entries: u64, l1_bytes: u64, degraded: bool) -> Snapshot {
                Snapshot { $($name: self.$name.load(Relaxed),)* l1_entries, l1_bytes, degraded: u64::from(degraded) }
            }
        }

        impl Snapshot {
            /// Prometheus text exposition (version 0.0.4). Counter names end in `_total`.
            pub fn to_prometheus(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP tiercache_client_{}_total {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE tiercache_client_{}_total counter", stringify!($name));
                    let _ = writeln!(out, "tiercache_client_{}_total {}", stringify!($name), self.$name);
                )*
                for (name, help, v) in [
                    ("l1_entries", "Entries in the in-process cache.", self.l1_entries),
                    ("l1_bytes", "Bytes of keys and encoded values in the in-process cache.", self.l1_bytes),
                    ("degraded", "1 while Redis is bypassed after repeated failures.", self.degraded),
                ] {
                    let _ = writeln!(out, "# HELP tiercache_client_{name} {help}");
                    let _ = writeln!(out, "# TYPE tiercache_client_{name} gauge");
                    let _ = writeln!(out, "tiercache_client_{name} {v}");
                }
                out
            }
        }
    };
}

counters! {
    l1_hits: "Reads answered from the in-process cache.",
    l1_misses: "Reads the in-process cache could not answer.",
    l2_hits: "Reads answered fresh by Redis.",
    l2_stale: "Reads answered with a stale value by Redis (one caller refreshes).",
    l2_misses: "Reads Redis could not answer (this caller loads or waits).",
    loads: "Loader calls.",
    load_errors: "Loader calls that failed.",
    coalesced_local: "Reads that waited for another task of this process loading the same key.",
    coalesced_server: "Reads parked in Redis and answered by another client's fill.",
    fenced: "Fills refused by Redis because the key or a tag changed while loading.",
    fill_errors: "Fills refused by Redis for another reason than fencing (OOM, too many tags...): the value is returned, not cached.",
    fail_safe: "Stale values served because the loader failed.",
    redis_errors: "Redis calls that failed or timed out.",
    degraded_loads: "Loads done without Redis while it was unreachable.",
    invalidations_received: "Invalidation pushes and messages applied to the in-process cache.",
    l1_resets: "Times the in-process cache was dropped whole (gap, reset, reconnect).",
}

pub(crate) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}
