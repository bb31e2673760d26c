//! TIERCACHE.INVALIDATE, TIERCACHE.TAGCOUNT and TIERCACHE.TAGKEYS: invalidating and inspecting tags.

use std::os::raw::c_int;

use tiercache_core::num::parse_i64;

use crate::acl::{self, Access};
use crate::ffi::{api, bytes, Ctx, RStr};
use crate::reply;
use crate::stats;
use crate::tagindex;

/// Most tags one INVALIDATE may name.
const MAX_INVALIDATE_TAGS: usize = 1024;

/// TIERCACHE.INVALIDATE tag [tag ...]
///
/// O(1) per tag whatever the number of keys: the tags' slots are dropped (every entry written under
/// them stops being valid at once) and their key sets are queued for incremental reclaim. Replicated
/// verbatim; replicas and AOF replay apply the same epoch change, and receive the reclaim as DELs.
pub fn invalidate(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() < 2 {
        return reply::wrong_arity(ctx);
    }
    let tags: Vec<&[u8]> = args[1..].iter().map(|&s| bytes(s)).collect();
    if tags.len() > MAX_INVALIDATE_TAGS {
        return reply::error(ctx, &format!("ERR too many tags: at most {MAX_INVALIDATE_TAGS} per INVALIDATE"));
    }
    if tags.iter().any(|t| t.is_empty()) {
        return reply::error(ctx, "ERR tags must not be empty strings");
    }
    // Invalidating deletes entries: write permission on every tag, or nothing is invalidated.
    if let Err(e) = acl::check(ctx, &args[1..], Access::Write) {
        return reply::error(ctx, e);
    }
    let count = tagindex::invalidate(ctx, &tags);
    // SAFETY: live command context.
    unsafe { api!(RedisModule_ReplicateVerbatim)(ctx) };
    stats::INVALIDATIONS.bump();
    reply::int(ctx, count as i64)
}

/// TIERCACHE.TAGCOUNT tag
pub fn tagcount(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() != 2 {
        return reply::wrong_arity(ctx);
    }
    if let Err(e) = acl::check(ctx, &args[1..2], Access::Read) {
        return reply::error(ctx, e);
    }
    let db = tagindex::selected_db(ctx);
    let n = tagindex::with(|r| r.tag_count(db, bytes(args[1]))).unwrap_or(0);
    reply::int(ctx, n as i64)
}

/// TIERCACHE.TAGKEYS tag [COUNT n]
pub fn tagkeys(ctx: Ctx, args: &[RStr]) -> c_int {
    let count = match args.len() {
        2 => 100,
        4 if bytes(args[2]).eq_ignore_ascii_case(b"COUNT") => match parse_i64(bytes(args[3])) {
            Some(n) if n > 0 => n as usize,
            Some(_) => return reply::error(ctx, "ERR COUNT must be a positive integer"),
            None => return reply::error(ctx, "ERR value is not an integer or out of range"),
        },
        n if n >= 3 => return reply::error(ctx, "ERR syntax error"),
        _ => return reply::wrong_arity(ctx),
    };
    let user = match acl::check(ctx, &args[1..2], Access::Read) {
        // A user who may read every key (the default user's ~*) needs no per-key check.
        Ok(user) => user.filter(|u| !u.may_all_keys(Access::Read)),
        Err(e) => return reply::error(ctx, e),
    };
    let db = tagindex::selected_db(ctx);
    let tag = bytes(args[1]);
    // Only keys the user may read are listed (up to COUNT of them). The ACL check reads the user's
    // patterns and nothing else (no keyspace access, so no unlink callback can need the index).
    let keys: Vec<Vec<u8>> = tagindex::with(|r| {
        let keys = match &user {
            None => r.tag_keys(db, tag, count),
            Some(u) => r.tag_keys_where(db, tag, count, |k| u.may_bytes(k, Access::Read)),
        };
        keys.into_iter().map(<[u8]>::to_vec).collect()
    })
    .unwrap_or_default();
    reply::array(ctx, keys.len());
    for k in &keys {
        reply::bulk(ctx, k);
    }
    crate::ffi::OK
}
