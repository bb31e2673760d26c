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

/// Borrows the bytes of a Redis string.
#[inline]
pub fn bytes<'a>(s: RStr) -> &'a [u8] {
    let mut len = 0usize;
    // SAFETY: `s` is a live RedisModuleString (an argv entry or one we created); StringPtrLen returns
    // a pointer to its `len` bytes, valid while the string lives, which outlives our use of the slice.
    unsafe {
        let ptr = api!(RedisModule_StringPtrLen)(s, &mut len);
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
    unsafe { api!(RedisModule_Milliseconds)() }
}

/// Writes a line to the Redis log.
pub fn log(ctx: Ctx, level: &str, msg: &str) {
    let level = std::ffi::CString::new(level).unwrap_or_default();
    let msg = std::ffi::CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    // SAFETY: both are valid C strings; the format consumes exactly one %s argument.
    unsafe { api!(RedisModule_Log)(ctx, level.as_ptr(), c"%s".as_ptr(), msg.as_ptr()) }
}
