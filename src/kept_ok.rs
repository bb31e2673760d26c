//! The kept `+OK`: a call reply made once at load and sent for every `+OK` with
//! `RedisModule_ReplyWithCallReply` (one `addReplyProto`), where `RedisModule_ReplyWithSimpleString`
//! allocates, sanitises and frees a string each time (BENCHMARKS.md, Write path).
//!
//! One source for two modules: this one (`mod kept_ok`, used by reply.rs) and the measuring module in
//! benches/floor (included by path), so that the floor measures exactly the reply TIERCACHE.SET sends.
//! It needs nothing but Redis's API table.

use std::ptr::null_mut;

use redis_module::raw::{self, RedisModuleCallReply, RedisModuleCtx};

/// The reply of `SELECT 0` on the module's own temporary client (call it from OnLoad): it changes
/// nothing anyone sees, since each `RedisModule_Call` selects its caller's database first. Returned only
/// if it is exactly `+OK\r\n`, to be kept for the life of the process and never freed; null otherwise
/// (a renamed or disabled SELECT), and the caller replies with a plain simple string.
pub fn make(ctx: *mut RedisModuleCtx) -> *mut RedisModuleCallReply {
    // SAFETY: the API table is filled by RedisModule_Init before OnLoad code runs and only read here;
    // `ctx` is the OnLoad context; "c" takes one C string; the reply is checked, then either handed to
    // the caller (no auto-memory on this context, so nothing frees it) or freed here, once.
    unsafe {
        let (Some(call), Some(proto_of), Some(free)) =
            (raw::RedisModule_Call, raw::RedisModule_CallReplyProto, raw::RedisModule_FreeCallReply)
        else {
            return null_mut();
        };
        let r = call(ctx, c"SELECT".as_ptr(), c"c".as_ptr(), c"0".as_ptr());
        if r.is_null() {
            return r;
        }
        let mut len = 0usize;
        let proto = proto_of(r, &mut len);
        if !proto.is_null() && std::slice::from_raw_parts(proto.cast::<u8>(), len) == b"+OK\r\n" {
            r
        } else {
            free(r);
            null_mut()
        }
    }
}
