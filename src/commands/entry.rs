//! TIERCACHE.SET, TIERCACHE.GET and TIERCACHE.META: writing, reading and describing one entry.

use std::cell::RefCell;
use std::os::raw::c_int;

use tiercache_core::args::{parse_get, parse_set, ArgError, Compression, GetArgs, LeaseArgs, SetArgs};
use tiercache_core::entry::Storage;
use tiercache_core::lease::Acquire;
use tiercache_core::lz4::MAX_ORIGINAL_LEN;
use tiercache_core::persist::MAX_PERSISTED_TAGS;
use tiercache_core::{Encoding, Entry, NO_DEADLINE};

use crate::acl::{self, Access};
use crate::config::{self, COMPRESS_MIN_SIZE, MAX_TAGS, MAX_VALUE_SIZE};
use crate::emit::{KeyTtl, SetArgv};
use crate::ffi::{api, bytes, hot, now_ms, ArgBytes, Ctx, RStr};
use crate::keys::{ReadKey, Slot, WriteKey};
use crate::leases;
use crate::propagation;
use crate::reply::{self, Value};
use crate::stats;
use crate::tagindex;

thread_local! {
    /// Reused buffer for decompressing values on the main thread.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Larger scratch buffers are released after use rather than kept for the next GET.
const SCRATCH_KEEP: usize = 1 << 20;

/// TIERCACHE.SET key value [EX s | PX ms | EXAT unix-s | PXAT unix-ms] [KEEPTTL] [STALE s]
///   [TAGS numtags tag [tag ...]] [NOCOMPRESS | ENCODING raw|lz4] [CREATED unix-ms]
///
/// A value whose decoded size exceeds `tiercache.max-value-size` is refused. Everything is validated
/// and the entry is built before the key is touched, so an error changes nothing. The write is
/// propagated as its effect (absolute deadlines, stored bytes; see emit.rs) whenever anything reads the
/// propagated stream, verbatim otherwise (see propagation.rs).
pub fn set(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() < 3 {
        return reply::wrong_arity(ctx);
    }
    // Read once: each read of an argument is a call into Redis. The key's database and name bytes are
    // read on first use: the tag index and the lease table need them, an untagged SET with no lease
    // held anywhere does not.
    let value = bytes(args[2]);
    let target = std::cell::OnceCell::new();
    let key_of = || *target.get_or_init(|| (tagindex::selected_db(ctx), bytes(args[1])));
    // A SET replayed from the master or the AOF recreates an entry that was already accepted: it must
    // not be lost because this server's tiercache.max-tags is lower. It gets the hard bound instead,
    // the same one an RDB load applies (persist::MAX_PERSISTED_TAGS, the config's upper bound). The
    // context flags that tell a replay are read only when a local limit is passed (or for the tags' ACL
    // check): ~130 instructions a SET otherwise.
    let flags = Flags::new(ctx);
    // No options (a plain SET): nothing to parse (SetArgs::NONE is what parsing gives, tested in core),
    // and no option bytes to gather.
    let opts: ArgBytes;
    let parsed = if args.len() == 3 {
        SetArgs::NONE
    } else {
        opts = ArgBytes::new(&args[3..]);
        match parse_set(&opts, MAX_TAGS.get() as usize) {
            Ok(p) => p,
            Err(ArgError::TooManyTags { .. }) if flags.replayed() => match parse_set(&opts, MAX_PERSISTED_TAGS as usize) {
                Ok(p) => p,
                Err(e) => return reply::error(ctx, &e.to_string()),
            },
            Err(e) => return reply::error(ctx, &e.to_string()),
        }
    };
    let now = now_ms();
    let deadlines = match parsed.deadlines(now) {
        Ok(d) => d,
        Err(e) => return reply::error(ctx, &e.to_string()),
    };
    let storage = match parsed.compression {
        Compression::Auto => Storage::Auto { compress_min_size: COMPRESS_MIN_SIZE.get() as usize },
        Compression::Verbatim(encoding) => Storage::Verbatim(encoding),
    };
    // The decoded size is checked before anything is decoded or compressed. Like max-tags, the local
    // max-value-size does not apply to a replayed SET: the hard maximum (what an RDB load accepts) does.
    let local_max = MAX_VALUE_SIZE.get() as usize;
    match storage.decoded_len(value) {
        Ok(n) if n > local_max && (n > MAX_ORIGINAL_LEN || !flags.replayed()) => {
            let max_value = if flags.replayed() { MAX_ORIGINAL_LEN } else { local_max };
            return reply::error(
                ctx,
                &format!("ERR value too large: {n} bytes decoded, more than tiercache.max-value-size ({max_value})"),
            );
        }
        Ok(_) => {}
        Err(e) => return reply::error(ctx, &format!("ERR {e}")),
    }
    // Attaching the entry to a tag needs write permission on the tag (see acl.rs); the key itself was
    // checked by Redis from the command's key spec.
    if !parsed.tags.is_empty() {
        let tag_args = parsed.tags_at.and_then(|at| args.get(3 + at + 1..3 + at + 1 + parsed.tags.len()));
        let checked = match tag_args {
            Some(tag_args) => acl::check_with(ctx, flags.get(), tag_args, Access::Write).map(drop),
            None => acl::check_bytes(ctx, flags.get(), parsed.tags, Access::Write),
        };
        if let Err(e) = checked {
            return reply::error(ctx, e);
        }
    }
    let entry = match Entry::from_value(value, storage, deadlines.fresh_until, parsed.created.unwrap_or(now), parsed.tags) {
        Ok(e) => e,
        Err(e) => return reply::error(ctx, &format!("ERR {e}")),
    };

    let mut key = WriteKey::open(ctx, args[1]);
    if let Slot::WrongType = key.slot() {
        return reply::wrong_type(ctx);
    }
    let (expire_at, key_ttl) =
        if parsed.keep_ttl { (key.expire_at(), KeyTtl::Keep) } else { (deadlines.expire_at, KeyTtl::Stale(parsed.stale_ms)) };
    // The stored bytes are the value argument itself unless this SET compressed it.
    let unchanged = !(matches!(storage, Storage::Auto { .. }) && entry.encoding() == Encoding::Lz4);
    // The numtags and tag arguments themselves, when the entry kept every tag (no repeats).
    let tag_args = parsed
        .tags_at
        .filter(|_| entry.tags().len() == parsed.tags.len())
        .and_then(|at| args.get(3 + at..3 + at + 1 + parsed.tags.len()));
    // The effect form only when something reads the propagated stream (see propagation.rs).
    let effect = propagation::needs_effects(ctx)
        .then(|| SetArgv::new(ctx, args[1], unchanged.then_some(args[2]), tag_args, &entry, key_ttl));
    // A lease fill is checked last, when nothing else can refuse the write: a fenced fill stores nothing.
    let mut entry = entry;
    let fill = match parsed.lease {
        Some(token) => match leases::begin_fill(ctx, key_of().0, key_of().1, token, parsed.tags) {
            Ok((lease, took)) => {
                entry.set_fill_ms(took);
                Some(lease)
            }
            Err(msg) => return reply::error(ctx, msg),
        },
        None => None,
    };
    // The old entry is replaced in place (no unlink callback): take it out of the tag index here, unless
    // the new one has the same tags and simply takes its place.
    let mut carried = false;
    if let Some(old) = key.entry_mut() {
        // Untagged over untagged (the usual overwrite) needs no call into the index.
        carried = (entry.tags().is_empty() && old.tags().is_empty()) || tagindex::carry_over(old, &mut entry);
        if !carried {
            let (db, name) = key_of();
            tagindex::detach(db, name, old);
        }
    }
    match key.store(entry, expire_at) {
        Ok(e) => {
            if !carried {
                let (db, name) = key_of();
                tagindex::attach(ctx, db, name, e);
            }
            match fill {
                Some(lease) => leases::filled(lease, e),
                None if leases::none_held() => {}
                None => leases::written_by_other(key_of().0, key_of().1, e),
            }
        }
        Err(msg) => {
            if let Some(lease) = fill {
                leases::abort_fill(ctx, key_of().0, key_of().1, lease);
            }
            return reply::error(ctx, msg);
        }
    }
    drop(key);
    match effect {
        Some(effect) => effect.replicate(),
        None => propagation::replicate_verbatim(ctx),
    }
    // SAFETY: live command context and key name; the event name is a C string.
    unsafe {
        hot!(RedisModule_NotifyKeyspaceEvent)(
            ctx,
            redis_module::raw::REDISMODULE_NOTIFY_MODULE,
            c"tiercache.set".as_ptr(),
            args[1],
        );
    }
    stats::SETS.bump();
    reply::ok(ctx)
}

/// The command's context flags (`RedisModule_GetContextFlags`), read on first use only.
struct Flags {
    ctx: Ctx,
    read: std::cell::Cell<Option<c_int>>,
}

impl Flags {
    fn new(ctx: Ctx) -> Flags {
        Flags { ctx, read: std::cell::Cell::new(None) }
    }

    fn get(&self) -> c_int {
        if let Some(f) = self.read.get() {
            return f;
        }
        // SAFETY: ctx is the live command context.
        let f = unsafe { api!(RedisModule_GetContextFlags)(self.ctx) };
        self.read.set(Some(f));
        f
    }

    /// True when the command comes from the master's stream or from AOF loading.
    fn replayed(&self) -> bool {
        let replay =
            (redis_module::raw::REDISMODULE_CTX_FLAGS_REPLICATED | redis_module::raw::REDISMODULE_CTX_FLAGS_LOADING) as i32;
        self.get() & replay != 0
    }
}

/// TIERCACHE.GET key [ENCODED]
///
/// The hot path: one key lookup, no RedisModule_Call, and the reply is written straight from the
/// stored buffer (raw entries) or from a reused decompression buffer (lz4 entries).
pub fn get(ctx: Ctx, args: &[RStr]) -> c_int {
    let encoded = match args.len() {
        2 => false,
        n if n > 2 => {
            let opts = ArgBytes::new(&args[2..]);
            match parse_get(&opts) {
                Ok(GetArgs { encoded, with_ttl, lease: Some(lease) }) => {
                    return get_lease(ctx, args[1], lease, leases::Shape { encoded, with_ttl })
                }
                Ok(g) => g.encoded,
                Err(e) => return reply::error(ctx, &e.to_string()),
            }
        }
        _ => return reply::wrong_arity(ctx),
    };
    let key = ReadKey::open(ctx, args[1]);
    let entry = match key.slot() {
        // Entries without a deadline skip the clock read; untagged ones skip the index.
        Slot::Entry(e) if (e.fresh_until() == NO_DEADLINE || e.is_fresh(now_ms())) && tagindex::is_valid(e) => e,
        Slot::WrongType => return reply::wrong_type(ctx),
        Slot::Empty | Slot::Entry(_) => {
            stats::MISSES.bump();
            return reply::null(ctx);
        }
    };
    stats::HITS.bump();
    if encoded {
        reply::array(ctx, 2);
        reply::bulk(ctx, entry.encoding().name().as_bytes());
        return reply::bulk(ctx, entry.stored());
    }
    match entry.encoding() {
        Encoding::Raw => reply::bulk(ctx, entry.stored()),
        Encoding::Lz4 => SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let rc = match entry.value_into(&mut scratch) {
                Ok(v) => reply::bulk(ctx, v),
                Err(e) => reply::error(ctx, &format!("ERR stored value is unreadable: {e}")),
            };
            if scratch.capacity() > SCRATCH_KEEP {
                *scratch = Vec::new();
            }
            rc
        }),
    }
}

/// TIERCACHE.GET key [ENCODED] [WITHTTL] LEASE ms [WAIT ms] [BETA number]
///   -> [status, value, token(, encoding)(, fresh_ttl_ms)]
///
/// HIT (fresh; with BETA, a token when this caller is elected to refresh early), STALE (inside the stale
/// window; a token for the one caller that refreshes), FILL (no usable value: the caller holds the lease),
/// BUSY (someone else holds it and the caller cannot or did not ask to wait), or parked until the fill,
/// a hand-off (FILL), a pass (PASS) or the WAIT deadline (BUSY).
fn get_lease(ctx: Ctx, name: RStr, l: LeaseArgs, encoded: leases::Shape) -> c_int {
    if tagindex::is_replica(ctx) {
        return reply::error(ctx, "ERR leases are granted by the master: send TIERCACHE.GET ... LEASE to the master");
    }
    let max_lease = config::MAX_LEASE_MS.get();
    if l.lease_ms > max_lease {
        return reply::error(ctx, &format!("ERR LEASE is above tiercache.max-lease-ms ({max_lease})"));
    }
    let max_wait = config::MAX_WAIT_MS.get();
    if l.wait_ms.is_some_and(|w| w > max_wait) {
        return reply::error(ctx, &format!("ERR WAIT is above tiercache.max-wait-ms ({max_wait})"));
    }
    let db = tagindex::selected_db(ctx);
    let key = bytes(name);
    let now = now_ms();
    {
        let k = ReadKey::open(ctx, name);
        match k.slot() {
            Slot::WrongType => return reply::wrong_type(ctx),
            Slot::Entry(e) if tagindex::is_valid(e) && e.is_fresh(now) => {
                stats::HITS.bump();
                let early = l.beta.is_some_and(|beta| e.refresh_early(now, beta, leases::random_unit()));
                let token = match early.then(|| leases::acquire(ctx, db, key, l.lease_ms)) {
                    Some(Acquire::Granted(t)) => {
                        stats::EARLY_REFRESHES.bump();
                        Some(t)
                    }
                    _ => None,
                };
                return leases::reply_lease(ctx, "HIT", Some(e), token, encoded);
            }
            Slot::Entry(e) if tagindex::is_valid(e) => {
                // Past its fresh period but inside the stale window: serve it; one caller refreshes.
                stats::STALE_SERVED.bump();
                let token = match leases::acquire(ctx, db, key, l.lease_ms) {
                    Acquire::Granted(t) => Some(t),
                    Acquire::Busy => None,
                };
                return leases::reply_lease(ctx, "STALE", Some(e), token, encoded);
            }
            Slot::Entry(_) | Slot::Empty => {}
        }
    }
    stats::MISSES.bump();
    match leases::acquire(ctx, db, key, l.lease_ms) {
        Acquire::Granted(t) => leases::reply_lease(ctx, "FILL", None, Some(t), encoded),
        Acquire::Busy => match l.wait_ms {
            Some(wait) if leases::may_block(ctx) => leases::park(ctx, db, key, wait, l.lease_ms, encoded),
            _ => leases::reply_lease(ctx, "BUSY", None, None, encoded),
        },
    }
}

/// TIERCACHE.META key
pub fn meta(ctx: Ctx, args: &[RStr]) -> c_int {
    if args.len() != 2 {
        return reply::wrong_arity(ctx);
    }
    let key = ReadKey::open(ctx, args[1]);
    let e = match key.slot() {
        Slot::Entry(e) if tagindex::is_valid(e) => e,
        // An invalidated entry is gone for readers, whether or not it was reclaimed yet.
        Slot::Entry(_) | Slot::Empty => return reply::null(ctx),
        Slot::WrongType => return reply::wrong_type(ctx),
    };
    let now = now_ms();
    let expire_at = key.expire_at();
    let stale_ttl = if expire_at == NO_DEADLINE { NO_DEADLINE } else { expire_at.saturating_sub(now).max(0) };
    reply::pairs(
        ctx,
        &[
            ("state", Value::Str(if e.is_fresh(now) { "fresh" } else { "stale" })),
            ("fresh_ttl_ms", Value::Int(e.fresh_ttl_ms(now))),
            ("stale_ttl_ms", Value::Int(stale_ttl)),
            ("fresh_until_ms", Value::Int(e.fresh_until())),
            ("expire_at_ms", Value::Int(expire_at)),
            ("tags", Value::BulkList(e.tags().iter().collect())),
            ("encoding", Value::Str(e.encoding().name())),
            ("size", Value::Int(e.size() as i64)),
            ("stored_size", Value::Int(e.stored().len() as i64)),
            ("created_ms", Value::Int(e.created())),
        ],
    )
}
