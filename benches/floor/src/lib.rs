//! `FLOOR.SET key value`: the least a Redis module's SET of a value of its own data type can do, to
//! tell what in TIERCACHE.SET's cost is the module API's and what is ours (`scripts/instructions`,
//! BENCHMARKS.md "Write path"). Not loaded by anything but that script; no TTL, tags, leases, ACL
//! checks, compression or effect propagation.
//!
//! What it does is what any correct module SET must: open the key for writing, check its type, copy
//! the value into one allocation of Redis's, set it (an overwrite swaps the value in place and frees the
//! old one, and drops an old TTL as native SET does), close the key, mark the write for persistence and replication (`ReplicateVerbatim`), fire a
//! keyspace event as a native SET does, and reply `+OK` the cheapest way known (a call reply kept from
//! load: src/kept_ok.rs, shared with tiercache).

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicPtr, Ordering::Relaxed};

use redis_module::{raw, redis_module, Context, RedisString, Status};

// The same kept `+OK` as tiercache's (one source), so the floor measures the reply TIERCACHE.SET sends.
#[path = "../../../src/kept_ok.rs"]
mod kept_ok;

type Ctx = *mut raw::RedisModuleCtx;
type RStr = *mut raw::RedisModuleString;

const OK: c_int = raw::REDISMODULE_OK as c_int;

static TYPE: AtomicPtr<raw::RedisModuleType> = AtomicPtr::new(std::ptr::null_mut());
static OK_REPLY: AtomicPtr<raw::RedisModuleCallReply> = AtomicPtr::new(std::ptr::null_mut());

/// A function of Redis's module API table (filled in by RedisModule_Init before OnLoad runs).
macro_rules! api {
    ($f:ident) => {
        raw::$f.expect(concat!(stringify!($f), " missing"))
    };
}

/// The stored value: its length, then its bytes, in one allocation of Redis's.
// SAFETY: callers pass `len` readable bytes at `bytes`; the API table is filled (after OnLoad began).
unsafe fn store(bytes: *const u8, len: usize) -> *mut c_void {
    let p = api!(RedisModule_Alloc)(len + 8).cast::<u8>();
    p.cast::<u64>().write_unaligned(len as u64);
    std::ptr::copy_nonoverlapping(bytes, p.add(8), len);
    p.cast()
}

// SAFETY: Redis calls it once per value this module made with `store`.
unsafe extern "C" fn free(v: *mut c_void) {
    api!(RedisModule_Free)(v);
}

// SAFETY: Redis passes a live IO and a value made by `store` (its length first, then the bytes).
unsafe extern "C" fn rdb_save(io: *mut raw::RedisModuleIO, v: *mut c_void) {
    let len = v.cast::<u64>().read_unaligned() as usize;
    api!(RedisModule_SaveStringBuffer)(io, v.cast::<u8>().add(8).cast(), len);
}

// SAFETY: Redis passes a live IO; the loaded buffer is ours to free once copied.
unsafe extern "C" fn rdb_load(io: *mut raw::RedisModuleIO, _encver: c_int) -> *mut c_void {
    let mut len = 0usize;
    let b = api!(RedisModule_LoadStringBuffer)(io, &mut len);
    if b.is_null() {
        return std::ptr::null_mut();
    }
    let v = store(b.cast(), len);
    api!(RedisModule_Free)(b.cast());
    v
}

/// FLOOR.SET key value
// SAFETY: Redis passes a live command context and `argc` live strings in `argv` (3, checked first); the
// key handle is closed on every path; the kept reply is only read. Nothing here can panic but `api!`
// on a missing API function, which RedisModule_Init has filled in.
unsafe extern "C" fn floor_set(ctx: Ctx, argv: *mut RStr, argc: c_int) -> c_int {
    if argc != 3 {
        return api!(RedisModule_WrongArity)(ctx);
    }
    let args = std::slice::from_raw_parts(argv, 3);
    let ty = TYPE.load(Relaxed);
    let key = api!(RedisModule_OpenKey)(ctx, args[1], (raw::REDISMODULE_READ | raw::REDISMODULE_WRITE) as c_int);
    let kt = api!(RedisModule_KeyType)(key);
    if kt != raw::REDISMODULE_KEYTYPE_EMPTY as c_int
        && (kt != raw::REDISMODULE_KEYTYPE_MODULE as c_int || api!(RedisModule_ModuleTypeGetType)(key) != ty)
    {
        api!(RedisModule_CloseKey)(key);
        return api!(RedisModule_ReplyWithError)(
            ctx,
            c"WRONGTYPE Operation against a key holding the wrong kind of value".as_ptr(),
        );
    }
    let mut len = 0usize;
    let bytes = api!(RedisModule_StringPtrLen)(args[2], &mut len);
    let value = store(bytes.cast(), len);
    if kt == raw::REDISMODULE_KEYTYPE_EMPTY as c_int {
        api!(RedisModule_ModuleTypeSetValue)(key, ty, value);
    } else {
        // An overwrite keeps the key's object and swaps the value (SetValue would delete the key and
        // add it again), as tiercache does; the old value comes back to be freed here.
        let mut old: *mut c_void = std::ptr::null_mut();
        api!(RedisModule_ModuleTypeReplaceValue)(key, ty, value, &mut old);
        if !old.is_null() {
            free(old);
        }
        // A SET without KEEPTTL drops the old TTL, as native SET does.
        if api!(RedisModule_GetExpire)(key) != raw::REDISMODULE_NO_EXPIRE as i64 {
            api!(RedisModule_SetExpire)(key, raw::REDISMODULE_NO_EXPIRE as i64);
        }
    }
    api!(RedisModule_CloseKey)(key);
    api!(RedisModule_ReplicateVerbatim)(ctx);
    api!(RedisModule_NotifyKeyspaceEvent)(ctx, raw::REDISMODULE_NOTIFY_MODULE as c_int, c"floor.set".as_ptr(), args[1]);
    let kept = OK_REPLY.load(Relaxed);
    if kept.is_null() {
        api!(RedisModule_ReplyWithSimpleString)(ctx, c"OK".as_ptr())
    } else {
        api!(RedisModule_ReplyWithCallReply)(ctx, kept)
    }
}

fn init(ctx: &Context, _args: &[RedisString]) -> Status {
    let ctx = ctx.ctx;
    // SAFETY (the whole block): OnLoad context; the methods struct is copied by Redis; the kept reply
    // is only ever read, never freed.
    unsafe {
        let mut methods = raw::RedisModuleTypeMethods {
            version: 4,
            rdb_load: Some(rdb_load),
            rdb_save: Some(rdb_save),
            aof_rewrite: None,
            mem_usage: None,
            digest: None,
            free: Some(free),
            aux_load: None,
            aux_save: None,
            aux_save_triggers: 0,
            free_effort: None,
            unlink: None,
            copy: None,
            defrag: None,
            mem_usage2: None,
            free_effort2: None,
            unlink2: None,
            copy2: None,
            aux_save2: None,
        };
        let t = api!(RedisModule_CreateDataType)(ctx, c"floortype".as_ptr(), 0, &mut methods);
        if t.is_null() {
            return Status::Err;
        }
        TYPE.store(t, Relaxed);
        OK_REPLY.store(kept_ok::make(ctx), Relaxed);
        if api!(RedisModule_CreateCommand)(ctx, c"floor.set".as_ptr(), Some(floor_set), c"write deny-oom".as_ptr(), 1, 1, 1) != OK
        {
            return Status::Err;
        }
    }
    Status::Ok
}

redis_module! {
    name: "floor",
    version: 1,
    allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
    data_types: [],
    init: init,
}
