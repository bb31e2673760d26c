//! The module's counters, shown by `TIERCACHE.STATS` and `INFO tiercache` (section `tiercache_stats`).
//!
//! Request counters are only touched on Redis's main thread, so they are bumped with a plain
//! load + store (no locked instruction on the hot path). Entry gauges are also decremented from the
//! `free` callback, which Redis may run on its lazy-free thread, so they use real atomic adds.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use redis_module::raw;
use tiercache_core::{Encoding, Entry};

use crate::ffi::api;
use crate::reply::Value;

/// A counter written only from the main thread.
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    #[inline]
    pub fn bump(&self) {
        self.0.store(self.0.load(Relaxed).wrapping_add(1), Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    /// Raises the value to `v` if it is lower (a running maximum).
    pub fn at_least(&self, v: u64) {
        if v > self.0.load(Relaxed) {
            self.0.store(v, Relaxed);
        }
    }
}

pub static HITS: Counter = Counter::new();
pub static MISSES: Counter = Counter::new();
pub static SETS: Counter = Counter::new();
pub static INVALIDATIONS: Counter = Counter::new();
pub static RECLAIMED: Counter = Counter::new();
pub static RECLAIM_TICKS: Counter = Counter::new();
pub static STALE_SERVED: Counter = Counter::new();
pub static LEASES_GRANTED: Counter = Counter::new();
pub static WAITERS_PARKED: Counter = Counter::new();
pub static WAITERS_WOKEN: Counter = Counter::new();
pub static WAIT_TIMEOUTS: Counter = Counter::new();
pub static HANDOFFS: Counter = Counter::new();
pub static LEASE_TIMEOUTS: Counter = Counter::new();
pub static PASSES: Counter = Counter::new();
pub static FENCED: Counter = Counter::new();
pub static EARLY_REFRESHES: Counter = Counter::new();
pub static RECLAIM_MAX_TICK_US: Counter = Counter::new();
/// Cluster-wide commands that ended with the timeout error (a master did not answer).
pub static CLUSTER_TIMEOUTS: Counter = Counter::new();
/// The longest single tag-index operation on the main thread, in µs, and the most table elements one
/// touched (see `tagindex::timed`).
pub static INDEX_LONGEST_OP_US: Counter = Counter::new();
pub static INDEX_LONGEST_OP_STEPS: Counter = Counter::new();

static ENTRIES: AtomicI64 = AtomicI64::new(0);
static COMPRESSED: AtomicI64 = AtomicI64::new(0);
static BYTES_ORIGINAL: AtomicI64 = AtomicI64::new(0);
static BYTES_STORED: AtomicI64 = AtomicI64::new(0);

fn account(e: &Entry, sign: i64) {
    ENTRIES.fetch_add(sign, Relaxed);
    if e.encoding() == Encoding::Lz4 {
        COMPRESSED.fetch_add(sign, Relaxed);
    }
    BYTES_ORIGINAL.fetch_add(sign * e.size() as i64, Relaxed);
    BYTES_STORED.fetch_add(sign * e.stored().len() as i64, Relaxed);
}

/// An entry now belongs to the keyspace (SET, RDB load, COPY).
pub fn entry_added(e: &Entry) {
    account(e, 1);
}

/// `new` took `old`'s place in a key (an overwrite). Only what changed is added, so an overwrite with a
/// value of the same size and encoding takes no locked instruction (each costs tens of cycles).
pub fn entry_replaced(old: &Entry, new: &Entry) {
    // (stored length, original size, lz4?): a raw entry's size is its stored length, read once.
    let measure = |e: &Entry| {
        let stored = e.stored().len() as i64;
        match e.encoding() {
            Encoding::Raw => (stored, stored, 0),
            Encoding::Lz4 => (stored, e.size() as i64, 1),
        }
    };
    let ((old_stored, old_size, old_lz4), (new_stored, new_size, new_lz4)) = (measure(old), measure(new));
    for (gauge, delta) in
        [(&COMPRESSED, new_lz4 - old_lz4), (&BYTES_ORIGINAL, new_size - old_size), (&BYTES_STORED, new_stored - old_stored)]
    {
        if delta != 0 {
            gauge.fetch_add(delta, Relaxed);
        }
    }
}

/// An entry left the keyspace (our `free` callback).
pub fn entry_removed(e: &Entry) {
    account(e, -1);
}

/// All fields, in display order.
pub fn fields() -> [(&'static str, Value<'static>); 32] {
    let index = crate::tagindex::index_stats();
    let (leases, waiting, timers) = crate::leases::stats();
    [
        ("entries", Value::Int(ENTRIES.load(Relaxed))),
        ("compressed_entries", Value::Int(COMPRESSED.load(Relaxed))),
        ("bytes_original", Value::Int(BYTES_ORIGINAL.load(Relaxed))),
        ("bytes_stored", Value::Int(BYTES_STORED.load(Relaxed))),
        ("hits", Value::Int(HITS.get() as i64)),
        ("misses", Value::Int(MISSES.get() as i64)),
        ("sets", Value::Int(SETS.get() as i64)),
        ("tags", Value::Int(index.tags as i64)),
        ("tag_index_entries", Value::Int(index.entries as i64)),
        ("index_longest_op_us", Value::Int(INDEX_LONGEST_OP_US.get() as i64)),
        ("index_longest_op_steps", Value::Int(INDEX_LONGEST_OP_STEPS.get() as i64)),
        ("invalidations", Value::Int(INVALIDATIONS.get() as i64)),
        ("invalidation_messages", Value::Int(crate::tagindex::published() as i64)),
        ("reclaim_pending", Value::Int(index.reclaim_pending as i64)),
        ("reclaimed", Value::Int(RECLAIMED.get() as i64)),
        ("reclaim_ticks", Value::Int(RECLAIM_TICKS.get() as i64)),
        ("reclaim_max_tick_us", Value::Int(RECLAIM_MAX_TICK_US.get() as i64)),
        ("stale_served", Value::Int(STALE_SERVED.get() as i64)),
        ("leases", Value::Int(leases as i64)),
        ("lease_waiters", Value::Int(waiting as i64)),
        ("lease_timers", Value::Int(timers as i64)),
        ("leases_granted", Value::Int(LEASES_GRANTED.get() as i64)),
        ("waiters_parked", Value::Int(WAITERS_PARKED.get() as i64)),
        ("waiters_woken", Value::Int(WAITERS_WOKEN.get() as i64)),
        ("wait_timeouts", Value::Int(WAIT_TIMEOUTS.get() as i64)),
        ("handoffs", Value::Int(HANDOFFS.get() as i64)),
        ("lease_timeouts", Value::Int(LEASE_TIMEOUTS.get() as i64)),
        ("passes", Value::Int(PASSES.get() as i64)),
        ("fenced", Value::Int(FENCED.get() as i64)),
        ("early_refreshes", Value::Int(EARLY_REFRESHES.get() as i64)),
        ("cluster_pending", Value::Int(crate::cluster::pending() as i64)),
        ("cluster_timeouts", Value::Int(CLUSTER_TIMEOUTS.get() as i64)),
    ]
}

/// The INFO callback: one section, `tiercache_stats`.
pub extern "C" fn info(ctx: *mut raw::RedisModuleInfoCtx, _for_crash_report: c_int) {
    crate::ffi::guard((), || {
        // SAFETY: ctx is the live info context of this call; names are valid C strings.
        unsafe {
            api!(RedisModule_InfoAddSection)(ctx, c"stats".as_ptr());
            for (name, v) in fields() {
                if let Value::Int(i) = v {
                    let name = std::ffi::CString::new(name).unwrap_or_default();
                    api!(RedisModule_InfoAddFieldLongLong)(ctx, name.as_ptr(), i);
                }
            }
        }
    })
}
