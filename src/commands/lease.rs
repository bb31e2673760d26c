//! TIERCACHE.RELEASE: giving a fill lease back without a value.

use std::os::raw::c_int;

use tiercache_core::args::parse_token;

use crate::ffi::{bytes, Ctx, RStr};
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
