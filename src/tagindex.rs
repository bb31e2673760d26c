//! The module's side of the tag index (`tiercache_core::index`): the registry itself (main-thread
//! state), the events that keep it exact (keyspace events for entries that arrive under a new name, server
//! events for flushes, SWAPDB and promotion; the module does not opt into async diskless loading, so a
//! replica always loads with per-key `loaded` events), the reclaim timer, and the invalidation
//! messages published for L1 caches.
//!
//! The registry lives in a thread-local: every caller runs on Redis's main thread (or in a forked child,
//! which has a copy). Borrows are short and never held across a call into Redis, because deleting or
//! even opening a key can run our unlink callback, which needs the registry again.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis_module::raw;
use tiercache_core::index::{Attach, Garbage, IndexStats, Registry};
use tiercache_core::tags::{Tags, DEAD};
use tiercache_core::Entry;

use crate::config;
use crate::ffi::{api, bytes, free_string, guard, hot, log, new_string, Ctx, RStr, OK};
use crate::keys::{self, Slot, WriteKey};
use crate::stats;

thread_local! {
    static REGISTRY: RefCell<Registry> = RefCell::new(Registry::new());
    static TIMER_ARMED: Cell<bool> = const { Cell::new(false) };
    static SEQ: Cell<u64> = const { Cell::new(0) };
    static RUN_ID: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
    /// The database of each key deleted in the current reclaim tick.
    static DB_OF: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    /// A replica's full-resync load is in progress.
    static REPL_LOADING: Cell<bool> = const { Cell::new(false) };
    /// The reclaim timer is deleting invalidated entries right now.
    static RECLAIMING: Cell<bool> = const { Cell::new(false) };
}

/// Milliseconds between reclaim ticks while keys are queued.
const RECLAIM_PERIOD_MS: i64 = 1;
/// Wall-clock cap of one reclaim tick, whatever the key budget: with Redis's own incremental rehashing
/// (up to 1 ms per cron run while a shrinking keyspace is rehashed) a client still waits under 2 ms.
const RECLAIM_TICK_CAP: Duration = Duration::from_micros(500);

/// Runs `f` with the registry; `None` if it is already borrowed (a re-entrant call we refuse rather
/// than panic on). Large structures the call released are freed on a background thread.
pub fn with<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    let (r, garbage) = REGISTRY.with(|r| {
        let mut r = r.try_borrow_mut().ok()?;
        let out = f(&mut r);
        Some((out, r.take_garbage()))
    })?;
    if !garbage.is_empty() {
        free_in_background(garbage);
    }
    Some(r)
}

/// Runs one index operation (attach, detach, invalidate, a reclaim batch, flush, swap) with [`with`], and
/// keeps the longest it took and the most table elements it touched for INFO (`index_longest_op_us`,
/// `index_longest_op_steps`). Only called for entries that have tags: two clock reads per operation.
fn timed<R>(f: impl FnOnce(&mut Registry) -> R) -> Option<R> {
    let started = Instant::now();
    let out = with(|r| {
        r.take_steps();
        let out = f(r);
        stats::INDEX_LONGEST_OP_STEPS.at_least(r.take_steps());
        out
    });
    stats::INDEX_LONGEST_OP_US.at_least(started.elapsed().as_micros() as u64);
    out
}

/// Frees tables of millions of keys off the main thread, as Redis's own lazy free does (freeing one
/// takes milliseconds). The memory comes from Redis's allocator, which is thread-safe.
fn free_in_background(garbage: Vec<Garbage>) {
    static SENDER: OnceLock<Mutex<mpsc::Sender<Vec<Garbage>>>> = OnceLock::new();
    let sender = SENDER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Vec<Garbage>>();
        let spawned = std::thread::Builder::new().name("tiercache-free".into()).spawn(move || {
            for batch in rx {
                drop(batch);
            }
        });
        if spawned.is_err() {
            // No thread: the receiver is gone, so sends fail and garbage is freed inline below.
        }
        Mutex::new(tx)
    });
    let unsent = match sender.lock() {
        Ok(tx) => tx.send(garbage).err().map(|e| e.0),
        Err(_) => Some(garbage),
    };
    drop(unsent);
}

pub fn selected_db(ctx: Ctx) -> usize {
    // SAFETY: ctx is a live context.
    let db = unsafe { hot!(RedisModule_GetSelectedDb)(ctx) };
    usize::try_from(db).unwrap_or(0)
}

pub fn is_replica(ctx: Ctx) -> bool {
    // SAFETY: ctx is a live context.
    (unsafe { api!(RedisModule_GetContextFlags)(ctx) } & raw::REDISMODULE_CTX_FLAGS_SLAVE as c_int) != 0
}

fn is_loading(ctx: Ctx) -> bool {
    // SAFETY: ctx is a live context.
    (unsafe { api!(RedisModule_GetContextFlags)(ctx) } & raw::REDISMODULE_CTX_FLAGS_LOADING as c_int) != 0
}

/// The read-path check: is every tag of this entry still at the epoch it was attached under?
#[inline]
pub fn is_valid(entry: &Entry) -> bool {
    let tags = entry.tags();
    tags.is_empty() || REGISTRY.with(|r| r.try_borrow().is_ok_and(|r| r.is_valid(tags)))
}

/// For persistence: was this entry invalidated?
pub fn is_dead(tags: &Tags) -> bool {
    !tags.is_empty() && REGISTRY.with(|r| r.try_borrow().is_ok_and(|r| r.is_dead(tags)))
}

/// Indexes the entry stored at `key` in `db`; a dead one is queued for reclaim (on a master).
pub fn attach(ctx: Ctx, db: usize, key: &[u8], entry: &mut Entry) {
    if entry.tags().is_empty() {
        return;
    }
    let queued = timed(|r| match r.attach(db, key, entry.tags_mut()) {
        Attach::Live => false,
        Attach::Dead if is_replica(ctx) => false,
        Attach::Dead => {
            r.queue_key(db, key);
            true
        }
    });
    if queued == Some(true) {
        arm_reclaim(ctx);
    }
}

/// An overwrite with the same tags: the new entry takes the old one's place in the index (see
/// `Registry::carry_over`); then neither `detach` nor `attach` is needed.
pub fn carry_over(old: &Entry, new: &mut Entry) -> bool {
    if new.tags().is_empty() {
        // Untagged in, untagged out: nothing to take out of the index or put in.
        return old.tags().is_empty();
    }
    REGISTRY.with(|r| r.try_borrow().is_ok_and(|r| r.carry_over(old.tags(), new.tags_mut())))
}

/// The type's unlink callback: the entry leaves `key` in `db`.
pub fn detach(db: usize, key: &[u8], entry: &mut Entry) {
    if entry.tags().is_empty() {
        return;
    }
    timed(|r| r.detach(db, key, entry.tags_mut()));
}

pub fn index_stats() -> IndexStats {
    REGISTRY.with(|r| r.try_borrow().map(|r| r.stats()).unwrap_or_default())
}

/// TIERCACHE.INVALIDATE's effect on the index: returns the sum over the tags of the live entries indexed
/// under each (an entry under two of them counts twice), O(1) per tag.
pub fn invalidate(ctx: Ctx, tags: &[&[u8]]) -> usize {
    let db = selected_db(ctx);
    let master = !is_replica(ctx);
    let count = timed(|r| r.invalidate(db, tags, master)).unwrap_or(0);
    crate::cluster::record_invalidation(ctx, db, tags);
    crate::leases::tags_invalidated(db, tags);
    if master {
        arm_reclaim(ctx);
    }
    if !is_loading(ctx) {
        publish(ctx, db, tags);
    }
    count
}

// ---- invalidation messages ---------------------------------------------------------------------

fn run_id(ctx: Ctx) -> Vec<u8> {
    RUN_ID.with(|id| {
        id.borrow_mut()
            .get_or_insert_with(|| {
                // SAFETY: ctx is live; the info object is freed below and the field copied before that.
                unsafe {
                    let info = api!(RedisModule_GetServerInfo)(ctx, c"server".as_ptr());
                    if info.is_null() {
                        return Vec::new();
                    }
                    let field = api!(RedisModule_ServerInfoGetFieldC)(info, c"run_id".as_ptr());
                    let id = if field.is_null() { Vec::new() } else { CStr::from_ptr(field).to_bytes().to_vec() };
                    api!(RedisModule_FreeServerInfo)(ctx, info);
                    id
                }
            })
            .clone()
    })
}

fn publish(ctx: Ctx, db: usize, tags: &[&[u8]]) {
    send(ctx, |run_id, seq| tiercache_core::message::invalidation(run_id, seq, db as u64, tags));
}

/// Tells subscribers to drop everything they cached from this server (flush, full resync).
fn publish_reset(ctx: Ctx) {
    send(ctx, tiercache_core::message::reset);
}

fn send(ctx: Ctx, encode: impl FnOnce(&[u8], u64) -> Vec<u8>) {
    let channel = config::invalidation_channel();
    if channel.is_empty() {
        return;
    }
    let seq = SEQ.with(|s| {
        s.set(s.get() + 1);
        s.get()
    });
    let msg = encode(&run_id(ctx), seq);
    let (c, m) = (new_string(ctx, &channel), new_string(ctx, &msg));
    // SAFETY: live context and strings; PublishMessage copies what it sends.
    unsafe { api!(RedisModule_PublishMessage)(ctx, c, m) };
    free_string(ctx, c);
    free_string(ctx, m);
}

// ---- reclaim -----------------------------------------------------------------------------------

fn arm_reclaim(ctx: Ctx) {
    if TIMER_ARMED.with(Cell::get) {
        return;
    }
    if REGISTRY.with(|r| r.try_borrow().map(|r| r.reclaim_pending()).unwrap_or(0)) == 0 {
        return;
    }
    // SAFETY: live context; the callback takes no data.
    unsafe { api!(RedisModule_CreateTimer)(ctx, RECLAIM_PERIOD_MS, Some(reclaim_tick), std::ptr::null_mut()) };
    TIMER_ARMED.with(|a| a.set(true));
}

/// Deletes up to `tiercache.reclaim-budget` invalidated entries (and never runs longer than about a
/// millisecond), replicating each delete; re-arms itself while keys remain queued.
unsafe extern "C" fn reclaim_tick(ctx: Ctx, _data: *mut c_void) {
    TIMER_ARMED.with(|a| a.set(false));
    guard((), || {
        if is_replica(ctx) {
            // Replicas receive the master's deletes; a queue left from before a demotion is dropped.
            while timed(|r| !r.take_reclaim(4096).is_empty()) == Some(true) {}
            return;
        }
        let budget = config::RECLAIM_BUDGET.get().max(1) as usize;
        let started = Instant::now();
        let mut done = 0;
        let mut deleted: Vec<RStr> = Vec::new();
        while done < budget && started.elapsed() < RECLAIM_TICK_CAP {
            let batch = timed(|r| r.take_reclaim((budget - done).min(16))).unwrap_or_default();
            if batch.is_empty() {
                break;
            }
            done += batch.len();
            let _flag = ReclaimingFlag::set();
            for (db, key) in batch {
                if let Some(name) = reclaim_one(ctx, db, &key) {
                    deleted.push(name);
                }
            }
        }
        replicate_dels(ctx, &deleted);
        stats::RECLAIM_TICKS.bump();
        stats::RECLAIM_MAX_TICK_US.at_least(started.elapsed().as_micros() as u64);
        arm_reclaim(ctx);
    });
}

/// One DEL per database touched in this tick, instead of one per key (each RM_Replicate looks the
/// command up by name).
fn replicate_dels(ctx: Ctx, deleted: &[RStr]) {
    // Keys were collected in database order (take_reclaim drains db by db); DEL goes to the db selected
    // when it is replicated, so flush a batch whenever the db changes.
    let mut start = 0;
    while start < deleted.len() {
        let db = DB_OF.with(|d| d.borrow()[start]);
        let mut end = start;
        while end < deleted.len() && DB_OF.with(|d| d.borrow()[end]) == db {
            end += 1;
        }
        // SAFETY: live timer context; the db came from the index; "v" takes an array of strings and its
        // length, which Redis retains as needed.
        unsafe {
            api!(RedisModule_SelectDb)(ctx, db as c_int);
            api!(RedisModule_Replicate)(ctx, c"DEL".as_ptr(), c"v".as_ptr(), deleted[start..end].as_ptr(), end - start);
        }
        start = end;
    }
    for &name in deleted {
        free_string(ctx, name);
    }
    DB_OF.with(|d| d.borrow_mut().clear());
}

/// Deletes `key` in `db` if it still holds an invalidated entry; returns its name (to replicate, then
/// free) when it did.
fn reclaim_one(ctx: Ctx, db: usize, key: &[u8]) -> Option<RStr> {
    // SAFETY: live timer context; the db id came from the index.
    if unsafe { api!(RedisModule_SelectDb)(ctx, db as c_int) } != OK {
        return None;
    }
    let name = new_string(ctx, key);
    let mut k = WriteKey::open(ctx, name);
    let dead = match k.slot() {
        Slot::Entry(e) => !e.tags().is_empty() && !is_valid(e),
        _ => false,
    };
    if dead && k.delete() {
        drop(k);
        // SAFETY: live context and key name.
        unsafe { hot!(RedisModule_NotifyKeyspaceEvent)(ctx, raw::REDISMODULE_NOTIFY_GENERIC, c"del".as_ptr(), name) };
        stats::RECLAIMED.bump();
        DB_OF.with(|d| d.borrow_mut().push(db));
        return Some(name);
    }
    drop(k);
    free_string(ctx, name);
    None
}

// ---- events ------------------------------------------------------------------------------------

/// Keyspace events: an entry that arrives under a (new) name is indexed there.
unsafe extern "C" fn on_keyspace(ctx: Ctx, _type: c_int, event: *const c_char, key: RStr) -> c_int {
    guard(OK, || {
        if event.is_null() {
            return OK;
        }
        // SAFETY: Redis passes a NUL-terminated event name.
        let ev = unsafe { CStr::from_ptr(event) }.to_bytes();
        match ev {
            b"loaded" | b"restore" | b"rename_to" | b"move_to" | b"copy_to" => {
                let db = selected_db(ctx);
                let name = bytes(key);
                // The "loaded" event passes a key object on Redis's stack, which OpenKey must not retain:
                // open a copy.
                let owned = new_string(ctx, name);
                keys::with_entry_mut(ctx, owned, |e| {
                    // Cluster: a migrated entry whose tag was invalidated here moments ago may predate
                    // that invalidation (see `tiercache_core::cluster`): it arrives invalidated.
                    if ev == b"restore" && crate::cluster::invalidated_recently(ctx, db, e.tags().iter()) {
                        e.tags_mut().set_epochs(|_, _| DEAD);
                    }
                    attach(ctx, db, name, e)
                });
                free_string(ctx, owned);
                if ev != b"loaded" {
                    crate::leases::key_changed(db, name);
                }
            }
            // Deleted or moved away by a client: a fill lease there is fenced. Expiry and eviction are
            // not (a stale entry running out while its refresh is loading must not refuse the refresh).
            // Every DEL in the server lands here: with no lease outstanding (the usual case) it costs one
            // thread-local check and nothing else.
            b"del" | b"rename_from" | b"move_from" if crate::leases::any() => {
                crate::leases::key_changed(selected_db(ctx), bytes(key))
            }
            _ => {}
        }
        OK
    })
}

unsafe extern "C" fn on_server_event(ctx: Ctx, eid: raw::RedisModuleEvent, sub: u64, data: *mut c_void) {
    guard((), || match eid.id {
        raw::REDISMODULE_EVENT_FLUSHDB if sub == raw::REDISMODULE_SUBEVENT_FLUSHDB_START => {
            // SAFETY: Redis passes a RedisModuleFlushInfo for this event.
            let info = unsafe { &*data.cast::<raw::RedisModuleFlushInfo>() };
            let db = usize::try_from(info.dbnum).ok();
            timed(|r| r.flush(db));
            crate::leases::flushed(db);
            if !is_loading(ctx) {
                publish_reset(ctx);
            }
        }
        raw::REDISMODULE_EVENT_LOADING => match sub {
            raw::REDISMODULE_SUBEVENT_LOADING_REPL_START => REPL_LOADING.with(|f| f.set(true)),
            raw::REDISMODULE_SUBEVENT_LOADING_ENDED if REPL_LOADING.with(|f| f.replace(false)) => {
                // A replica's full resync may carry invalidations it never published.
                publish_reset(ctx);
            }
            _ => {}
        },
        raw::REDISMODULE_EVENT_SWAPDB => {
            // SAFETY: Redis passes a RedisModuleSwapDbInfo for this event.
            let info = unsafe { &*data.cast::<raw::RedisModuleSwapDbInfo>() };
            if let (Ok(a), Ok(b)) = (usize::try_from(info.dbnum_first), usize::try_from(info.dbnum_second)) {
                timed(|r| r.swap(a, b));
            }
        }
        raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED => {
            // Either way, something may read what this node propagates now (its backlog, new replicas).
            crate::propagation::listened(ctx);
            if sub == raw::REDISMODULE_EVENT_REPLROLECHANGED_NOW_MASTER {
                // A promoted replica never queued invalidated entries: find them now.
                index_everything(ctx);
            }
        }
        _ => {}
    })
}

unsafe extern "C" fn scan_one(ctx: Ctx, name: RStr, key: *mut raw::RedisModuleKey, _p: *mut c_void) {
    guard((), || {
        if key.is_null() {
            return;
        }
        let db = selected_db(ctx);
        let n = bytes(name);
        // SAFETY: RM_Scan passes an open key handle valid for this callback.
        unsafe { keys::with_open_entry_mut(key, |e| attach(ctx, db, n, e)) };
    })
}

/// Attaches every entry of every database (idempotent for entries already indexed) and queues the dead
/// ones. O(keys): runs only when a replica is promoted.
fn index_everything(ctx: Ctx) {
    // SAFETY: live context; every db is selected in turn and the original restored; each cursor is
    // destroyed after its scan.
    unsafe {
        let original = hot!(RedisModule_GetSelectedDb)(ctx);
        let mut db = 0;
        while api!(RedisModule_SelectDb)(ctx, db) == OK {
            let cursor = api!(RedisModule_ScanCursorCreate)();
            while api!(RedisModule_Scan)(ctx, cursor, Some(scan_one), std::ptr::null_mut()) != 0 {}
            api!(RedisModule_ScanCursorDestroy)(cursor);
            db += 1;
        }
        api!(RedisModule_SelectDb)(ctx, original);
    }
}

/// Subscribes to the events above; call from OnLoad.
pub fn register(ctx: Ctx) -> bool {
    // SAFETY: OnLoad context; callbacks are valid extern fns for the module's lifetime.
    unsafe {
        let mask = raw::REDISMODULE_NOTIFY_GENERIC | raw::REDISMODULE_NOTIFY_LOADED;
        if api!(RedisModule_SubscribeToKeyspaceEvents)(ctx, mask, Some(on_keyspace)) != OK {
            log(ctx, "warning", "tiercache: cannot subscribe to keyspace events");
            return false;
        }
        for id in [
            raw::REDISMODULE_EVENT_FLUSHDB,
            raw::REDISMODULE_EVENT_SWAPDB,
            raw::REDISMODULE_EVENT_LOADING,
            raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED,
        ] {
            let ev = raw::RedisModuleEvent { id, dataver: 1 };
            if api!(RedisModule_SubscribeToServerEvent)(ctx, ev, Some(on_server_event)) != OK {
                log(ctx, "warning", &format!("tiercache: cannot subscribe to server event {id}"));
                return false;
            }
        }
    }
    true
}

/// Raises [`reclaiming`] until dropped (also on unwinding).
struct ReclaimingFlag;

impl ReclaimingFlag {
    fn set() -> Self {
        RECLAIMING.with(|r| r.set(true));
        ReclaimingFlag
    }
}

impl Drop for ReclaimingFlag {
    fn drop(&mut self) {
        RECLAIMING.with(|r| r.set(false));
    }
}

/// True while the reclaim timer deletes invalidated entries.
pub fn reclaiming() -> bool {
    RECLAIMING.with(Cell::get)
}

/// Messages published so far (the last sequence number).
pub fn published() -> u64 {
    SEQ.with(Cell::get)
}
