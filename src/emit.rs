//! The effect form of an entry: the `TIERCACHE.SET` argument list that recreates it exactly on a replica
//! or from the AOF — the stored (already compressed) bytes with `ENCODING`, the absolute fresh deadline
//! (`PXAT`), the creation time and the tags. Relative inputs (EX/PX) are never sent on.

use std::sync::OnceLock;

use tiercache_core::{Encoding, Entry, NO_DEADLINE};

use crate::ffi::{api, bytes, free_string, new_string, Ctx, RStr};

/// What to say about the key's own TTL.
pub enum KeyTtl {
    /// `STALE seconds` after the fresh deadline (the key's TTL is derived from it, as on the master).
    Stale(i64),
    /// `KEEPTTL`: leave the key's TTL to whatever follows (AOF rewrite appends its own PEXPIREAT).
    Keep,
}

/// The option words, created once and shared by every SET we propagate (Redis only adds references).
struct Words {
    encoding: RStr,
    raw: RStr,
    lz4: RStr,
    pxat: RStr,
    stale: RStr,
    keepttl: RStr,
    created: RStr,
    tags: RStr,
}

// SAFETY: the strings are immutable and never freed; Redis only touches their reference counts, on the
// main thread (replication) or in a forked rewrite child (AOF), never concurrently.
unsafe impl Send for Words {}
unsafe impl Sync for Words {}

static WORDS: OnceLock<Words> = OnceLock::new();

fn words() -> &'static Words {
    WORDS.get_or_init(|| {
        let w = |s: &[u8]| new_string(std::ptr::null_mut(), s);
        Words {
            encoding: w(b"ENCODING"),
            raw: w(b"raw"),
            lz4: w(b"lz4"),
            pxat: w(b"PXAT"),
            stale: w(b"STALE"),
            keepttl: w(b"KEEPTTL"),
            created: w(b"CREATED"),
            tags: w(b"TAGS"),
        }
    })
}

/// Creates the shared words; call from OnLoad so no command pays for it.
pub fn init() {
    words();
}

/// A SET argument vector. Strings it created are freed on drop; borrowed ones (the command's own key
/// and value, the shared words) are not.
pub struct SetArgv {
    ctx: Ctx,
    argv: Vec<RStr>,
    owned: Vec<RStr>,
}

impl SetArgv {
    /// The SET for a command's own `key`. `value` is the command's value argument when the entry stores
    /// it unchanged (no compression applied here), and `tags` its `numtags tag...` arguments when the entry
    /// kept them all (no repeats): both are passed on without copies.
    pub fn new(ctx: Ctx, key: RStr, value: Option<RStr>, tags: Option<&[RStr]>, entry: &Entry, ttl: KeyTtl) -> Self {
        let mut a = SetArgv { ctx, argv: Vec::with_capacity(12 + entry.tags().len()), owned: Vec::with_capacity(4) };
        a.argv.push(key);
        a.fill(value, tags, entry, ttl);
        a
    }

    /// The SET for an AOF rewrite. Redis hands the rewrite callback a key string that lives on its
    /// stack and must not be retained, so the key is copied.
    pub fn for_aof(key: RStr, entry: &Entry) -> Self {
        let mut a = SetArgv { ctx: std::ptr::null_mut(), argv: Vec::with_capacity(12 + entry.tags().len()), owned: Vec::new() };
        a.own_bytes(bytes(key));
        a.fill(None, None, entry, KeyTtl::Keep);
        a
    }

    fn fill(&mut self, value: Option<RStr>, tag_args: Option<&[RStr]>, entry: &Entry, ttl: KeyTtl) {
        let w = words();
        match value {
            Some(v) => self.argv.push(v),
            None => self.own_bytes(entry.stored()),
        }
        self.argv.push(w.encoding);
        self.argv.push(match entry.encoding() {
            Encoding::Raw => w.raw,
            Encoding::Lz4 => w.lz4,
        });
        if entry.fresh_until() != NO_DEADLINE {
            self.argv.push(w.pxat);
            self.own_int(entry.fresh_until());
        }
        match ttl {
            KeyTtl::Stale(ms) if entry.fresh_until() != NO_DEADLINE && ms > 0 => {
                self.argv.push(w.stale);
                self.own_int(ms / 1000);
            }
            KeyTtl::Stale(_) => {}
            KeyTtl::Keep => self.argv.push(w.keepttl),
        }
        self.argv.push(w.created);
        self.own_int(entry.created());
        let tags = entry.tags();
        if !tags.is_empty() {
            self.argv.push(w.tags);
            match tag_args {
                Some(args) => self.argv.extend_from_slice(args),
                None => {
                    self.own_int(tags.len() as i64);
                    for t in tags.iter() {
                        self.own_bytes(t);
                    }
                }
            }
        }
    }

    fn own(&mut self, s: RStr) {
        self.argv.push(s);
        self.owned.push(s);
    }

    fn own_bytes(&mut self, b: &[u8]) {
        self.own(new_string(self.ctx, b));
    }

    fn own_int(&mut self, v: i64) {
        // SAFETY: creates a new string, freed on drop.
        self.own(unsafe { api!(RedisModule_CreateStringFromLongLong)(self.ctx, v) });
    }

    /// Propagates the SET to replicas and the AOF.
    pub fn replicate(&self) {
        // SAFETY: ctx is the live command context; the "v" format takes an array of strings and its
        // length; Redis adds references to what it keeps.
        unsafe {
            api!(RedisModule_Replicate)(self.ctx, c"TIERCACHE.SET".as_ptr(), c"v".as_ptr(), self.argv.as_ptr(), self.argv.len());
        }
    }

    /// Writes the SET into an AOF rewrite.
    pub fn emit_aof(&self, aof: *mut redis_module::raw::RedisModuleIO) {
        // SAFETY: aof is the live rewrite IO handle; same "v" format as above.
        unsafe {
            api!(RedisModule_EmitAOF)(aof, c"TIERCACHE.SET".as_ptr(), c"v".as_ptr(), self.argv.as_ptr(), self.argv.len());
        }
    }
}

impl Drop for SetArgv {
    fn drop(&mut self) {
        for &s in &self.owned {
            free_string(self.ctx, s);
        }
    }
}
