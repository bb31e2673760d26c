//! TIERCACHE.DEBUG PANIC: proves the panic guard end to end. The panic is caught at the command's FFI
//! entry, written to the Redis log by the module's panic hook, and answered with an error; Redis keeps
//! running. Refused unless the server allows DEBUG (`enable-debug-command yes` or `local`).

use std::os::raw::c_int;

use crate::ffi::{bytes, server_config, Ctx, RStr};
use crate::reply;

/// TIERCACHE.DEBUG PANIC
pub fn debug(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() != 2 {
        return reply::wrong_arity(ctx);
    }
    let allowed = matches!(server_config(ctx, c"enable-debug-command").as_deref(), Some(b"yes" | b"local"));
    if !allowed {
        return reply::error(ctx, "ERR TIERCACHE.DEBUG is not allowed: set enable-debug-command to yes or local");
    }
    if bytes(args[1]).eq_ignore_ascii_case(b"PANIC") {
        panic!("TIERCACHE.DEBUG PANIC was called");
    }
    reply::error(ctx, "ERR unknown subcommand for TIERCACHE.DEBUG (PANIC is the only one)")
}
