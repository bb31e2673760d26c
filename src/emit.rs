//! The effect form of an entry: the `TIERCACHE.SET` argument list that recreates it exactly on a replica
//! or from the AOF — the stored (already compressed) bytes with `ENCODING`, the absolute fresh deadline
//! (`PXAT`), the creation time and the tags. Relative inputs (EX/PX) are never sent on.

use std::os::raw::c_char;

use tiercache_core::{Entry, NO_DEADLINE};

use crate::ffi::{api, free_string, new_string, Ctx, RStr};

/// What to say about the key's own TTL.
pub enum KeyTtl {
    /// `STALE seconds` after the fresh deadline (the key's TTL is derived from it, as on the master).
    Stale(i64),
    /// `KEEPTTL`: leave the key's TTL to whatever follows (AOF rewrite appends its own PEXPIREAT).
    Keep,
}

/// A SET argument vector; strings we created are freed on drop, a borrowed key is not.
pub struct SetArgv {
    ctx: Ctx,
    argv: Vec<RStr>,
    owns_key: bool,
}

impl SetArgv {
    /// The SET for a command's own key (`key` is an argv string, retained by Redis as needed).
    pub fn new(ctx: Ctx, key: RStr, entry: &Entry, ttl: KeyTtl) -> Self {
        Self::build(ctx, key, false, entry, ttl)
    }

    /// The SET for an AOF rewrite. Redis hands the rewrite callback a key string that lives on its
    /// stack and must not be retained, so the key is copied.
    pub fn for_aof(key: RStr, entry: &Entry) -> Self {
        let ctx = std::ptr::null_mut();
        Self::build(ctx, new_string(ctx, crate::ffi::bytes(key)), true, entry, KeyTtl::Keep)
    }

    fn build(ctx: Ctx, key: RStr, owns_key: bool, entry: &Entry, ttl: KeyTtl) -> Self {
        let mut a = SetArgv { ctx, argv: Vec::with_capacity(12 + entry.tags().len()), owns_key };
        a.argv.push(key);
        a.bytes(entry.stored());
        a.bytes(b"ENCODING");
        a.bytes(entry.encoding().name().as_bytes());
        if entry.fresh_until() != NO_DEADLINE {
            a.bytes(b"PXAT");
            a.int(entry.fresh_until());
        }
        match ttl {
            KeyTtl::Stale(ms) if entry.fresh_until() != NO_DEADLINE && ms > 0 => {
                a.bytes(b"STALE");
                a.int(ms / 1000);
            }
            KeyTtl::Stale(_) => {}
            KeyTtl::Keep => a.bytes(b"KEEPTTL"),
        }
        a.bytes(b"CREATED");
        a.int(entry.created());
        let tags = entry.tags();
        if !tags.is_empty() {
            a.bytes(b"TAGS");
            a.int(tags.len() as i64);
            for t in tags.iter() {
                a.bytes(t);
            }
        }
        a
    }

    fn bytes(&mut self, b: &[u8]) {
        self.argv.push(new_string(self.ctx, b));
    }

    fn int(&mut self, v: i64) {
        // SAFETY: creates a new string owned by us (freed on drop).
        self.argv.push(unsafe { api!(RedisModule_CreateStringFromLongLong)(self.ctx, v) });
    }

    /// Propagates the SET to replicas and the AOF.
    pub fn replicate(&self) {
        // SAFETY: ctx is the live command context; the "v" format takes an array of strings and its
        // length; Redis retains what it needs.
        unsafe {
            api!(RedisModule_Replicate)(self.ctx, c"TIERCACHE.SET".as_ptr(), c"v".as_ptr(), self.argv.as_ptr(), self.argv.len());
        }
    }

    /// Writes the SET into an AOF rewrite.
    pub fn emit_aof(&self, aof: *mut redis_module::raw::RedisModuleIO) {
        // SAFETY: aof is the live rewrite IO handle; same "v" format as above.
        unsafe {
            api!(RedisModule_EmitAOF)(aof, c"TIERCACHE.SET".as_ptr() as *const c_char, c"v".as_ptr(), self.argv.as_ptr(), self.argv.len());
        }
    }
}

impl Drop for SetArgv {
    fn drop(&mut self) {
        let skip = usize::from(!self.owns_key);
        for &s in &self.argv[skip..] {
            free_string(self.ctx, s);
        }
    }
}
