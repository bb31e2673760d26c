//! ACL for tag names. A tag is subject to the caller's ACL key patterns, as if it were a key: tenants
//! name their tags inside their own key prefix (`tenantA:org:7`), and a user limited to `~tenantA:*`
//! can neither read nor invalidate another tenant's tags. Attaching an entry to a tag (`TIERCACHE.SET
//! ... TAGS`) and invalidating it need write permission on the tag; `TAGCOUNT` and `TAGKEYS` need read
//! permission, and `TAGKEYS` lists only the keys the user may read.
//!
//! Commands that come with no client user are not checked: the master's replication stream and AOF
//! loading (they replay what a checked client already sent), and calls from other modules through
//! `RedisModule_Call` (the calling module decides; its own "C" flag checks the command's keys).
//! Scripts are checked against the user who ran them, like any client.

use std::os::raw::c_int;

use redis_module::raw;

use crate::ffi::{api, free_string, new_string, Ctx, RStr};

/// Redis 7.0's own text for a denied key (processCommand), so clients see one error for both.
pub const NOPERM: &str = "NOPERM this user has no permissions to access one of the keys used as arguments";

/// What a command does with a tag or key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reads it (`%R~` or `~` patterns grant it).
    Read,
    /// Writes it (`%W~` or `~` patterns grant it).
    Write,
}

impl Access {
    fn flags(self) -> i32 {
        match self {
            Access::Read => raw::REDISMODULE_CMD_KEY_ACCESS as i32,
            Access::Write => raw::REDISMODULE_CMD_KEY_UPDATE as i32,
        }
    }
}

/// The ACL user of the client running the command, freed on drop.
pub struct User {
    ctx: Ctx,
    user: *mut raw::RedisModuleUser,
    /// The user's name (created with `ctx`, freed on drop), to find it again later (see
    /// [`User::by_name`]). Kept as Redis made it: a copy would cost every tagged SET an allocation.
    name: RStr,
}

impl User {
    /// The calling client's user; `None` when the command has no client user (see the module doc).
    ///
    /// Redis 7.0's `GetCurrentUserName` dereferences the client's user without a check, and the
    /// master's client has none: it would crash a replica. So the name is taken by client id, which
    /// answers NULL for a client without a user (the master) or that is not a connection (AOF loading,
    /// a module's call, a script). A script's client does carry its caller's user, so under Lua (never
    /// replayed from the master or the AOF here: those are excluded first) `GetCurrentUserName` is used.
    /// `flags` are the command's context flags (`RedisModule_GetContextFlags`, read once per command).
    pub fn current(ctx: Ctx, flags: c_int) -> Option<User> {
        let no_user = (raw::REDISMODULE_CTX_FLAGS_REPLICATED | raw::REDISMODULE_CTX_FLAGS_LOADING) as i32;
        if flags & no_user != 0 {
            return None;
        }
        // SAFETY: as above; 0 means no client.
        let id = unsafe { api!(RedisModule_GetClientId)(ctx) };
        if id == 0 {
            return None;
        }
        // SAFETY: as above. The result is NULL (no such connected client, or no user) or a new string
        // we own and free below.
        let mut name = unsafe { api!(RedisModule_GetClientUserNameById)(ctx, id) };
        if name.is_null() && flags & raw::REDISMODULE_CTX_FLAGS_LUA as i32 != 0 {
            // SAFETY: a script's client has its caller's user, which is NULL only for the master's
            // client. A 7.0 master replicates a script's effects, never the script (and this module
            // cannot load on an older master), and AOF loading returned above: the caller here is a
            // connected client with a user.
            name = unsafe { api!(RedisModule_GetCurrentUserName)(ctx) };
        }
        if name.is_null() {
            return None;
        }
        // SAFETY: name is a live string; the result is NULL or a handle we free in Drop.
        let user = unsafe { api!(RedisModule_GetModuleUserFromUserName)(name) };
        if user.is_null() {
            free_string(ctx, name);
            return None;
        }
        Some(User { ctx, user, name })
    }

    /// The user's name, to look it up again with [`User::by_name`] after the command returned (a handle
    /// must not be kept across event-loop iterations: the user could be deleted meanwhile).
    pub fn name(&self) -> &[u8] {
        crate::ffi::bytes(self.name)
    }

    /// Looks a user up by name outside a command (no ACL LOG entries: there is no command context).
    pub fn by_name(name: &[u8]) -> Option<User> {
        let s = new_string(std::ptr::null_mut(), name);
        // SAFETY: s is a live string; the result is NULL or a handle we free in Drop.
        let user = unsafe { api!(RedisModule_GetModuleUserFromUserName)(s) };
        if user.is_null() {
            free_string(std::ptr::null_mut(), s);
            return None;
        }
        Some(User { ctx: std::ptr::null_mut(), user, name: s })
    }

    /// Whether the user's key patterns allow `access` to the name `name` (a command argument or a
    /// string we created).
    pub fn may(&self, name: RStr, access: Access) -> bool {
        // SAFETY: self.user is a live user handle; name is a live string; the flags are key-spec
        // access flags, which is what this API takes.
        unsafe { api!(RedisModule_ACLCheckKeyPermissions)(self.user, name, access.flags()) == crate::ffi::OK }
    }

    /// Like [`User::may`] for a name given as bytes (binary-safe).
    pub fn may_bytes(&self, name: &[u8], access: Access) -> bool {
        let s = new_string(std::ptr::null_mut(), name);
        let ok = self.may(s, access);
        free_string(std::ptr::null_mut(), s);
        ok
    }

    /// Whether `access` is allowed to every key. Probes the empty name: a glob pattern matches it only
    /// if it is made of `*` alone, which matches every name, and an all-keys user passes without a
    /// pattern. So one check tells whether per-key checks can be skipped (the default user's `~*`).
    pub fn may_all_keys(&self, access: Access) -> bool {
        self.may_bytes(b"", access)
    }

    /// Checks every name and records the first denial in `ACL LOG`, as Redis does for keys; returns
    /// whether all are allowed.
    pub fn may_all(&self, names: &[RStr], access: Access) -> bool {
        match names.iter().find(|&&n| !self.may(n, access)) {
            None => true,
            Some(&denied) => {
                self.log_denied(denied);
                false
            }
        }
    }

    fn log_denied(&self, name: RStr) {
        if self.ctx.is_null() {
            return;
        }
        // SAFETY: the API table is read-only after load; `ACLAddLogEntry` may be absent from a server
        // that lacks it, in which case there is nothing to record.
        if let Some(add) = unsafe { raw::RedisModule_ACLAddLogEntry } {
            // SAFETY: live command context, user handle and string; Redis copies what it keeps.
            unsafe { add(self.ctx, self.user, name, raw::RedisModuleACLLogEntryReason_REDISMODULE_ACL_LOG_KEY) };
        }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        // SAFETY: self.user came from GetModuleUserFromUserName and is freed once.
        unsafe { api!(RedisModule_FreeModuleUser)(self.user) };
        // Created with self.ctx (the command's, or none), freed once, not used after.
        free_string(self.ctx, self.name);
    }
}

/// Like [`check`] for names given as bytes, with the command's context flags.
pub fn check_bytes(ctx: Ctx, flags: c_int, names: &[&[u8]], access: Access) -> Result<(), &'static str> {
    let Some(user) = User::current(ctx, flags) else {
        return Ok(());
    };
    match names.iter().find(|n| !user.may_bytes(n, access)) {
        None => Ok(()),
        Some(denied) => {
            let s = new_string(std::ptr::null_mut(), denied);
            user.log_denied(s);
            free_string(std::ptr::null_mut(), s);
            Err(NOPERM)
        }
    }
}

/// Checks `names` (command arguments) for `access` by the calling client's user. `Err(NOPERM)` when one
/// is denied; `Ok(None)` when the command has no client user, `Ok(Some(user))` otherwise (for further
/// checks, e.g. TAGKEYS filtering its keys).
pub fn check(ctx: Ctx, names: &[RStr], access: Access) -> Result<Option<User>, &'static str> {
    // SAFETY: ctx is the live command context.
    check_with(ctx, unsafe { api!(RedisModule_GetContextFlags)(ctx) }, names, access)
}

/// [`check`] given the command's context flags, for a command that read them already.
pub fn check_with(ctx: Ctx, flags: c_int, names: &[RStr], access: Access) -> Result<Option<User>, &'static str> {
    match User::current(ctx, flags) {
        None => Ok(None),
        Some(user) if user.may_all(names, access) => Ok(Some(user)),
        Some(_) => Err(NOPERM),
    }
}
