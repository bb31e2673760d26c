//! TIERCACHE.STATS: the module's counters, the same fields as `INFO tiercache`.

use std::os::raw::c_int;

use crate::ffi::{Ctx, RStr};
use crate::reply;

/// TIERCACHE.STATS
pub fn stats(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() != 1 {
        return reply::wrong_arity(ctx);
    }
    reply::pairs(ctx, &crate::stats::fields())
}
