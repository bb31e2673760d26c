//! The one place that turns results into RESP replies. RESP3 maps fall back to flat name/value arrays
//! under RESP2 (Redis does this inside ReplyWithMap).

use std::os::raw::{c_char, c_int, c_long};
use std::sync::atomic::{AtomicPtr, Ordering::Relaxed};

use redis_module::raw::RedisModuleCallReply;

use crate::ffi::{api, hot, Ctx, OK};

/// A value inside a name/value reply.
pub enum Value<'a> {
    Int(i64),
    Str(&'a str),
    BulkList(Vec<&'a [u8]>),
}

pub fn error(ctx: Ctx, msg: &str) -> c_int {
    // Redis wants a C string; interior NULs cannot occur in our messages, but be safe.
    let msg = std::ffi::CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: ctx is live; ReplyWithError copies the string.
    unsafe { api!(RedisModule_ReplyWithError)(ctx, msg.as_ptr()) };
    OK
}

pub fn wrong_arity(ctx: Ctx) -> c_int {
    // SAFETY: ctx is live; Redis builds the standard "wrong number of arguments" error.
    unsafe { api!(RedisModule_WrongArity)(ctx) };
    OK
}

pub fn wrong_type(ctx: Ctx) -> c_int {
    error(ctx, "WRONGTYPE Operation against a key holding the wrong kind of value")
}

/// `+OK` as a call reply kept from load (`init`), never freed. `RedisModule_ReplyWithCallReply` copies
/// its protocol bytes with one `addReplyProto`, where `RedisModule_ReplyWithSimpleString` allocates,
/// sanitises and frees a string: ~600 of the ~4,100 server instructions of a TIERCACHE.SET (BENCHMARKS.md,
/// Write path). `+OK` reads the same in RESP2 and RESP3. NULL (the fallback) if it could not be made.
static OK_REPLY: AtomicPtr<RedisModuleCallReply> = AtomicPtr::new(std::ptr::null_mut());

/// Makes the kept `+OK` (OnLoad; see kept_ok.rs). Without it `ok` sends the plain simple-string reply.
pub fn init(ctx: Ctx) {
    OK_REPLY.store(crate::kept_ok::make(ctx), Relaxed);
}

pub fn ok(ctx: Ctx) -> c_int {
    let kept = OK_REPLY.load(Relaxed);
    if kept.is_null() {
        // SAFETY: ctx is live; the literal is a valid C string.
        unsafe { api!(RedisModule_ReplyWithSimpleString)(ctx, c"OK".as_ptr()) };
    } else {
        // SAFETY: ctx is live; `kept` is the `+OK` call reply made in `init`, never freed, and only
        // read here (its protocol bytes are copied into the client's reply).
        unsafe { hot!(RedisModule_ReplyWithCallReply)(ctx, kept) };
    }
    OK
}

pub fn null(ctx: Ctx) -> c_int {
    // SAFETY: ctx is live.
    unsafe { hot!(RedisModule_ReplyWithNull)(ctx) };
    OK
}

#[inline]
pub fn bulk(ctx: Ctx, b: &[u8]) -> c_int {
    // SAFETY: ctx is live; Redis copies `len` bytes from the buffer into the reply.
    unsafe { hot!(RedisModule_ReplyWithStringBuffer)(ctx, b.as_ptr().cast::<c_char>(), b.len()) };
    OK
}

pub fn int(ctx: Ctx, v: i64) -> c_int {
    // SAFETY: ctx is live.
    unsafe { api!(RedisModule_ReplyWithLongLong)(ctx, v) };
    OK
}

pub fn array(ctx: Ctx, len: usize) {
    // SAFETY: ctx is live; the caller emits exactly `len` elements next.
    unsafe { api!(RedisModule_ReplyWithArray)(ctx, len as c_long) };
}

fn value(ctx: Ctx, v: &Value<'_>) {
    match v {
        Value::Int(i) => {
            int(ctx, *i);
        }
        Value::Str(s) => {
            bulk(ctx, s.as_bytes());
        }
        Value::BulkList(items) => {
            array(ctx, items.len());
            for item in items {
                bulk(ctx, item);
            }
        }
    }
}

/// Replies with name/value pairs: a map under RESP3, a flat array under RESP2.
pub fn pairs(ctx: Ctx, fields: &[(&str, Value<'_>)]) -> c_int {
    // SAFETY: ctx is live; exactly fields.len() key/value pairs follow.
    unsafe { api!(RedisModule_ReplyWithMap)(ctx, fields.len() as c_long) };
    for (name, v) in fields {
        bulk(ctx, name.as_bytes());
        value(ctx, v);
    }
    OK
}
