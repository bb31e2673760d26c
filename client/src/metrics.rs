//! Counters, gauges and histograms of one [`crate::TierCache`], encoded by `prometheus-client`
//! (OpenMetrics text).
//!
//! Counters are `prometheus-client` counters (one relaxed atomic add each: an L1 hit takes no lock);
//! histograms lock briefly per observation, and are observed only on loads and Redis round trips.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// The `Content-Type` of the text [`Snapshot::to_prometheus`] and [`crate::TierCache::render_prometheus`]
/// return (OpenMetrics 1.0, which Prometheus scrapes natively).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Buckets of `tiercache_client_load_duration_seconds`: the Python client's, so that both sum up.
const LOAD_BUCKETS: [f64; 12] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const LOAD_HELP: &str = "Loader call durations, failed calls included.";

/// Buckets of `tiercache_client_l2_latency_seconds`: a Redis round trip is well under a millisecond on
/// a LAN; a lease read may also wait in Redis (up to `wait_timeout`) for another client's fill.
const L2_BUCKETS: [f64; 15] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
const L2_HELP: &str = "Redis round trips of lease reads (op=lease_read, waiting in Redis included) and fills (op=fill).";

/// Values of the `op` label of `tiercache_client_l2_latency_seconds`.
const OP_LEASE_READ: &str = "lease_read";
const OP_FILL: &str = "fill";

macro_rules! counters {
    ($($name:ident: $help:literal,)*) => {
        /// Live counters and histograms; read them through [`crate::TierCache::metrics`] or render them.
        #[derive(Debug)]
        pub struct Metrics {
            $(pub(crate) $name: Counter,)*
            /// Loader calls, in seconds.
            pub(crate) load_duration: Histogram,
            /// `TIERCACHE.GET ... LEASE` round trips, in seconds.
            pub(crate) l2_lease_read: Histogram,
            /// `TIERCACHE.SET ... LEASE` round trips, in seconds.
            pub(crate) l2_fill: Histogram,
            /// L1 hits (added to `l1_hits`): counted per thread, the hot path's only counter.
            pub(crate) l1_hits_local: LocalCounter,
        }

        impl Default for Metrics {
            fn default() -> Self {
                Metrics {
                    $($name: Counter::default(),)*
                    load_duration: Histogram::new(LOAD_BUCKETS),
                    l2_lease_read: Histogram::new(L2_BUCKETS),
                    l2_fill: Histogram::new(L2_BUCKETS),
                    l1_hits_local: LocalCounter::default(),
                }
            }
        }

        /// A copy of every counter and gauge at one moment (histograms: see
        /// [`crate::TierCache::render_prometheus`]).
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct Snapshot {
            $(#[doc = $help] pub $name: u64,)*
            /// Entries in L1 now.
            pub l1_entries: u64,
            /// Bytes (keys and encoded values) in L1 now.
            pub l1_bytes: u64,
            /// 1 while Redis is bypassed (circuit open), else 0.
            pub degraded: u64,
        }

        impl Metrics {
            pub(crate) fn snapshot(&self, l1_entries: u64, l1_bytes: u64, degraded: bool) -> Snapshot {
                let mut s = Snapshot { $($name: self.$name.get(),)* l1_entries, l1_bytes, degraded: u64::from(degraded) };
                s.l1_hits += self.l1_hits_local.get();
                s
            }
        }

        impl Snapshot {
            /// Every counter (samples named `<name>_total`) and gauge, with its HELP and TYPE.
            pub(crate) fn encode_into(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
                $(
                    let m = enc.encode_descriptor(concat!("tiercache_client_", stringify!($name)), $help, None, MetricType::Counter)?;
                    ConstCounter::new(self.$name).encode(m)?;
                )*
                for (name, help, v) in [
                    ("l1_entries", "Entries in the in-process cache.", self.l1_entries),
                    ("l1_bytes", "Bytes of keys and encoded values in the in-process cache.", self.l1_bytes),
                    ("degraded", "1 while Redis is bypassed after repeated failures.", self.degraded),
                ] {
                    let full = format!("tiercache_client_{name}");
                    let m = enc.encode_descriptor(&full, help, None, MetricType::Gauge)?;
                    ConstGauge::new(v).encode(m)?;
                }
                Ok(())
            }
        }
    };
}

impl Metrics {
    /// The histograms (`tiercache_client_load_duration_seconds`, `tiercache_client_l2_latency_seconds`).
    pub(crate) fn encode_histograms(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m =
            enc.encode_descriptor("tiercache_client_load_duration", LOAD_HELP, Some(&Unit::Seconds), MetricType::Histogram)?;
        self.load_duration.encode(m)?;
        let mut m = enc.encode_descriptor("tiercache_client_l2_latency", L2_HELP, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (op, h) in [(OP_LEASE_READ, &self.l2_lease_read), (OP_FILL, &self.l2_fill)] {
            h.encode(m.encode_family(&[("op", op)])?)?;
        }
        Ok(())
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_into(&mut enc)
    }
}

impl Snapshot {
    /// OpenMetrics text ([`OPENMETRICS_CONTENT_TYPE`]) of these counters and gauges; counter samples
    /// end in `_total`. [`crate::TierCache::render_prometheus`] adds the histograms.
    pub fn to_prometheus(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(*self));
        render(&registry)
    }
}

/// Encodes `registry` as OpenMetrics text.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail, and the collectors only fail when the writer does.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
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
    fenced: "Fills refused by Redis because the key or a tag changed while loading.",
    fill_errors: "Fills refused by Redis for another reason than fencing (OOM, too many tags...): the value is returned, not cached.",
    fail_safe: "Stale values served because the loader failed.",
    redis_errors: "Redis calls that failed or timed out.",
    degraded_loads: "Loads done without Redis while it was unreachable.",
    invalidations_received: "Invalidation pushes and messages applied to the in-process cache.",
    l1_resets: "Times the in-process cache was dropped whole (gap, reset, reconnect).",
}

pub(crate) fn bump(c: &Counter) {
    c.inc();
}

static NEXT_LOCAL_COUNTER: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot of each [`LocalCounter`], by the counter's id.
    static LOCAL_SLOTS: RefCell<Vec<Option<Arc<AtomicU64>>>> = const { RefCell::new(Vec::new()) };
    /// The slot this thread bumped last, with its counter's id: one thread-local read on the hot path
    /// (no destructor, so no lazy registration) instead of the borrow and index of `LOCAL_SLOTS`.
    static LAST_SLOT: Cell<(usize, *const AtomicU64)> = const { Cell::new((usize::MAX, std::ptr::null())) };
}

/// A counter bumped without an atomic read-modify-write: each thread adds to a slot of its own with a
/// plain load and store (it is the slot's only writer), and a read sums the slots, exactly. An L1 hit
/// costs about as much as a raw `quick_cache` get; a shared atomic add would be a quarter of that.
/// Each thread keeps one pointer per counter id ever created in the process (slots of dropped
/// counters are let go when the thread registers its next one).
#[derive(Debug)]
pub(crate) struct LocalCounter {
    id: usize,
    slots: parking_lot::Mutex<Vec<Arc<AtomicU64>>>,
    /// Bumps from a thread being torn down (its thread-locals gone).
    fallback: AtomicU64,
}

impl Default for LocalCounter {
    fn default() -> Self {
        LocalCounter {
            id: NEXT_LOCAL_COUNTER.fetch_add(1, Relaxed),
            slots: parking_lot::Mutex::new(Vec::new()),
            fallback: AtomicU64::new(0),
        }
    }
}

impl LocalCounter {
    #[inline]
    pub(crate) fn inc(&self) {
        let (id, slot) = LAST_SLOT.try_with(Cell::get).unwrap_or((usize::MAX, std::ptr::null()));
        if id == self.id {
            // SAFETY: `slot` came from an `Arc<AtomicU64>` that the counter with this id keeps in
            // `self.slots` until it is dropped; ids are never reused, and `self` (that counter) is alive
            // here, so the atomic is too.
            let slot = unsafe { &*slot };
            slot.store(slot.load(Relaxed) + 1, Relaxed);
            return;
        }
        self.inc_other();
    }

    /// Not the counter this thread bumped last: its slot from `LOCAL_SLOTS` (remembered as the last).
    fn inc_other(&self) {
        let done = LOCAL_SLOTS
            .try_with(|slots| match slots.try_borrow().ok().as_deref().and_then(|s| s.get(self.id)) {
                Some(Some(slot)) => {
                    slot.store(slot.load(Relaxed) + 1, Relaxed);
                    let _ = LAST_SLOT.try_with(|l| l.set((self.id, Arc::as_ptr(slot))));
                    true
                }
                _ => false,
            })
            .unwrap_or(false);
        if !done {
            self.inc_slow();
        }
    }

    /// This thread's first bump of this counter: a slot of its own, registered with the counter.
    #[cold]
    fn inc_slow(&self) {
        let slot = Arc::new(AtomicU64::new(1));
        let registered = LOCAL_SLOTS
            .try_with(|slots| {
                let Ok(mut slots) = slots.try_borrow_mut() else { return false };
                for s in slots.iter_mut() {
                    // Held by this thread only: its counter was dropped.
                    if s.as_ref().is_some_and(|a| Arc::strong_count(a) == 1) {
                        *s = None;
                    }
                }
                if slots.len() <= self.id {
                    slots.resize(self.id + 1, None);
                }
                match slots.get_mut(self.id) {
                    Some(s) => {
                        *s = Some(slot.clone());
                        true
                    }
                    None => false,
                }
            })
            .unwrap_or(false);
        if registered {
            self.slots.lock().push(slot);
        } else {
            self.fallback.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn get(&self) -> u64 {
        self.slots.lock().iter().map(|s| s.load(Relaxed)).sum::<u64>() + self.fallback.load(Relaxed)
    }
}

#[cfg(test)]
mod local_counter_tests {
    use super::*;

    #[test]
    fn sums_every_thread_exactly() {
        let c = Arc::new(LocalCounter::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..10_000).for_each(|_| c.inc()))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        c.inc();
        assert_eq!(c.get(), 40_001);
        let other = LocalCounter::default();
        other.inc();
        assert_eq!((c.get(), other.get()), (40_001, 1), "counters are apart");
        // Taking turns on one thread: each bump lands on its own counter (the last-slot cache switches).
        for _ in 0..3 {
            c.inc();
            other.inc();
            other.inc();
        }
        assert_eq!((c.get(), other.get()), (40_004, 7));
        drop(other);
        let third = LocalCounter::default();
        third.inc();
        c.inc();
        assert_eq!((c.get(), third.get()), (40_005, 1));
    }
}
