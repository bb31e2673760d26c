//! The module's side of fill leases (`tiercache_core::lease`): the lease table (main-thread state),
//! parked waiters as Redis blocked clients, the expiry timers, hand-off on expiry, release and holder
//! disconnect, and the wake-ups that answer a parked read.
//!
//! Every blocked client is unblocked exactly once: by a fill, a pass or a hand-off (with a reply), or in
//! its own timeout or disconnect callback (without one), and it leaves the table at that moment.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::rc::Rc;

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
}

thread_local! {
    static TABLE: RefCell<LeaseTable<Parked>> = RefCell::new(LeaseTable::new(seed()));
    /// Where each parked client waits: blocked-client handle -> (db, key).
    static PARKED_AT: RefCell<HashMap<usize, (usize, Box<[u8]>)>> = RefCell::new(HashMap::new());
    static RNG: Cell<u64> = Cell::new(seed() | 1);
}

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0x1234_5678, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32)
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
    TABLE.with(|t| t.try_borrow_mut().ok().map(|mut t| f(&mut t)))
}

pub fn stats() -> (usize, usize) {
    TABLE.with(|t| t.try_borrow().map(|t| (t.len(), t.waiting())).unwrap_or_default())
}

fn client_id(ctx: Ctx) -> u64 {
    // SAFETY: live command context.
    unsafe { api!(RedisModule_GetClientId)(ctx) }
}

/// Blocking is refused inside MULTI, Lua and wherever Redis denies it.
pub fn may_block(ctx: Ctx) -> bool {
    let deny = (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA | raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING) as c_int;
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
    // SAFETY: live command context, blocking allowed (checked by the caller); the callbacks are valid
    // extern fns; Redis owns the handle until we unblock it, exactly once.
    let bc = unsafe { api!(RedisModule_BlockClient)(ctx, Some(on_wake), Some(on_timeout), Some(free_wake), wait_ms) };
    if bc.is_null() {
        return reply_lease(ctx, "BUSY", None, None, encoded);
    }
    let parked = Parked { bc, client: client_id(ctx), encoded, lease_ms };
    match with(|t| t.park(db, key, parked)) {
        Some(Ok(())) => {
            PARKED_AT.with(|p| p.borrow_mut().insert(bc as usize, (db, Box::from(key))));
            // SAFETY: bc is the handle just created and not yet unblocked.
            unsafe { api!(RedisModule_SetDisconnectCallback)(bc, Some(on_disconnect)) };
            stats::WAITERS_PARKED.bump();
        }
        _ => {
            // The lease vanished in between (cannot happen on one thread, but never leave bc blocked).
            wake(bc, Wake::Pass, encoded);
        }
    }
    OK
}

fn wake(bc: Bc, how: Wake, encoded: Shape) {
    PARKED_AT.with(|p| p.borrow_mut().remove(&(bc as usize)));
    let data = Box::into_raw(Box::new(WakeMsg { how, encoded }));
    // SAFETY: bc is a blocked handle we have not unblocked yet (it was just taken out of the table);
    // Redis passes `data` to on_wake and then to free_wake, which reclaims the box.
    unsafe { api!(RedisModule_UnblockClient)(bc, data.cast()) };
    stats::WAITERS_WOKEN.bump();
}

/// Answers every waiter of a filled lease with the new entry.
fn wake_all_hit(lease: Lease<Parked>, entry: &Entry) {
    if lease.waiters.is_empty() {
        return;
    }
    let shared = Rc::new(entry.clone());
    for w in lease.waiters {
        wake(w.bc, Wake::Hit(shared.clone()), w.encoded);
    }
}

/// A lease ended without a value: its first waiter holds a new one, or it is gone.
fn hand_off(ctx: Ctx, db: usize, key: &[u8], lease: Lease<Parked>) {
    let lease_ms = lease.waiters.front().map_or(0, |w| w.lease_ms);
    let handoff = with(|t| t.hand_off(db, key, lease, now_ms(), lease_ms)).flatten();
    if let Some(Handoff { waiter, token }) = handoff {
        stats::HANDOFFS.bump();
        stats::LEASES_GRANTED.bump();
        arm_expiry(ctx, db, key, token, lease_ms);
        wake(waiter.bc, Wake::Fill(token), waiter.encoded);
    }
}

// ---- fills, releases, fencing --------------------------------------------------------------------

/// Checks a `SET ... LEASE token` before anything is stored. On success the lease is taken out and
/// returned with the fill's duration; the caller stores the entry, then calls [`filled`].
pub fn begin_fill(ctx: Ctx, db: usize, key: &[u8], token: u64, tags: &[&[u8]]) -> Result<(Lease<Parked>, i64), &'static str> {
    let now = now_ms();
    match with(|t| t.fill(db, key, token, tags, now)) {
        Some(Ok(done)) => Ok(done),
        Some(Err(fence)) => {
            stats::FENCED.bump();
            // A lease whose fill is refused for a change it missed ends now: hand it to a waiter, who
            // will load fresh data.
            if let Some(lease) = with(|t| t.release(db, key, token, now)).flatten() {
                hand_off(ctx, db, key, lease);
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
    wake_all_hit(lease, entry);
}

/// Another writer stored a value at `key`: a lease there is fenced, and its waiters get the value now.
pub fn written_by_other(db: usize, key: &[u8], entry: &Entry) {
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
    if !waiters.is_empty() {
        let shared = Rc::new(entry.clone());
        for w in waiters {
            wake(w.bc, Wake::Hit(shared.clone()), w.encoded);
        }
    }
}

/// The key was deleted, renamed over, restored...: a lease there is fenced. Not while the reclaim timer
/// deletes invalidated entries: that changes nothing readers could see (a lease granted after the
/// invalidation must still be able to fill).
pub fn key_changed(db: usize, key: &[u8]) {
    if crate::tagindex::reclaiming() {
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
    if pass {
        stats::PASSES.bump();
        for w in lease.waiters {
            wake(w.bc, Wake::Pass, w.encoded);
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
    // SAFETY: live context; the timer hands `data` back to lease_expired exactly once, which frees it.
    unsafe { api!(RedisModule_CreateTimer)(ctx, lease_ms, Some(lease_expired), data.cast()) };
}

unsafe extern "C" fn lease_expired(ctx: Ctx, data: *mut c_void) {
    // SAFETY: `data` is the Box<Expiry> made in arm_expiry, handed back once.
    let exp = unsafe { Box::from_raw(data.cast::<Expiry>()) };
    guard((), || {
        if let Some(lease) = with(|t| t.expire(exp.db, &exp.key, exp.token, now_ms())).flatten() {
            stats::LEASE_TIMEOUTS.bump();
            hand_off(ctx, exp.db, &exp.key, lease);
        }
    })
}

/// A client disconnected: the leases it held go to their first waiters at once.
pub fn client_gone(ctx: Ctx, client: u64) {
    let gone = with(|t| if t.is_empty() { Vec::new() } else { t.client_gone(client) }).unwrap_or_default();
    for (db, key, lease) in gone {
        hand_off(ctx, db, &key, lease);
    }
}

/// FLUSHDB (`Some(db)`) / FLUSHALL or a full resync (`None`): the leases there end; their waiters get
/// PASS (load from the origin, do not cache: the dataset they waited on is gone).
pub fn flushed(db: Option<usize>) {
    let all = with(|t| t.drain(db)).unwrap_or_default();
    for (_, _, lease) in all {
        for w in lease.waiters {
            wake(w.bc, Wake::Pass, w.encoded);
        }
    }
}

fn unpark(bc: Bc) -> Option<Parked> {
    let (db, key) = PARKED_AT.with(|p| p.borrow_mut().remove(&(bc as usize)))?;
    with(|t| t.unpark(db, &key, |w| w.bc == bc)).flatten()
}

unsafe extern "C" fn on_wake(ctx: Ctx, _argv: *mut RStr, _argc: c_int) -> c_int {
    guard(OK, || {
        // SAFETY: in a reply callback, the private data is the Box<WakeMsg> given to UnblockClient.
        let msg = unsafe { api!(RedisModule_GetBlockedClientPrivateData)(ctx).cast::<WakeMsg>().as_ref() };
        match msg {
            Some(WakeMsg { how: Wake::Hit(e), encoded }) => reply_lease(ctx, "HIT", Some(e), None, *encoded),
            Some(WakeMsg { how: Wake::Fill(token), encoded }) => reply_lease(ctx, "FILL", None, Some(*token), *encoded),
            Some(WakeMsg { how: Wake::Pass, encoded }) => reply_lease(ctx, "PASS", None, None, *encoded),
            None => reply_lease(ctx, "PASS", None, None, Shape::default()),
        }
    })
}

unsafe extern "C" fn on_timeout(ctx: Ctx, _argv: *mut RStr, _argc: c_int) -> c_int {
    guard(OK, || {
        // SAFETY: in a timeout callback, GetBlockedClientHandle returns this client's handle.
        let bc = unsafe { api!(RedisModule_GetBlockedClientHandle)(ctx) };
        let encoded = match unpark(bc) {
            Some(w) => {
                // SAFETY: the handle left the table just now, so this is its one unblock.
                unsafe { api!(RedisModule_UnblockClient)(bc, std::ptr::null_mut()) };
                w.encoded
            }
            None => Shape::default(),
        };
        stats::WAIT_TIMEOUTS.bump();
        reply_lease(ctx, "BUSY", None, None, encoded)
    })
}

unsafe extern "C" fn on_disconnect(_ctx: Ctx, bc: Bc) {
    guard((), || {
        if unpark(bc).is_some() {
            // SAFETY: the handle left the table just now, so this is its one unblock.
            unsafe { api!(RedisModule_UnblockClient)(bc, std::ptr::null_mut()) };
        }
    })
}

unsafe extern "C" fn free_wake(_ctx: Ctx, data: *mut c_void) {
    if !data.is_null() {
        // SAFETY: `data` is the Box<WakeMsg> made in wake(), freed once here.
        drop(unsafe { Box::from_raw(data.cast::<WakeMsg>()) });
    }
}

/// Subscribes to client disconnects; call from OnLoad.
pub fn register(ctx: Ctx) -> bool {
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
