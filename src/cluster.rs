//! Redis Cluster: the cluster-wide forms of `TIERCACHE.INVALIDATE`, `TAGCOUNT` and `TAGKEYS` over the
//! cluster bus, and the record of recent invalidations that a RESTOREd (migrated) entry is checked
//! against (see `tiercache_core::cluster`).
//!
//! The node that runs the command does its own part at once, sends a request to every other master
//! (`RedisModule_SendClusterMessage`, one per master) and blocks the caller (`RedisModule_BlockClient`;
//! the server is never blocked). Each master applies the request on its main thread and answers with an
//! acknowledgement carrying the request id. The caller gets its reply when the last master answered, or an
//! error naming the masters that did not answer within `tiercache.cluster-timeout-ms` (a module timer,
//! not Redis's block timeout, as in `src/leases.rs`). An acknowledgement for a request no longer waited for
//! is dropped. Replicas ignore requests: a master that failed over mid-request never answers, so the
//! request ends with the error, not a hang.
//!
//! State lives in thread-locals on the main thread; nothing is borrowed across a call into Redis.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::raw::{c_char, c_int, c_uchar, c_void};

use redis_module::raw;
use tiercache_core::cluster::{Ack, Op, Recent, Request, MAX_ACK_KEY_BYTES};

use crate::acl::{Access, User};
use crate::config;
use crate::ffi::{api, guard, now_ms, Ctx, RStr, OK};
use crate::reply;

type Bc = *mut raw::RedisModuleBlockedClient;
type NodeId = [u8; raw::REDISMODULE_NODE_ID_LEN as usize];

/// Message types on the bus (per module: Redis tags every module message with the module's name).
const MSG_REQUEST: u8 = 1;
const MSG_ACK: u8 = 2;

/// A cluster-wide command waiting for the other masters.
struct Pending {
    bc: Bc,
    op: Op,
    /// Masters that have not answered yet, with their address for the error text.
    waiting: Vec<(NodeId, String)>,
    count: u64,
    keys: Vec<Vec<u8>>,
    /// TAGKEYS: most keys in the reply, and the caller's user when it may not read every key.
    limit: usize,
    user: Option<Vec<u8>>,
    timer: raw::RedisModuleTimerID,
}

/// What the blocked caller is answered.
enum Done {
    Count(u64),
    Keys(Vec<Vec<u8>>),
    Error(String),
}

thread_local! {
    static PENDING: RefCell<HashMap<u64, Pending>> = RefCell::new(HashMap::new());
    static NEXT_ID: Cell<u64> = const { Cell::new(0) };
    static RECENT: RefCell<Recent> = RefCell::new(Recent::new());
    /// A context of this module for stopping timers outside a command; made at load.
    static TIMER_CTX: Cell<Ctx> = const { Cell::new(std::ptr::null_mut()) };
}

fn flags(ctx: Ctx) -> c_int {
    // SAFETY: ctx is a live context.
    unsafe { api!(RedisModule_GetContextFlags)(ctx) }
}

/// The server runs with `cluster-enabled yes`.
pub fn enabled(ctx: Ctx) -> bool {
    flags(ctx) & raw::REDISMODULE_CTX_FLAGS_CLUSTER as c_int != 0
}

/// Should this command fan out to the other masters? Only when a client asked for it on a cluster node:
/// never for the replication stream or AOF loading (they carry each master's own `LOCAL` effect).
pub fn fan_out_wanted(ctx: Ctx) -> bool {
    let f = flags(ctx);
    f & raw::REDISMODULE_CTX_FLAGS_CLUSTER as c_int != 0
        && f & (raw::REDISMODULE_CTX_FLAGS_REPLICATED | raw::REDISMODULE_CTX_FLAGS_LOADING) as c_int == 0
}

/// Inside MULTI, a script or a client that may not block: a cluster-wide command cannot wait there.
pub fn cannot_block(ctx: Ctx) -> bool {
    let f = flags(ctx);
    f & (raw::REDISMODULE_CTX_FLAGS_MULTI | raw::REDISMODULE_CTX_FLAGS_LUA | raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING) as c_int
        != 0
}

fn next_id() -> u64 {
    NEXT_ID.with(|n| {
        if n.get() == 0 {
            // Start from random bytes so that acknowledgements meant for this node before a restart
            // never match a new request.
            let mut b = [0u8; 8];
            // SAFETY: writes exactly 8 bytes into `b`.
            unsafe { api!(RedisModule_GetRandomBytes)(b.as_mut_ptr(), b.len()) };
            n.set(u64::from_le_bytes(b) | 1);
        }
        let id = n.get();
        n.set(id.wrapping_add(1).max(1));
        id
    })
}

/// Every master that serves slots, but this node, with "ip:port" (from `CLUSTER SLOTS`). A master that
/// failed and was replaced serves no slots and is not asked; one that failed and still owns slots is
/// asked, and its silence becomes the timeout error.
fn other_masters(ctx: Ctx) -> Vec<(NodeId, String)> {
    let mut out: Vec<(NodeId, String)> = Vec::new();
    // SAFETY: GetMyClusterID returns this node's id (REDISMODULE_NODE_ID_LEN bytes) or NULL.
    let me = unsafe { api!(RedisModule_GetMyClusterID)() };
    let me: Option<NodeId> = sender(me);
    // SAFETY: live context; "c" takes one C string; every reply element read below is checked for its
    // type and bounds by the CallReply accessors (NULL when out of range), and the reply is freed once.
    unsafe {
        let r = api!(RedisModule_Call)(ctx, c"CLUSTER".as_ptr(), c"c".as_ptr(), c"SLOTS".as_ptr());
        if r.is_null() {
            return out;
        }
        let ranges = api!(RedisModule_CallReplyLength)(r);
        for i in 0..ranges {
            let range = api!(RedisModule_CallReplyArrayElement)(r, i);
            let node = if range.is_null() { range } else { api!(RedisModule_CallReplyArrayElement)(range, 2) };
            if node.is_null() {
                continue;
            }
            let (ip, port, id) = (
                reply_str(api!(RedisModule_CallReplyArrayElement)(node, 0)),
                api!(RedisModule_CallReplyArrayElement)(node, 1),
                reply_str(api!(RedisModule_CallReplyArrayElement)(node, 2)),
            );
            let port = if port.is_null() { 0 } else { api!(RedisModule_CallReplyInteger)(port) };
            let Ok(id) = NodeId::try_from(id.as_slice()) else { continue };
            if Some(id) == me || out.iter().any(|(n, _)| *n == id) {
                continue;
            }
            out.push((id, format!("{}:{port}", String::from_utf8_lossy(&ip))));
        }
        api!(RedisModule_FreeCallReply)(r);
    }
    out
}

/// The bytes of a string reply element (empty when it is not one).
fn reply_str(e: *mut raw::RedisModuleCallReply) -> Vec<u8> {
    if e.is_null() {
        return Vec::new();
    }
    let mut len = 0usize;
    // SAFETY: e is a live reply element; StringPtr returns NULL for non-string replies.
    unsafe {
        let p = api!(RedisModule_CallReplyStringPtr)(e, &mut len);
        if p.is_null() {
            return Vec::new();
        }
        std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec()
    }
}

/// A node id as the NUL-terminated string the API looks nodes up with.
fn c_id(id: &NodeId) -> [c_char; raw::REDISMODULE_NODE_ID_LEN as usize + 1] {
    let mut out = [0 as c_char; raw::REDISMODULE_NODE_ID_LEN as usize + 1];
    for (o, b) in out.iter_mut().zip(id) {
        *o = *b as c_char;
    }
    out
}

fn send(ctx: Ctx, to: &NodeId, kind: u8, msg: &[u8]) -> bool {
    let Ok(len) = u32::try_from(msg.len()) else { return false };
    let cid = c_id(to);
    // SAFETY: live context; the target is a NUL-terminated node id; Redis copies the message.
    unsafe { api!(RedisModule_SendClusterMessage)(ctx, cid.as_ptr(), kind, msg.as_ptr().cast::<c_char>(), len) == OK }
}

/// Starts a cluster-wide command whose local part is done (`local_count`, `local_keys`): asks every
/// other master and blocks the caller until they all answered or the timeout passed. With no other
/// master it replies at once.
pub fn fan_out(ctx: Ctx, req: Request, local_count: u64, local_keys: Vec<Vec<u8>>, user: Option<&User>) -> c_int {
    let masters = other_masters(ctx);
    let limit = usize::try_from(req.count).unwrap_or(usize::MAX);
    let user = user.map(|u| u.name().to_vec());
    if masters.is_empty() {
        return answer(ctx, &finish_value(req.op, local_count, local_keys, limit, user.as_deref()));
    }
    // No Redis block timeout (0): the deadline is our timer, so that every ending goes through
    // UnblockClient. No timeout callback either: CLIENT UNBLOCK cannot cut a cluster-wide command short.
    // SAFETY: live command context, blocking allowed (checked by the caller); the callbacks are valid
    // extern fns; Redis owns the handle until we unblock it, exactly once.
    let bc = unsafe { api!(RedisModule_BlockClient)(ctx, Some(on_reply), None, Some(free_done), 0) };
    if bc.is_null() {
        return reply::error(ctx, "ERR tiercache: cannot block the client for a cluster-wide command");
    }
    let id = next_id();
    let req = Request { id, ..req };
    // SAFETY: live context; the timer's data is the request id (no allocation).
    let timer = unsafe {
        api!(RedisModule_CreateTimer)(ctx, config::CLUSTER_TIMEOUT_MS.get(), Some(deadline), id as usize as *mut c_void)
    };
    let msg = req.encode();
    for (node, _) in &masters {
        // A node the bus does not know any more never answers: the request then ends with the error.
        send(ctx, node, MSG_REQUEST, &msg);
    }
    let pending = Pending { bc, op: req.op, waiting: masters, count: local_count, keys: local_keys, limit, user, timer };
    PENDING.with(|p| p.borrow_mut().insert(id, pending));
    OK
}

fn finish_value(op: Op, count: u64, keys: Vec<Vec<u8>>, limit: usize, user: Option<&[u8]>) -> Done {
    match op {
        Op::Invalidate | Op::TagCount => Done::Count(count),
        Op::TagKeys => {
            let keys = match user {
                None => keys.into_iter().take(limit).collect(),
                // Only keys the caller may read, as in the local form. A user deleted meanwhile sees none.
                Some(name) => match User::by_name(name) {
                    Some(u) => keys.into_iter().filter(|k| u.may_bytes(k, Access::Read)).take(limit).collect(),
                    None => Vec::new(),
                },
            };
            Done::Keys(keys)
        }
    }
}

fn answer(ctx: Ctx, done: &Done) -> c_int {
    match done {
        Done::Count(n) => reply::int(ctx, i64::try_from(*n).unwrap_or(i64::MAX)),
        Done::Keys(keys) => {
            reply::array(ctx, keys.len());
            for k in keys {
                reply::bulk(ctx, k);
            }
            OK
        }
        Done::Error(e) => reply::error(ctx, e),
    }
}

fn unblock(bc: Bc, done: Done) {
    // SAFETY: the pending request was just taken out of the table, so this is the handle's one
    // unblock; Redis passes the box to on_reply (unless the client is gone) and then to free_done.
    unsafe { api!(RedisModule_UnblockClient)(bc, Box::into_raw(Box::new(done)).cast()) };
}

fn stop_timer(id: raw::RedisModuleTimerID) {
    let ctx = TIMER_CTX.with(Cell::get);
    if !ctx.is_null() {
        let mut data: *mut c_void = std::ptr::null_mut();
        // SAFETY: TIMER_CTX is this module's detached context, alive for the module's life; StopTimer
        // only looks the id up (a timer that already fired is an error we ignore).
        unsafe { api!(RedisModule_StopTimer)(ctx, id, &mut data) };
    }
}

/// The timeout: the caller gets an error naming every master that did not answer.
unsafe extern "C" fn deadline(_ctx: Ctx, data: *mut c_void) {
    guard((), || {
        let id = data as usize as u64;
        let Some(p) = PENDING.with(|p| p.borrow_mut().remove(&id)) else { return };
        crate::stats::CLUSTER_TIMEOUTS.bump();
        let missing: Vec<String> =
            p.waiting.iter().map(|(node, addr)| format!("{} ({addr})", String::from_utf8_lossy(node))).collect();
        let what = match p.op {
            Op::Invalidate => "the other masters that answered applied it; retry it to be sure it reached every master",
            Op::TagCount | Op::TagKeys => "no partial result is returned",
        };
        let name = match p.op {
            Op::Invalidate => "INVALIDATE",
            Op::TagCount => "TAGCOUNT",
            Op::TagKeys => "TAGKEYS",
        };
        let msg = format!(
            "TIMEOUT cluster-wide TIERCACHE.{name} got no answer within {} ms from master(s) {}; {what}",
            config::CLUSTER_TIMEOUT_MS.get(),
            missing.join(", ")
        );
        unblock(p.bc, Done::Error(msg));
    })
}

unsafe extern "C" fn on_reply(ctx: Ctx, _argv: *mut RStr, _argc: c_int) -> c_int {
    guard(OK, || {
        // SAFETY: in a reply callback, the private data is the Box<Done> given to UnblockClient.
        match unsafe { api!(RedisModule_GetBlockedClientPrivateData)(ctx).cast::<Done>().as_ref() } {
            Some(done) => answer(ctx, done),
            None => reply::error(ctx, "ERR tiercache: cluster-wide command ended without a result"),
        }
    })
}

unsafe extern "C" fn free_done(_ctx: Ctx, data: *mut c_void) {
    guard((), || {
        if !data.is_null() {
            // SAFETY: `data` is the Box<Done> made in unblock(), freed once here.
            drop(unsafe { Box::from_raw(data.cast::<Done>()) });
        }
    })
}

// ---- the other side: requests and acknowledgements ------------------------------------------------

fn sender(sender_id: *const c_char) -> Option<NodeId> {
    if sender_id.is_null() {
        return None;
    }
    let mut id: NodeId = [0; raw::REDISMODULE_NODE_ID_LEN as usize];
    // SAFETY: Redis passes the sender's node name, REDISMODULE_NODE_ID_LEN bytes.
    unsafe { std::ptr::copy_nonoverlapping(sender_id.cast::<u8>(), id.as_mut_ptr(), id.len()) };
    Some(id)
}

fn payload<'a>(p: *const c_uchar, len: u32) -> &'a [u8] {
    if p.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: Redis passes `len` bytes at `p`, valid for the callback.
    unsafe { std::slice::from_raw_parts(p, len as usize) }
}

/// A request from another master: applied here (a replica ignores it) and acknowledged.
unsafe extern "C" fn on_request(ctx: Ctx, sender_id: *const c_char, _type: u8, p: *const c_uchar, len: u32) {
    guard((), || {
        let Some(from) = sender(sender_id) else { return };
        let Some(req) = Request::decode(payload(p, len)) else {
            crate::ffi::log(ctx, "warning", "tiercache: malformed cluster request ignored");
            return;
        };
        if crate::tagindex::is_replica(ctx) {
            return;
        }
        let Ok(db) = c_int::try_from(req.db) else { return };
        // SAFETY: live context; an id out of range leaves the selection unchanged and is refused here.
        if unsafe { api!(RedisModule_SelectDb)(ctx, db) } != OK {
            return;
        }
        let tags: Vec<&[u8]> = req.tags.iter().map(Vec::as_slice).collect();
        let ack = match req.op {
            Op::Invalidate => {
                let n = crate::commands::apply_invalidate(ctx, &tags, None);
                Ack { id: req.id, count: n as u64, keys: Vec::new() }
            }
            Op::TagCount => {
                let n = tags.first().map_or(0, |t| crate::tagindex::with(|r| r.tag_count(db as usize, t)).unwrap_or(0));
                Ack { id: req.id, count: n as u64, keys: Vec::new() }
            }
            Op::TagKeys => {
                let limit = usize::try_from(req.count).unwrap_or(usize::MAX);
                let keys = tags.first().map_or_else(Vec::new, |t| {
                    crate::tagindex::with(|r| {
                        let mut bytes = 0;
                        r.tag_keys(db as usize, t, limit)
                            .into_iter()
                            .take_while(|k| {
                                bytes += k.len() + 8;
                                bytes <= MAX_ACK_KEY_BYTES
                            })
                            .map(<[u8]>::to_vec)
                            .collect()
                    })
                    .unwrap_or_default()
                });
                Ack { id: req.id, count: 0, keys }
            }
        };
        send(ctx, &from, MSG_ACK, &ack.encode());
    })
}

/// An acknowledgement: counts towards its request if that is still waiting, else dropped.
unsafe extern "C" fn on_ack(_ctx: Ctx, sender_id: *const c_char, _type: u8, p: *const c_uchar, len: u32) {
    guard((), || {
        let Some(from) = sender(sender_id) else { return };
        let Some(ack) = Ack::decode(payload(p, len)) else { return };
        let done = PENDING.with(|pending| {
            let mut pending = pending.borrow_mut();
            let p = pending.get_mut(&ack.id)?;
            let before = p.waiting.len();
            p.waiting.retain(|(node, _)| *node != from);
            if p.waiting.len() == before {
                return None; // not asked, or already answered
            }
            p.count = p.count.saturating_add(ack.count);
            p.keys.extend(ack.keys);
            if !p.waiting.is_empty() {
                return None;
            }
            pending.remove(&ack.id)
        });
        if let Some(p) = done {
            stop_timer(p.timer);
            let value = finish_value(p.op, p.count, p.keys, p.limit, p.user.as_deref());
            unblock(p.bc, value);
        }
    })
}

// ---- recent invalidations (migration) ------------------------------------------------------------

fn window_ms() -> i64 {
    config::CLUSTER_TIMEOUT_MS.get().saturating_mul(2)
}

/// Remembers that `tags` of `db` were invalidated now (cluster nodes only).
pub fn record_invalidation(ctx: Ctx, db: usize, tags: &[&[u8]]) {
    if enabled(ctx) {
        RECENT.with(|r| r.borrow_mut().record(db as u64, tags, now_ms(), window_ms()));
    }
}

/// Was one of these tags of `db` invalidated here within the window? Then a RESTOREd entry carrying it
/// may predate the invalidation (see `tiercache_core::cluster`) and is taken as invalidated.
pub fn invalidated_recently<'a>(ctx: Ctx, db: usize, tags: impl Iterator<Item = &'a [u8]>) -> bool {
    enabled(ctx) && RECENT.with(|r| r.borrow_mut().any_recent(db as u64, tags, now_ms(), window_ms()))
}

/// Cluster-wide commands waiting for answers (INFO gauge).
pub fn pending() -> usize {
    PENDING.with(|p| p.borrow().len())
}

/// Registers the bus receivers and makes the timer context; call from OnLoad.
pub fn register(ctx: Ctx) -> bool {
    // SAFETY: OnLoad context; the detached context lives as long as the module (never freed: a module
    // with a data type cannot be unloaded); the receivers are valid extern fns. On a server without
    // cluster support the receivers are simply never called.
    unsafe {
        TIMER_CTX.with(|c| c.set(api!(RedisModule_GetDetachedThreadSafeContext)(ctx)));
        api!(RedisModule_RegisterClusterMessageReceiver)(ctx, MSG_REQUEST, Some(on_request));
        api!(RedisModule_RegisterClusterMessageReceiver)(ctx, MSG_ACK, Some(on_ack));
    }
    true
}
