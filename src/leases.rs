//! The module's side of fill leases (`tiercache_core::lease`): the lease table (main-thread state),
//! parked waiters as Redis blocked clients, the expiry timers, hand-off on expiry, release and holder
//! disconnect, and the wake-ups that answer a parked read.
//!
//! Every blocked client is unblocked exactly once, and every parked read gets exactly one reply. The
//! WAIT deadline is a module timer, not Redis's block timeout: Redis 7.0 runs block timeouts before it
//! replies to clients a module unblocked in the same event-loop iteration, and then drops that reply, so
//! a fill landing just as the deadline passed left the reader with no answer at all. Here every ending
//! (fill, hand-off, pass, flush, deadline) is an `UnblockClient` with the reply to send, and only a
//! disconnect ends a parked read without one. Whoever takes a waiter out of the table stops its timer;
//! leases likewise stop their expiry timer when they end early, so no timer outlives what it guards.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use redis_module::raw;
use tiercache_core::lease::{Acquire, Handoff, Lease, LeaseTable, Waiter};
use tiercache_core::Entry;

use crate::ffi::{api, guard, now_ms, Ctx, RStr, OK};
use crate::reply;
use crate::stats;

type Bc = *mut raw::RedisModuleBlockedClient;

/// The shape of a lease read's reply: `[status, value, token]`, then the encoding with ENCODED, then
/// the fresh time left with WITHTTL.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    pub encoded: bool,
    pub with_ttl: bool,
}

/// A read parked on a lease.
pub struct Parked {
    bc: Bc,
    client: u64,
    encoded: Shape,
    lease_ms: i64,
    /// The timer of its WAIT deadline.
    timer: raw::RedisModuleTimerID,
}

impl Waiter for Parked {
    fn client(&self) -> u64 {
        self.client
    }
}

/// How a parked read is answered (and whether it asked for ENCODED).
struct WakeMsg {
    how: Wake,
    encoded: Shape,
}

enum Wake {
    /// The fill landed: `[HIT, value, nil]`.
    Hit(Rc<Entry>),
    /// The caller now holds the lease: `[FILL, nil, token]`.
    Fill(u64),
    /// The loader said the value is not to be cached: `[PASS, nil, nil]`.
    Pass,
    /// The WAIT deadline passed: `[BUSY, nil, nil]`.
    Busy,
}

/// Where a parked read waits, and who it is.
struct ParkedAt {
    db: usize,
    key: Box<[u8]>,
    client: u64,
}

/// See [`none_held`]. A plain static (the module runs on the main thread): a thread-local in a shared
/// object costs a `__tls_get_addr` call on every write.
static HELD: AtomicBool = AtomicBool::new(false);

thread_local! {
    static TABLE: RefCell<LeaseTable<Parked>> = RefCell::new(LeaseTable::new(random_token));
    /// Where each parked client waits: blocked-client handle -> (db, key, client).
    static PARKED_AT: RefCell<HashMap<usize, ParkedAt>> = RefCell::new(HashMap::new());
    /// The parked read of each client (a client runs one command at a time, so at most one).
    static PARKED_BY: RefCell<HashMap<u64, usize>> = RefCell::new(HashMap::new());
    /// A context of this module for stopping timers outside a command (a detached thread-safe context
    /// carries the module, which is all `StopTimer` checks); made at load.
    static TIMER_CTX: Cell<Ctx> = const { Cell::new(std::ptr::null_mut()) };
    static RNG: Cell<u64> = Cell::new(seed() | 1);
    /// Timers of ours not yet fired or stopped (lease expiries and WAIT deadlines).
    static TIMERS: Cell<usize> = const { Cell::new(0) };
}

fn timer_armed() {
    TIMERS.with(|t| t.set(t.get() + 1));
}

fn timer_gone() {
    TIMERS.with(|t| t.set(t.get().saturating_sub(1)));
}

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0x1234_5678, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32)
}

/// A lease token from Redis's cryptographic random bytes (SHA-256 counter mode, seeded from
/// /dev/urandom at start): one token tells nothing about any other.
fn random_token() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes exactly 8 bytes into `b`.
    unsafe { api!(RedisModule_GetRandomBytes)(b.as_mut_ptr(), b.len()) };
    u64::from_le_bytes(b)
}

/// A uniform number in (0, 1] for XFetch.
pub fn random_unit() -> f64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.set(x);
        ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    })
}

fn with<R>(f: impl FnOnce(&mut LeaseTable<Parked>) -> R) -> Option<R> {
    TABLE.with(|t| {
        t.try_borrow_mut().ok().map(|mut t| {
            // Held until shown otherwise: should `f` unwind, the fast path stays off.
            HELD.store(true, Relaxed);
            let r = f(&mut t);
            HELD.store(!t.is_empty(), Relaxed);
            r
        })
    })
}

/// Whether any lease is held, as the table stood after the last [`with`] (its only mutable access): a
/// write of a key without a lease (most) looks no further.
#[inline]
pub fn none_held() -> bool {
    !HELD.load(Relaxed)
}

/// True when any lease is outstanding.
#[inline]
pub fn any() -> bool {
    TABLE.with(|t| t.try_borrow().map_or(true, |t| !t.is_empty()))
}

/// Gauges: leases held, parked readers, pending timers.
pub fn stats() -> (usize, usize, usize) {
    let (leases, waiting) = TABLE.with(|t| t.try_borrow().map(|t| (t.len(), t.waiting())).unwrap_or_default());
    (leases, waiting, TIMERS.with(Cell::get))
}

fn client_id(ctx: Ctx) -> u64 {
    // SAFETY: live command context.
    unsafe { api!(RedisModule_GetClientId)(ctx) }
}

/// Blocking is refused inside MULTI, Lua and wherever Redis denies it.
pub fn may_block(ctx: Ctx) -> bool {
    let deny =
        (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA | raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING) as c_int;
    // SAFETY: live command context.
    (unsafe { api!(RedisModule_GetContextFlags)(ctx) } & deny) == 0
}

// ---- replies -----------------------------------------------------------------------------------

fn token_text(token: u64) -> String {
    token.to_string()
}

/// `[status, value, token]`, + encoding with ENCODED, + fresh time left (ms; -1 no deadline, 0 stale,
/// nil without a value) with WITHTTL.
pub fn reply_lease(ctx: Ctx, status: &str, value: Option<&Entry>, token: Option<u64>, shape: Shape) -> c_int {
    let encoded = shape.encoded;
    reply::array(ctx, 3 + usize::from(shape.encoded) + usize::from(shape.with_ttl));
    reply::bulk(ctx, status.as_bytes());
    match value {
        Some(e) if encoded => {
            reply::bulk(ctx, e.stored());
        }
        Some(e) => match e.value() {
            Ok(v) => {
                reply::bulk(ctx, &v);
            }
            Err(_) => {
                reply::null(ctx);
            }
        },
        None => {
            reply::null(ctx);
        }
    }
    match token {
        Some(t) => reply::bulk(ctx, token_text(t).as_bytes()),
        None => reply::null(ctx),
    };
    if encoded {
        match value {
            Some(e) => reply::bulk(ctx, e.encoding().name().as_bytes()),
            None => reply::null(ctx),
        };
    }
    if shape.with_ttl {
        match value {
            Some(e) => reply::int(ctx, e.fresh_ttl_ms(now_ms())),
            None => reply::null(ctx),
        };
    }
    OK
}

// ---- granting ----------------------------------------------------------------------------------

/// Tries to take the lease on `key` for the caller; arms its expiry timer when granted.
pub fn acquire(ctx: Ctx, db: usize, key: &[u8], lease_ms: i64) -> Acquire {
    let client = client_id(ctx);
    let got = with(|t| t.acquire(db, key, client, now_ms(), lease_ms)).unwrap_or(Acquire::Busy);
    if let Acquire::Granted(token) = got {
        stats::LEASES_GRANTED.bump();
        arm_expiry(ctx, db, key, token, lease_ms);
    }
    got
}

/// Parks the caller until the lease on `key` ends or `wait_ms` passes.
pub fn park(ctx: Ctx, db: usize, key: &[u8], wait_ms: i64, lease_ms: i64, encoded: Shape) -> c_int {
    // No block timeout (0): the deadline is our timer, so that every ending goes through
    // UnblockClient with its reply (see the module docs above). The timeout callback still serves
    // `CLIENT UNBLOCK`.
    // SAFETY: live command context, blocking allowed (checked by the caller); the callbacks are valid
    // extern fns; Redis owns the handle until we unblock it, exactly once.
    let bc = unsafe { api!(RedisModule_BlockClient)(ctx, Some(on_wake), Some(on_client_unblock), Some(free_wake), 0) };
    if bc.is_null() {
        return reply_lease(ctx, "BUSY", None, None, encoded);
    }
    // SAFETY: live context; the timer's data is the handle itself (no allocation): the timer is
    // stopped by whoever unblocks the handle first, so it never fires for a handle Redis freed.
    let timer = unsafe { api!(RedisModule_CreateTimer)(ctx, wait_ms, Some(wait_expired), bc.cast()) };
    timer_armed();
    let client = client_id(ctx);
    let parked = Parked { bc, client, encoded, lease_ms, timer };
    match with(|t| t.park(db, key, parked)) {
        Some(Ok(())) => {
            PARKED_AT.with(|p| p.borrow_mut().insert(bc as usize, ParkedAt { db, key: Box::from(key), client }));
            PARKED_BY.with(|p| p.borrow_mut().insert(client, bc as usize));
            // SAFETY: bc is the handle just created and not yet unblocked.
            unsafe { api!(RedisModule_SetDisconnectCallback)(bc, Some(on_disconnect)) };
            stats::WAITERS_PARKED.bump();
        }
        Some(Err(w)) => {
            // The lease vanished in between (cannot happen on one thread, but never leave bc blocked).
            finish(w, Some(Wake::Pass), false);
        }
        None => {
            stop_timer(timer);
            // SAFETY: bc was never parked, so this is its one unblock; the reply is PASS.
            unsafe { api!(RedisModule_UnblockClient)(bc, Box::into_raw(Box::new(WakeMsg { how: Wake::Pass, encoded })).cast()) };
        }
    }
    OK
}

/// Stops a timer of ours and returns its data (null if it already fired or never existed).
fn stop_timer(id: raw::RedisModuleTimerID) -> *mut c_void {
    let ctx = TIMER_CTX.with(Cell::get);
    let mut data: *mut c_void = std::ptr::null_mut();
    if !ctx.is_null() {
        // SAFETY: TIMER_CTX is this module's detached context, alive for the module's life; StopTimer
        // only looks the id up and hands back its data when the timer is ours and still pending.
        if unsafe { api!(RedisModule_StopTimer)(ctx, id, &mut data) } != OK {
            return std::ptr::null_mut();
        }
        timer_gone();
    }
    data
}

/// Ends a parked read that has just left the table: stops its deadline timer (unless that timer is what
/// fired), forgets where it waited, and unblocks it, with `how` as its one reply (`None`: it is
/// disconnecting and gets none).
fn finish(w: Parked, how: Option<Wake>, timer_fired: bool) {
    if !timer_fired {
        stop_timer(w.timer);
    }
    let removed = PARKED_AT.with(|p| p.borrow_mut().remove(&(w.bc as usize)));
    if let Some(at) = removed {
        PARKED_BY.with(|p| {
            let mut p = p.borrow_mut();
            if p.get(&at.client) == Some(&(w.bc as usize)) {
                p.remove(&at.client);
            }
        });
    }
    let data = match how {
        Some(how) => {
            match how {
                Wake::Busy => stats::WAIT_TIMEOUTS.bump(),
                _ => stats::WAITERS_WOKEN.bump(),
            }
            Box::into_raw(Box::new(WakeMsg { how, encoded: w.encoded })).cast()
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: the handle was just taken out of the table, so this is its one unblock; Redis passes
    // `data` to on_wake (unless the client is gone) and then to free_wake, which reclaims the box.
    unsafe { api!(RedisModule_UnblockClient)(w.bc, data) };
}

/// Answers every waiter of a filled lease with the new entry.
fn wake_all_hit(waiters: impl IntoIterator<Item = Parked>, entry: &Entry) {
    let mut shared: Option<Rc<Entry>> = None;
    for w in waiters {
        let e = shared.get_or_insert_with(|| Rc::from(entry.to_boxed())).clone();
        finish(w, Some(Wake::Hit(e)), false);
    }
}

/// A lease ended without a value: its first waiter holds a new one, or it is gone. The old lease's
/// expiry timer must already be stopped (see [`ended`]).
fn hand_off(ctx: Ctx, db: usize, key: &[u8], lease: Lease<Parked>) {
    let lease_ms = lease.waiters.front().map_or(0, |w| w.lease_ms);
    let handoff = with(|t| t.hand_off(db, key, lease, now_ms(), lease_ms)).flatten();
    if let Some(Handoff { waiter, token }) = handoff {
        stats::HANDOFFS.bump();
        stats::LEASES_GRANTED.bump();
        arm_expiry(ctx, db, key, token, lease_ms);
        finish(waiter, Some(Wake::Fill(token)), false);
    }
}

/// A lease left the table before its deadline: its expiry timer (and the key copy it holds) goes now.
fn ended(lease: Lease<Parked>) -> Lease<Parked> {
    let data = stop_timer(lease.timer);
    if !data.is_null() {
        // SAFETY: the data of a lease expiry timer is the Box<Expiry> made in arm_expiry; the timer
        // was stopped, so it will never hand it to lease_expired.
        drop(unsafe { Box::from_raw(data.cast::<Expiry>()) });
    }
    lease
}

// ---- fills, releases, fencing --------------------------------------------------------------------

/// Checks a `SET ... LEASE token` before anything is stored. On success the lease is taken out and
/// returned with the fill's duration; the caller stores the entry, then calls [`filled`].
pub fn begin_fill(ctx: Ctx, db: usize, key: &[u8], token: u64, tags: &[&[u8]]) -> Result<(Lease<Parked>, i64), &'static str> {
    let now = now_ms();
    match with(|t| t.fill(db, key, token, tags, now)) {
        Some(Ok((lease, took))) => Ok((ended(lease), took)),
        Some(Err(fence)) => {
            stats::FENCED.bump();
            // A lease whose fill is refused for a change it missed ends now: hand it to a waiter, who
            // will load fresh data.
            if let Some(lease) = with(|t| t.release(db, key, token, now)).flatten() {
                hand_off(ctx, db, key, ended(lease));
            }
            Err(fence.message())
        }
        None => Err("ERR tiercache lease table busy"),
    }
}

/// The fill could not be stored after all: the lease goes to a waiter.
pub fn abort_fill(ctx: Ctx, db: usize, key: &[u8], lease: Lease<Parked>) {
    hand_off(ctx, db, key, lease);
}

/// The fill was stored: wake the lease's waiters with it.
pub fn filled(lease: Lease<Parked>, entry: &Entry) {
    wake_all_hit(lease.waiters, entry);
}

/// Another writer stored a value at `key`: a lease there is fenced, and its waiters get the value now.
pub fn written_by_other(db: usize, key: &[u8], entry: &Entry) {
    if none_held() {
        return;
    }
    let waiters = with(|t| {
        if t.is_empty() {
            return None;
        }
        t.key_changed(db, key);
        let mut out = Vec::new();
        while let Some(w) = t.unpark(db, key, |_| true) {
            out.push(w);
        }
        Some(out)
    })
    .flatten()
    .unwrap_or_default();
    wake_all_hit(waiters, entry);
}

/// The key was deleted, renamed over, restored...: a lease there is fenced. Not while the reclaim timer
/// deletes invalidated entries: that changes nothing readers could see (a lease granted after the
/// invalidation must still be able to fill).
pub fn key_changed(db: usize, key: &[u8]) {
    if none_held() || crate::tagindex::reclaiming() {
        return;
    }
    with(|t| {
        if !t.is_empty() {
            t.key_changed(db, key)
        }
    });
}

pub fn tags_invalidated(db: usize, tags: &[&[u8]]) {
    with(|t| t.tags_invalidated(db, tags));
}

/// `TIERCACHE.RELEASE key token [PASS]`: true if the token held the lease.
pub fn release(ctx: Ctx, db: usize, key: &[u8], token: u64, pass: bool) -> bool {
    let Some(lease) = with(|t| t.release(db, key, token, now_ms())).flatten() else { return false };
    let lease = ended(lease);
    if pass {
        stats::PASSES.bump();
        for w in lease.waiters {
            finish(w, Some(Wake::Pass), false);
        }
    } else {
        hand_off(ctx, db, key, lease);
    }
    true
}

// ---- timers and events ---------------------------------------------------------------------------

struct Expiry {
    db: usize,
    key: Box<[u8]>,
    token: u64,
}

fn arm_expiry(ctx: Ctx, db: usize, key: &[u8], token: u64, lease_ms: i64) {
    let data = Box::into_raw(Box::new(Expiry { db, key: Box::from(key), token }));
    // SAFETY: live context; the timer hands `data` back to lease_expired exactly once, which frees
    // it, unless `ended` stops the timer first and frees it there.
    let id = unsafe { api!(RedisModule_CreateTimer)(ctx, lease_ms, Some(lease_expired), data.cast()) };
    timer_armed();
    with(|t| t.set_timer(db, key, token, id));
}

unsafe extern "C" fn lease_expired(ctx: Ctx, data: *mut c_void) {
    timer_gone();
    guard((), || {
        // SAFETY: `data` is the Box<Expiry> made in arm_expiry, handed back once (the timer fired, so
        // `ended` can no longer stop it and free the box).
        let exp = unsafe { Box::from_raw(data.cast::<Expiry>()) };
        if let Some(lease) = with(|t| t.expire(exp.db, &exp.key, exp.token, now_ms())).flatten() {
            stats::LEASE_TIMEOUTS.bump();
            hand_off(ctx, exp.db, &exp.key, lease);
        }
    })
}

/// A client disconnected: its own parked read (if any) leaves first — Redis may announce the
/// disconnect before it unblocks that read, and a lease must never be handed to a dying reader — then
/// the leases it held go to their first (live) waiters at once.
pub fn client_gone(ctx: Ctx, client: u64) {
    if let Some(bc) = PARKED_BY.with(|p| p.borrow().get(&client).copied()) {
        if let Some(w) = unpark(bc as Bc) {
            finish(w, None, false);
        }
    }
    let gone = with(|t| if t.is_empty() { Vec::new() } else { t.client_gone(client) }).unwrap_or_default();
    for (db, key, lease) in gone {
        hand_off(ctx, db, &key, ended(lease));
    }
}

/// FLUSHDB (`Some(db)`) / FLUSHALL or a full resync (`None`): the leases there end; their waiters get
/// PASS (load from the origin, do not cache: the dataset they waited on is gone).
pub fn flushed(db: Option<usize>) {
    let all = with(|t| t.drain(db)).unwrap_or_default();
    for (_, _, lease) in all {
        for w in ended(lease).waiters {
            finish(w, Some(Wake::Pass), false);
        }
    }
}

/// Takes a parked read out of the table by its handle (its bookkeeping goes in [`finish`]).
fn unpark(bc: Bc) -> Option<Parked> {
    let (db, key) = PARKED_AT.with(|p| p.borrow().get(&(bc as usize)).map(|at| (at.db, at.key.clone())))?;
    with(|t| t.unpark(db, &key, |w| w.bc == bc)).flatten()
}

/// The WAIT deadline of a parked read: it is answered BUSY. Every other ending stops this timer first.
unsafe extern "C" fn wait_expired(_ctx: Ctx, data: *mut c_void) {
    timer_gone();
    guard((), || {
        if let Some(w) = unpark(data.cast()) {
            finish(w, Some(Wake::Busy), true);
        }
    })
}

unsafe extern "C" fn on_wake(ctx: Ctx, _argv: *mut RStr, _argc: c_int) -> c_int {
    guard(OK, || {
        // SAFETY: in a reply callback, the private data is the Box<WakeMsg> given to UnblockClient.
        let msg = unsafe { api!(RedisModule_GetBlockedClientPrivateData)(ctx).cast::<WakeMsg>().as_ref() };
        match msg {
            Some(WakeMsg { how: Wake::Hit(e), encoded }) => reply_lease(ctx, "HIT", Some(e), None, *encoded),
            Some(WakeMsg { how: Wake::Fill(token), encoded }) => reply_lease(ctx, "FILL", None, Some(*token), *encoded),
            Some(WakeMsg { how: Wake::Pass, encoded }) => reply_lease(ctx, "PASS", None, None, *encoded),
            Some(WakeMsg { how: Wake::Busy, encoded }) => reply_lease(ctx, "BUSY", None, None, *encoded),
            None => reply_lease(ctx, "PASS", None, None, Shape::default()),
        }
    })
}

/// `CLIENT UNBLOCK id [TIMEOUT]` of a parked read (Redis never times our blocks out itself): BUSY, as at
/// the deadline. (`CLIENT UNBLOCK id ERROR` replies itself and ends the read through `on_disconnect`.)
unsafe extern "C" fn on_client_unblock(ctx: Ctx, _argv: *mut RStr, _argc: c_int) -> c_int {
    guard(OK, || {
        // SAFETY: in a timeout callback, GetBlockedClientHandle returns this client's handle.
        let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
        let shape = match unpark(bc) {
            Some(w) => {
                let shape = w.encoded;
                stats::WAIT_TIMEOUTS.bump();
                finish(w, None, false);
                shape
            }
            None => Shape::default(),
        };
        reply_lease(ctx, "BUSY", None, None, shape)
    })
}

unsafe extern "C" fn on_disconnect(_ctx: Ctx, bc: Bc) {
    guard((), || {
        if let Some(w) = unpark(bc) {
            finish(w, None, false);
        }
    })
}

unsafe extern "C" fn free_wake(_ctx: Ctx, data: *mut c_void) {
    guard((), || {
        if !data.is_null() {
            // SAFETY: `data` is the Box<WakeMsg> made in finish() or park(), freed once here.
            drop(unsafe { Box::from_raw(data.cast::<WakeMsg>()) });
        }
    })
}

/// Subscribes to client disconnects and makes the timer context; call from OnLoad.
pub fn register(ctx: Ctx) -> bool {
    // SAFETY: OnLoad context; the detached context lives as long as the module (never freed: a module
    // with a data type cannot be unloaded).
    TIMER_CTX.with(|c| c.set(unsafe { api!(RedisModule_GetDetachedThreadSafeContext)(ctx) }));
    let ev = raw::RedisModuleEvent { id: raw::REDISMODULE_EVENT_CLIENT_CHANGE, dataver: 1 };
    // SAFETY: OnLoad context; the callback is a valid extern fn.
    unsafe { api!(RedisModule_SubscribeToServerEvent)(ctx, ev, Some(on_client_change)) == OK }
}

unsafe extern "C" fn on_client_change(ctx: Ctx, _eid: raw::RedisModuleEvent, sub: u64, data: *mut c_void) {
    guard((), || {
        if sub == raw::REDISMODULE_SUBEVENT_CLIENT_CHANGE_DISCONNECTED && !data.is_null() {
            // SAFETY: Redis passes a RedisModuleClientInfo for this event.
            let id = unsafe { &*data.cast::<raw::RedisModuleClientInfo>() }.id;
            client_gone(ctx, id);
        }
    })
}
