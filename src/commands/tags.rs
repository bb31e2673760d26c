//! TIERCACHE.INVALIDATE, TIERCACHE.TAGCOUNT and TIERCACHE.TAGKEYS: invalidating and inspecting tags, on
//! this node or (Redis Cluster, without `LOCAL`) on every master through `src/cluster.rs`.

use std::os::raw::c_int;

use tiercache_core::num::parse_i64;

use tiercache_core::cluster::{Op, Request};

use crate::acl::{self, Access};
use crate::cluster;
use crate::ffi::{api, bytes, free_string, new_string, Ctx, RStr};
use crate::reply;
use crate::stats;
use crate::tagindex;

/// Most tags one INVALIDATE may name.
const MAX_INVALIDATE_TAGS: usize = 1024;

/// TIERCACHE.INVALIDATE [LOCAL] tag [tag ...]
///
/// O(1) per tag whatever the number of keys: the tags' slots are dropped (every entry written under
/// them stops being valid at once) and their key sets are queued for incremental reclaim. Replicated
/// as `TIERCACHE.INVALIDATE LOCAL tag...`; replicas and AOF replay apply the same epoch change, and
/// receive the reclaim as DELs. On a cluster node without `LOCAL`, every other master does the same
/// (`src/cluster.rs`) and the reply is the cluster-wide count.
pub fn invalidate(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() < 2 {
        return reply::wrong_arity(ctx);
    }
    // `LOCAL` is an option only when tags follow it (`INVALIDATE LOCAL` alone invalidates a tag named LOCAL).
    let local = args.len() > 2 && bytes(args[1]).eq_ignore_ascii_case(b"LOCAL");
    let names = if local { &args[2..] } else { &args[1..] };
    let tags: Vec<&[u8]> = names.iter().map(|&s| bytes(s)).collect();
    if tags.len() > MAX_INVALIDATE_TAGS {
        return reply::error(ctx, &format!("ERR too many tags: at most {MAX_INVALIDATE_TAGS} per INVALIDATE"));
    }
    if tags.iter().any(|t| t.is_empty()) {
        return reply::error(ctx, "ERR tags must not be empty strings");
    }
    let wide = !local && cluster::fan_out_wanted(ctx);
    if wide && cluster::cannot_block(ctx) {
        return reply::error(ctx, NO_BLOCK_INVALIDATE);
    }
    // Invalidating deletes entries: write permission on every tag, or nothing is invalidated.
    if let Err(e) = acl::check(ctx, names, Access::Write) {
        return reply::error(ctx, e);
    }
    let count = apply_invalidate(ctx, &tags, Some(names));
    if wide {
        let req = Request { id: 0, op: Op::Invalidate, db: tagindex::selected_db(ctx) as u64, count: 0, tags: owned(&tags) };
        return cluster::fan_out(ctx, req, count as u64, Vec::new(), None);
    }
    reply::int(ctx, count as i64)
}

const NO_BLOCK_INVALIDATE: &str =
    "ERR cluster-wide TIERCACHE.INVALIDATE cannot wait for the other masters inside MULTI or a script: \
     use TIERCACHE.INVALIDATE LOCAL there (it invalidates on this master only), or send it outside the transaction";

fn owned(tags: &[&[u8]]) -> Vec<Vec<u8>> {
    tags.iter().map(|t| t.to_vec()).collect()
}

/// Invalidates `tags` in the selected database of this node and replicates `TIERCACHE.INVALIDATE LOCAL
/// tag...` (the command's own arguments, `names`, when it has them; a cluster request builds them).
/// Used by the command and by a master applying another master's request.
pub fn apply_invalidate(ctx: Ctx, tags: &[&[u8]], names: Option<&[RStr]>) -> usize {
    let count = tagindex::invalidate(ctx, tags);
    let made: Vec<RStr> = if names.is_none() { tags.iter().map(|t| new_string(ctx, t)).collect() } else { Vec::new() };
    let list = names.unwrap_or(&made);
    // SAFETY: live context; "cv" takes a C string and an array of `len` live strings, which Redis
    // retains as needed.
    unsafe {
        api!(RedisModule_Replicate)(
            ctx,
            c"TIERCACHE.INVALIDATE".as_ptr(),
            c"cv".as_ptr(),
            c"LOCAL".as_ptr(),
            list.as_ptr(),
            list.len(),
        )
    };
    for s in made {
        free_string(ctx, s);
    }
    stats::INVALIDATIONS.bump();
    count
}

/// TIERCACHE.TAGCOUNT tag [LOCAL]
pub fn tagcount(ctx: Ctx, args: &[RStr]) -> c_int {
    let local = match args.len() {
        2 => false,
        3 if bytes(args[2]).eq_ignore_ascii_case(b"LOCAL") => true,
        3 => return reply::error(ctx, "ERR syntax error"),
        _ => return reply::wrong_arity(ctx),
    };
    let wide = !local && cluster::fan_out_wanted(ctx);
    if wide && cluster::cannot_block(ctx) {
        return reply::error(ctx, &no_block("TAGCOUNT"));
    }
    if let Err(e) = acl::check(ctx, &args[1..2], Access::Read) {
        return reply::error(ctx, e);
    }
    let db = tagindex::selected_db(ctx);
    // A replica asking the cluster counts the masters only.
    let n = if wide && tagindex::is_replica(ctx) { 0 } else { tagindex::with(|r| r.tag_count(db, bytes(args[1]))).unwrap_or(0) };
    if wide {
        let req = Request { id: 0, op: Op::TagCount, db: db as u64, count: 0, tags: vec![bytes(args[1]).to_vec()] };
        return cluster::fan_out(ctx, req, n as u64, Vec::new(), None);
    }
    reply::int(ctx, n as i64)
}

fn no_block(name: &str) -> String {
    format!(
        "ERR cluster-wide TIERCACHE.{name} cannot wait for the other masters inside MULTI or a script: use \
         TIERCACHE.{name} ... LOCAL there (this master only), or send it outside the transaction"
    )
}

/// TIERCACHE.TAGKEYS tag [COUNT n] [LOCAL]
pub fn tagkeys(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() < 2 {
        return reply::wrong_arity(ctx);
    }
    let (mut count, mut local, mut counted) = (100usize, false, false);
    let mut i = 2;
    // Each option at most once, in any order.
    while i < args.len() {
        let opt = bytes(args[i]);
        if opt.eq_ignore_ascii_case(b"LOCAL") && !local {
            local = true;
            i += 1;
        } else if opt.eq_ignore_ascii_case(b"COUNT") && !counted && i + 1 < args.len() {
            counted = true;
            count = match parse_i64(bytes(args[i + 1])) {
                Some(n) if n > 0 => n as usize,
                Some(_) => return reply::error(ctx, "ERR COUNT must be a positive integer"),
                None => return reply::error(ctx, "ERR value is not an integer or out of range"),
            };
            i += 2;
        } else {
            return reply::error(ctx, "ERR syntax error");
        }
    }
    let wide = !local && cluster::fan_out_wanted(ctx);
    if wide && cluster::cannot_block(ctx) {
        return reply::error(ctx, &no_block("TAGKEYS"));
    }
    let user = match acl::check(ctx, &args[1..2], Access::Read) {
        // A user who may read every key (the default user's ~*) needs no per-key check.
        Ok(user) => user.filter(|u| !u.may_all_keys(Access::Read)),
        Err(e) => return reply::error(ctx, e),
    };
    let db = tagindex::selected_db(ctx);
    let tag = bytes(args[1]);
    // Only keys the user may read are listed (up to COUNT of them). The ACL check reads the user's
    // patterns and nothing else (no keyspace access, so no unlink callback can need the index).
    let keys: Vec<Vec<u8>> = if wide && tagindex::is_replica(ctx) {
        Vec::new()
    } else {
        tagindex::with(|r| {
            let keys = match &user {
                None => r.tag_keys(db, tag, count),
                Some(u) => r.tag_keys_where(db, tag, count, |k| u.may_bytes(k, Access::Read)),
            };
            keys.into_iter().map(<[u8]>::to_vec).collect()
        })
        .unwrap_or_default()
    };
    if wide {
        let req = Request { id: 0, op: Op::TagKeys, db: db as u64, count: count as u64, tags: vec![tag.to_vec()] };
        return cluster::fan_out(ctx, req, 0, keys, user.as_ref());
    }
    reply::array(ctx, keys.len());
    for k in &keys {
        reply::bulk(ctx, k);
    }
    crate::ffi::OK
}
