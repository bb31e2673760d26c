//! The command table: names, handlers, flags, arity and key specs (what `COMMAND INFO` and
//! `COMMAND DOCS` show), registered from one place.

mod debug;
mod entry;
mod lease;
mod stats;
mod tags;

pub use tags::apply_invalidate;

use std::ffi::CStr;
use std::os::raw::c_int;

use redis_module::raw;

use crate::ffi::{api, guard_command, log, Ctx, RStr, OK};

type Handler = unsafe extern "C" fn(Ctx, *mut RStr, c_int) -> c_int;

/// Wraps a command body into an `extern "C"` handler with the panic guard.
macro_rules! handler {
    ($body:path) => {{
        unsafe extern "C" fn h(ctx: Ctx, argv: *mut RStr, argc: c_int) -> c_int {
            guard_command(ctx, argv, argc, $body)
        }
        h as Handler
    }};
}

/// How a command touches its key (argument 1), if it has one.
#[derive(Clone, Copy)]
enum KeyAccess {
    None,
    /// Reads the key's value: RO | ACCESS (lets `%R~` ACL users call it; tracked by client tracking).
    Read,
    /// Replaces the key's value: OW | UPDATE.
    Overwrite,
    /// Deletes every key from argument 1 on: RM | DELETE.
    DeleteAll,
}

struct Command {
    name: &'static CStr,
    handler: Handler,
    flags: &'static CStr,
    arity: c_int,
    key: KeyAccess,
    summary: &'static CStr,
    complexity: &'static CStr,
}

fn table() -> [Command; 10] {
    [
        Command {
            name: c"tiercache.set",
            handler: handler!(entry::set),
            flags: c"write deny-oom",
            arity: -3,
            key: KeyAccess::Overwrite,
            summary: c"Stores a cache entry with a fresh period, a stale window, tags and optional lz4 compression.",
            complexity: c"O(N) where N is the size of the value (compression) plus the number of tags.",
        },
        Command {
            name: c"tiercache.get",
            handler: handler!(entry::get),
            // `blocking`: with LEASE ... WAIT the caller may be parked.
            flags: c"readonly fast blocking",
            arity: -2,
            key: KeyAccess::Read,
            summary: c"Returns the value of a cache entry while it is fresh; with LEASE, coordinates one fill per miss across all clients.",
            complexity: c"O(1), plus O(N) to decompress an lz4 entry of N bytes.",
        },
        Command {
            name: c"tiercache.meta",
            handler: handler!(entry::meta),
            flags: c"readonly fast",
            arity: 2,
            key: KeyAccess::Read,
            summary: c"Describes a cache entry: state, deadlines, tags, encoding and sizes.",
            complexity: c"O(T) where T is the number of tags.",
        },
        Command {
            name: c"tiercache.stats",
            handler: handler!(stats::stats),
            flags: c"readonly fast",
            arity: 1,
            key: KeyAccess::None,
            summary: c"Returns the module's counters (the same fields as INFO tiercache).",
            complexity: c"O(1)",
        },
        Command {
            name: c"tiercache.invalidate",
            handler: handler!(tags::invalidate),
            flags: c"write blocking",
            arity: -2,
            key: KeyAccess::None,
            summary: c"Invalidates every entry carrying any of the tags (on every master of a cluster unless LOCAL); their memory is reclaimed incrementally.",
            complexity: c"O(T) for T tags, independent of the number of entries carrying them.",
        },
        Command {
            name: c"tiercache.tagcount",
            handler: handler!(tags::tagcount),
            // `blocking`: on a cluster node the caller waits for the other masters.
            flags: c"readonly blocking",
            arity: -2,
            key: KeyAccess::None,
            summary: c"Returns the number of live entries carrying a tag (on every master of a cluster unless LOCAL).",
            complexity: c"O(1)",
        },
        Command {
            name: c"tiercache.tagkeys",
            handler: handler!(tags::tagkeys),
            flags: c"readonly blocking",
            arity: -2,
            key: KeyAccess::None,
            summary: c"Returns up to COUNT (default 100) keys of live entries carrying a tag (from every master of a cluster unless LOCAL).",
            complexity: c"O(N) for N keys returned",
        },
        Command {
            name: c"tiercache.release",
            handler: handler!(lease::release),
            flags: c"fast",
            arity: -3,
            key: KeyAccess::Read,
            summary: c"Gives a fill lease back without a value: the next waiter loads (or, with PASS, every waiter loads itself without caching).",
            complexity: c"O(W) for W parked readers woken",
        },
        Command {
            name: c"tiercache.del",
            handler: handler!(lease::del),
            flags: c"write",
            arity: -2,
            key: KeyAccess::DeleteAll,
            summary: c"Deletes keys like DEL and fences every fill lease on them, even on keys that do not exist.",
            complexity: c"O(N) for N keys",
        },
        Command {
            name: c"tiercache.debug",
            handler: handler!(debug::debug),
            flags: c"admin deny-script",
            arity: 2,
            key: KeyAccess::None,
            summary: c"PANIC: raises a panic inside the module to show it is caught, logged and answered with an error (needs enable-debug-command).",
            complexity: c"O(1)",
        },
    ]
}

/// Creates every command and attaches its documentation and key specs. Call from OnLoad.
pub fn register(ctx: Ctx) -> bool {
    for cmd in table() {
        let (first, last, step) = match cmd.key {
            KeyAccess::None => (0, 0, 0),
            KeyAccess::DeleteAll => (1, -1, 1),
            _ => (1, 1, 1),
        };
        // SAFETY: OnLoad context; the name and flags are C strings; the handler is a valid extern fn.
        let rc = unsafe {
            api!(RedisModule_CreateCommand)(ctx, cmd.name.as_ptr(), Some(cmd.handler), cmd.flags.as_ptr(), first, last, step)
        };
        if rc != OK || !set_info(ctx, &cmd) {
            log(ctx, "warning", &format!("tiercache: cannot register {}", cmd.name.to_string_lossy()));
            return false;
        }
    }
    true
}

fn set_info(ctx: Ctx, cmd: &Command) -> bool {
    let flags = match cmd.key {
        KeyAccess::None => 0,
        KeyAccess::Read => (raw::REDISMODULE_CMD_KEY_RO | raw::REDISMODULE_CMD_KEY_ACCESS) as u64,
        KeyAccess::Overwrite => (raw::REDISMODULE_CMD_KEY_OW | raw::REDISMODULE_CMD_KEY_UPDATE) as u64,
        KeyAccess::DeleteAll => (raw::REDISMODULE_CMD_KEY_RM | raw::REDISMODULE_CMD_KEY_DELETE) as u64,
    };
    // SAFETY: all-zero is the documented terminator (and "unset") for key specs.
    let mut specs: [raw::RedisModuleCommandKeySpec; 2] = unsafe { std::mem::zeroed() };
    specs[0].flags = flags;
    specs[0].begin_search_type = raw::RedisModuleKeySpecBeginSearchType_REDISMODULE_KSPEC_BS_INDEX;
    specs[0].bs.index.pos = 1;
    specs[0].find_keys_type = raw::RedisModuleKeySpecFindKeysType_REDISMODULE_KSPEC_FK_RANGE;
    specs[0].fk.range.lastkey = if matches!(cmd.key, KeyAccess::DeleteAll) { -1 } else { 0 };
    specs[0].fk.range.keystep = 1;
    specs[0].fk.range.limit = 0;
    let version = raw::RedisModuleCommandInfoVersion {
        version: 1,
        sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
        sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
        sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
    };
    let mut info = raw::RedisModuleCommandInfo {
        version: &version,
        summary: cmd.summary.as_ptr(),
        complexity: cmd.complexity.as_ptr(),
        since: c"0.1.0".as_ptr(),
        history: std::ptr::null_mut(),
        tips: std::ptr::null(),
        arity: cmd.arity,
        key_specs: if matches!(cmd.key, KeyAccess::None) { std::ptr::null_mut() } else { specs.as_mut_ptr() },
        args: std::ptr::null_mut(),
    };
    // SAFETY: OnLoad context; the command was just created; Redis copies everything it keeps from
    // `info`, whose pointers are valid for this call.
    unsafe {
        let command = api!(RedisModule_GetCommand)(ctx, cmd.name.as_ptr());
        !command.is_null() && api!(RedisModule_SetCommandInfo)(command, &mut info) == OK
    }
}
