//! TIERCACHE.RELEASE (giving a fill lease back without a value) and TIERCACHE.DEL (a delete that fences
//! fills).

use std::os::raw::c_int;

use tiercache_core::args::parse_token;

use crate::ffi::{api, bytes, hot, Ctx, RStr};
use crate::keys::{Slot, WriteKey};
use crate::{leases, reply, tagindex};

/// TIERCACHE.RELEASE key token [PASS]
///
/// 1 if `token` held the lease on `key` (it is released), else 0. Without PASS the first parked reader
/// takes the lease over (FILL); with PASS every parked reader is answered PASS: load from the origin
/// yourself and do not cache (hit-for-pass).
pub fn release(ctx: Ctx, args: &[RStr]) -> c_int {
    let pass = match args.len() {
        3 => false,
        4 if bytes(args[3]).eq_ignore_ascii_case(b"PASS") => true,
        4 => return reply::error(ctx, "ERR syntax error"),
        _ => return reply::wrong_arity(ctx),
    };
    let Some(token) = parse_token(bytes(args[2])) else {
        return reply::error(ctx, "ERR invalid lease token");
    };
    let db = tagindex::selected_db(ctx);
    reply::int(ctx, i64::from(leases::release(ctx, db, bytes(args[1]), token, pass)))
}

/// TIERCACHE.DEL key [key ...]
///
/// Deletes the keys (like DEL) and fences every fill lease on them, even on keys that do not exist:
/// a loader that read the database before this delete cannot store its value afterwards. This is the
/// delete for cache-aside updates (write the database, then TIERCACHE.DEL).
pub fn del(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() < 2 {
        return reply::wrong_arity(ctx);
    }
    let db = tagindex::selected_db(ctx);
    let mut deleted = 0;
    for &name in &args[1..] {
        leases::key_changed(db, bytes(name));
        let mut key = WriteKey::open(ctx, name);
        if !matches!(key.slot(), Slot::Empty) && key.delete() {
            drop(key);
            deleted += 1;
            // SAFETY: live command context and key name.
            unsafe {
                hot!(RedisModule_NotifyKeyspaceEvent)(ctx, redis_module::raw::REDISMODULE_NOTIFY_GENERIC, c"del".as_ptr(), name)
            };
        }
    }
    if deleted > 0 {
        // SAFETY: live command context; "v" takes the key strings (argv entries) and their count.
        unsafe { api!(RedisModule_Replicate)(ctx, c"DEL".as_ptr(), c"v".as_ptr(), args[1..].as_ptr(), args.len() - 1) };
    }
    reply::int(ctx, deleted)
}
