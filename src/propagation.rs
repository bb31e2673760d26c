//! Does anyone read what a write propagates? When nobody does, `TIERCACHE.SET` skips building its effect
//! form (absolute deadline, creation time, stored bytes: `RM_Replicate` alone costs more than a whole
//! native SET, mostly looking the command up by name) and calls `RM_ReplicateVerbatim`, which only marks
//! the dataset dirty for `save` points. Nothing observable changes: the verbatim command goes nowhere.
//!
//! Redis 7.0 sends the propagated stream to the AOF when AOF is on, and to the replication backlog and
//! replicas when this node is a master that has a backlog or replicas (`shouldPropagate` in server.c).
//! So the effect form is needed when the node is *listened to*: AOF is on, a replication backlog exists
//! or replicas are connected.
//!
//! "Listened to" starts true at load and after every role change; it turns true on every fork (a
//! replica's full sync — even a diskless one after its delay — forks before the replica gets anything
//! after its snapshot; so does `redis-cli --rdb` or `--replica`; and AOF turned on at run time: Redis 7.0
//! appends to the AOF only once its rewrite child exists, `feedAppendOnlyFile`), and it turns false
//! only when a poll, once a second while true, finds AOF off (the context flags) and neither a backlog
//! nor a replica (`INFO replication`). A backlog that Redis creates for a new replica before that fork
//! gets a new replication id, so nothing propagated before the fork is ever sent to anyone. So a SET
//! reads no context flags for this (`RedisModule_GetContextFlags` is ~130 instructions).

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use redis_module::raw;

use crate::ffi::{api, guard, hot, log, Ctx, OK};

/// How often "listened to" is re-checked while true.
const POLL_MS: i64 = 1000;

// Plain statics, not thread-locals: the module runs on Redis's main thread, and a thread-local in a
// shared object costs a `__tls_get_addr` call (and its code in the instruction cache) on every SET.
static LISTENED: AtomicBool = AtomicBool::new(true);
static POLL_ARMED: AtomicBool = AtomicBool::new(false);

/// True when a write must propagate its effect form: AOF, a backlog or a replica may read the stream.
#[inline]
pub fn needs_effects(ctx: Ctx) -> bool {
    if !LISTENED.load(Relaxed) {
        return false;
    }
    // The first poll is armed lazily, from a command, when the event loop surely runs.
    arm(ctx);
    true
}

/// Something may now read the stream (a fork, a role change): effects from now on, re-checked later.
pub fn listened(ctx: Ctx) {
    LISTENED.store(true, Relaxed);
    arm(ctx);
}

fn arm(ctx: Ctx) {
    if POLL_ARMED.load(Relaxed) {
        return;
    }
    // SAFETY: live context; the callback takes no data.
    unsafe { api!(RedisModule_CreateTimer)(ctx, POLL_MS, Some(poll), std::ptr::null_mut()) };
    POLL_ARMED.store(true, Relaxed);
}

/// `INFO replication`: does a backlog exist or is a replica connected? (Errors count as yes.)
fn backlog_or_replicas(ctx: Ctx) -> bool {
    // SAFETY: live context; the section name is a C string; the data is freed below and fields are read
    // before that.
    unsafe {
        let info = api!(RedisModule_GetServerInfo)(ctx, c"replication".as_ptr());
        if info.is_null() {
            return true;
        }
        let field = |name: &std::ffi::CStr| {
            let mut err: c_int = 0;
            let v = api!(RedisModule_ServerInfoGetFieldUnsigned)(info, name.as_ptr(), &mut err);
            err != 0 || v != 0
        };
        let yes = field(c"repl_backlog_active") || field(c"connected_slaves");
        api!(RedisModule_FreeServerInfo)(ctx, info);
        yes
    }
}

/// AOF on (or waiting for its first rewrite), from the context flags.
fn aof_on(ctx: Ctx) -> bool {
    // SAFETY: live (timer) context.
    unsafe { api!(RedisModule_GetContextFlags)(ctx) & raw::REDISMODULE_CTX_FLAGS_AOF as c_int != 0 }
}

unsafe extern "C" fn poll(ctx: Ctx, _data: *mut c_void) {
    POLL_ARMED.store(false, Relaxed);
    guard((), || {
        if aof_on(ctx) || backlog_or_replicas(ctx) {
            arm(ctx);
        } else {
            LISTENED.store(false, Relaxed);
        }
    })
}

unsafe extern "C" fn on_fork(ctx: Ctx, _eid: raw::RedisModuleEvent, sub: u64, _data: *mut c_void) {
    guard((), || {
        if sub == raw::REDISMODULE_SUBEVENT_FORK_CHILD_BORN {
            listened(ctx);
        }
    })
}

/// Subscribes to forks; call from OnLoad. (Role changes reach [`listened`] through the tag index's
/// server-event callback: a module has one callback per event.)
pub fn register(ctx: Ctx) -> bool {
    let ev = raw::RedisModuleEvent { id: raw::REDISMODULE_EVENT_FORK_CHILD, dataver: 1 };
    // SAFETY: OnLoad context; the callback is a valid extern fn for the module's lifetime.
    if unsafe { api!(RedisModule_SubscribeToServerEvent)(ctx, ev, Some(on_fork)) } != OK {
        log(ctx, "warning", "tiercache: cannot subscribe to fork events");
        return false;
    }
    true
}

/// `RM_ReplicateVerbatim`: marks the dataset dirty; nobody reads what it propagates (see above).
pub fn replicate_verbatim(ctx: Ctx) {
    // SAFETY: live command context.
    unsafe { hot!(RedisModule_ReplicateVerbatim)(ctx) };
}
