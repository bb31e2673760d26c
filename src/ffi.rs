//! Raw FFI helpers shared by every entry point: the panic guard, argument access without copies,
//! Redis strings built from byte slices, and the clock.

use std::os::raw::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

use redis_module::raw;

pub type Ctx = *mut raw::RedisModuleCtx;
pub type RStr = *mut raw::RedisModuleString;

pub const OK: c_int = raw::REDISMODULE_OK as c_int;
pub const ERR: c_int = raw::REDISMODULE_ERR as c_int;

/// Resolves a Redis module API function pointer. They are filled in by `RedisModule_Init` before any
/// of our code runs; an API missing from the running server (newer than 7.0) panics, which every entry
/// point turns into an error reply instead of a crash.
macro_rules! api {
    ($name:ident) => {{
        // SAFETY: the API table is written once by RedisModule_Init during load, before any of our
        // code runs, and only read afterwards.
        #[allow(unused_unsafe)]
        let f = unsafe { redis_module::raw::$name };
        match f {
            Some(f) => f,
            None => panic!(concat!(stringify!($name), " is not available in this Redis")),
        }
    }};
}
pub(crate) use api;

/// Declares the module API functions the per-command hot paths call (SET, GET, key access, replies):
/// `missing_hot_api` names the first one this Redis lacks, and OnLoad refuses to load then, so `hot!`
/// calls them without [`api!`]'s per-call check (three instructions a call, a dozen calls a SET).
/// `hot!` accepts only the names listed here.
macro_rules! hot_api {
    ($($name:ident),* $(,)?) => {
        /// The first hot-path API function missing from this Redis (checked once, at load).
        pub fn missing_hot_api() -> Option<&'static str> {
            $(
                // SAFETY: the API table is written once by RedisModule_Init, before OnLoad runs.
                if unsafe { redis_module::raw::$name }.is_none() {
                    return Some(stringify!($name));
                }
            )*
            None
        }

        macro_rules! hot {
            $(
                ($name) => {{
                    // SAFETY: OnLoad checked this pointer is set (missing_hot_api) and fails the load
                    // otherwise; the API table is not written after RedisModule_Init.
                    #[allow(unused_unsafe)]
                    unsafe { redis_module::raw::$name.unwrap_unchecked() }
                }};
            )*
        }
        pub(crate) use hot;
    };
}

hot_api!(
    RedisModule_OpenKey,
    RedisModule_CloseKey,
    RedisModule_KeyType,
    RedisModule_ModuleTypeGetType,
    RedisModule_ModuleTypeGetValue,
    RedisModule_ModuleTypeReplaceValue,
    RedisModule_ModuleTypeSetValue,
    RedisModule_GetAbsExpire,
    RedisModule_SetAbsExpire,
    RedisModule_SetExpire,
    RedisModule_StringPtrLen,
    RedisModule_Milliseconds,
    RedisModule_GetSelectedDb,
    RedisModule_NotifyKeyspaceEvent,
    RedisModule_ReplicateVerbatim,
    RedisModule_ReplyWithCallReply,
    RedisModule_ReplyWithStringBuffer,
    RedisModule_ReplyWithNull,
);

/// Runs a command body, turning a panic into an error reply so that it never unwinds into Redis.
#[inline(always)]
pub fn guard_command(ctx: Ctx, argv: *mut RStr, argc: c_int, body: impl FnOnce(Ctx, &[RStr]) -> c_int) -> c_int {
    let args: &[RStr] = if argv.is_null() || argc <= 0 {
        &[]
    } else {
        // SAFETY: Redis passes `argc` valid string pointers in `argv`, alive for the whole call.
        unsafe { std::slice::from_raw_parts(argv, argc as usize) }
    };
    match catch_unwind(AssertUnwindSafe(|| body(ctx, args))) {
        Ok(rc) => rc,
        Err(_) => {
            crate::reply::error(ctx, "ERR tiercache internal error; the command was not applied");
            OK
        }
    }
}

/// Runs a callback that returns a value, giving `fallback` if it panics.
pub fn guard<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// A detached context of this module, for log lines written outside any call (so they carry the
/// module's name). Made once at load and never freed (a module with a data type cannot be unloaded).
static LOG_CTX: std::sync::atomic::AtomicPtr<raw::RedisModuleCtx> = std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Sends every panic of the module to the Redis log (where operators look) with its place and
/// message; the guards above then keep it from unwinding into Redis. Installed once at load.
pub fn install_panic_hook(ctx: Ctx) {
    // SAFETY: OnLoad context.
    let detached = unsafe { api!(RedisModule_GetDetachedThreadSafeContext)(ctx) };
    LOG_CTX.store(detached, std::sync::atomic::Ordering::Release);
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let at = info.location().map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        let ctx = LOG_CTX.load(std::sync::atomic::Ordering::Acquire);
        log(ctx, "warning", &format!("tiercache: panic{at}: {msg} (caught; the operation was not applied)"));
    }));
}

/// The value of a server config (`CONFIG GET name`), for rare, non-hot paths only.
pub fn server_config(ctx: Ctx, name: &std::ffi::CStr) -> Option<Vec<u8>> {
    // SAFETY: live command context; the format "cc" takes two C strings; the reply is freed below and
    // the bytes are copied out before that.
    unsafe {
        let r = api!(RedisModule_Call)(ctx, c"CONFIG".as_ptr(), c"cc".as_ptr(), c"GET".as_ptr(), name.as_ptr());
        if r.is_null() {
            return None;
        }
        let value = api!(RedisModule_CallReplyArrayElement)(r, 1);
        let out = if value.is_null() {
            None
        } else {
            let mut len = 0usize;
            let ptr = api!(RedisModule_CallReplyStringPtr)(value, &mut len);
            (!ptr.is_null()).then(|| std::slice::from_raw_parts(ptr.cast::<u8>(), len).to_vec())
        };
        api!(RedisModule_FreeCallReply)(r);
        out
    }
}

/// The bytes of command arguments, without a heap allocation for the usual handful of options.
// On the stack on purpose: it lives for one command and saves an allocation through Redis's allocator.
#[allow(clippy::large_enum_variant)]
pub enum ArgBytes<'a> {
    Inline([&'a [u8]; 16], usize),
    Heap(Vec<&'a [u8]>),
}

impl<'a> ArgBytes<'a> {
    pub fn new(args: &[RStr]) -> Self {
        if args.is_empty() {
            // No options (a plain SET): no 16-slot array to fill and move.
            return ArgBytes::Heap(Vec::new());
        }
        if args.len() <= 16 {
            let mut a: [&'a [u8]; 16] = [&[]; 16];
            for (slot, &s) in a.iter_mut().zip(args) {
                *slot = bytes(s);
            }
            ArgBytes::Inline(a, args.len())
        } else {
            ArgBytes::Heap(args.iter().map(|&s| bytes(s)).collect())
        }
    }
}

impl<'a> std::ops::Deref for ArgBytes<'a> {
    type Target = [&'a [u8]];
    fn deref(&self) -> &[&'a [u8]] {
        match self {
            ArgBytes::Inline(a, n) => &a[..(*n).min(16)],
            ArgBytes::Heap(v) => v,
        }
    }
}

/// Borrows the bytes of a Redis string.
#[inline]
pub fn bytes<'a>(s: RStr) -> &'a [u8] {
    let mut len = 0usize;
    // SAFETY: `s` is a live RedisModuleString (an argv entry or one we created); StringPtrLen returns
    // a pointer to its `len` bytes, valid while the string lives, which outlives our use of the slice.
    unsafe {
        let ptr = hot!(RedisModule_StringPtrLen)(s, &mut len);
        if ptr.is_null() {
            return &[];
        }
        std::slice::from_raw_parts(ptr.cast::<u8>(), len)
    }
}

/// Creates a Redis string holding `b` (binary-safe: no CString, NUL bytes are fine).
pub fn new_string(ctx: Ctx, b: &[u8]) -> RStr {
    // SAFETY: CreateString copies `len` bytes from the pointer; a null ctx creates an unmanaged string.
    unsafe { api!(RedisModule_CreateString)(ctx, b.as_ptr().cast::<c_char>(), b.len()) }
}

/// Frees a string created by [`new_string`] with the same `ctx`.
pub fn free_string(ctx: Ctx, s: RStr) {
    // SAFETY: `s` was created by us with this ctx and is not used afterwards.
    unsafe { api!(RedisModule_FreeString)(ctx, s) }
}

/// The current unix time in milliseconds, as Redis sees it.
#[inline]
pub fn now_ms() -> i64 {
    // SAFETY: takes no arguments.
    unsafe { hot!(RedisModule_Milliseconds)() }
}

/// Writes a line to the Redis log.
pub fn log(ctx: Ctx, level: &str, msg: &str) {
    let level = std::ffi::CString::new(level).unwrap_or_default();
    let msg = std::ffi::CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // SAFETY: both are valid C strings; the format consumes exactly one %s argument.
    unsafe { api!(RedisModule_Log)(ctx, level.as_ptr(), c"%s".as_ptr(), msg.as_ptr()) }
}
