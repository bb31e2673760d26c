//! Model-based test: random sequences of tiercache commands run against one real server and against an
//! in-memory reference model of the semantics that COMMANDS.md documents, reply by reply.
//!
//! Covered: `TIERCACHE.SET` (EX/PX/EXAT/PXAT or none, KEEPTTL, STALE, tags from a small pool with
//! repeats, binary/NUL, compressible and incompressible values, NOCOMPRESS, ENCODING raw|lz4 with valid
//! and broken frames, CREATED, LEASE fills with held, stale, unknown and malformed tokens), plain and
//! ENCODED `TIERCACHE.GET`, lease reads without WAIT (ENCODED, WITHTTL), `TIERCACHE.META`, native `DEL`
//! and `TIERCACHE.DEL`, `TIERCACHE.INVALIDATE` (including one that overflows a lease's 64 remembered
//! tags), `TIERCACHE.TAGCOUNT`, `TIERCACHE.TAGKEYS [COUNT]` and `TIERCACHE.RELEASE [PASS]`, over a
//! small key pool in two databases (`SELECT`), with native `SET` (WRONGTYPE), `PERSIST` and
//! `PEXPIREAT` (future, or past, which deletes) on the same keys, and `MULTI`/`EXEC` blocks with an
//! INVALIDATE in the middle (the reclaim timer cannot run inside them, so the commands after it see
//! invalidated entries still in their keys). After each sequence every key's META, every tag's keys and the STATS counters
//! (deltas) and gauges are compared with the model as well.
//!
//! Time: no assertion depends on how long anything takes. Deadlines are either far in the future
//! (2096, or 100k+ seconds from now) or long past (1970), so an entry's state never changes during a
//! case; relative deadlines are checked exactly against the server's own "now" for that SET, learned
//! from the first reply that reveals it. Entries written already expired are removed at once with
//! `EXISTS` (lazy expiry), and after each INVALIDATE (or EXEC) the test waits for the reclaim timer
//! to finish (`reclaim_pending` 0), so which keys exist is known at every step.
//!
//! One server per test run; `FLUSHALL` between cases. The same sequences run over RESP2 and RESP3.
//! `PROPTEST_CASES` sets the number of cases per protocol (default 256).
mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use common::{as_int, cmd_text, error_text, is_ok, now_ms, pairs, Conn, Proto, Server, Value, META_FIELDS, STATS_FIELDS};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

const KEYS: [&[u8]; 4] = [b"k0", b"k1", b"bin\0key\xff", b""];
const TAGS: [&[u8]; 4] = [b"a", b"b", b"t\0x", b"\xff"];
/// Tags only INVALIDATE, TAGCOUNT and TAGKEYS name: one no entry carries, and the empty string.
const OTHER_TAGS: [&[u8]; 2] = [b"nobody", b""];
/// Lease reads ask for this long: no lease ends by time during a case.
const LEASE_MS: i64 = 600_000;
/// 2096-10-03, in ms: a deadline that is never reached.
const FAR_MS: i64 = 4_000_000_000_000;
/// 1970: a deadline that has always passed.
const PAST_MS: i64 = 1_000;
/// A stale window that outlives any test run (about 126 years).
const LONG_STALE_S: i64 = 4_000_000_000;
/// tiercache.compress-min-size (default).
const COMPRESS_MIN: usize = 1024;
/// A lease remembers this many invalidated tags, then fences every tagged fill.
const REMEMBERED_TAGS: usize = 64;
const DEFAULT_CASES: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Operations.

/// A value, described so that shrinking stays readable.
#[derive(Clone)]
enum Val {
    Bytes(Vec<u8>),
    /// Compressible text (JSON-like), `n` bytes: compressed from 1024 bytes on.
    Text(usize),
    /// Pseudo-random bytes, incompressible.
    Noise(usize, u64),
}

impl fmt::Debug for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Bytes(b) => write!(f, "Bytes({:?})", String::from_utf8_lossy(b)),
            Val::Text(n) => write!(f, "Text({n})"),
            Val::Noise(n, s) => write!(f, "Noise({n}, {s})"),
        }
    }
}

impl Val {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Val::Bytes(b) => b.clone(),
            Val::Text(n) => common::compressible(*n),
            Val::Noise(n, seed) => common::incompressible(*n, *seed),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Fresh {
    Forever,
    Ex(i64),
    Px(i64),
    Exat(i64),
    Pxat(i64),
}

#[derive(Clone, Copy, Debug)]
enum Frame {
    Valid,
    /// Shorter than the 4-byte header.
    Short,
    /// Announces more than 512 MiB.
    TooLarge,
    /// Announces more than 255 times its payload.
    Implausible,
    /// The valid frame less its last byte.
    Truncated,
}

#[derive(Clone, Copy, Debug)]
enum Enc {
    Auto,
    NoCompress,
    Raw,
    Lz4(Frame),
}

/// A lease token argument.
#[derive(Clone, Copy, Debug)]
enum Tok {
    /// The token of the lease the model holds on the command's key; else as `Seen(0)`.
    Current,
    /// The i-th token the server gave out in this case (modulo their number); "12345" before any.
    Seen(usize),
    /// Well-formed, held by nobody.
    Unknown,
    /// Malformed.
    Invalid,
}

#[derive(Clone, Debug)]
struct SetOp {
    key: usize,
    val: Val,
    fresh: Fresh,
    keepttl: bool,
    stale: Option<i64>,
    tags: Option<Vec<usize>>,
    enc: Enc,
    created: Option<i64>,
    lease: Option<Tok>,
}

#[derive(Clone, Debug)]
enum Op {
    Set(SetOp),
    Get {
        key: usize,
        encoded: bool,
    },
    LeaseGet {
        key: usize,
        encoded: bool,
        withttl: bool,
    },
    Meta {
        key: usize,
    },
    Del {
        keys: Vec<usize>,
        native: bool,
    },
    /// Indexes into TAGS then OTHER_TAGS (the empty tag is not sent to INVALIDATE).
    Invalidate {
        tags: Vec<usize>,
    },
    /// 65 tag arguments: distinct tags nobody carries (`hot: None`), after which every lease of the
    /// database fences all tagged fills; or one pool tag 65 times, which a lease remembers once.
    InvalidateMany {
        hot: Option<usize>,
    },
    TagCount {
        tag: usize,
    },
    TagKeys {
        tag: usize,
        count: Option<i64>,
    },
    Release {
        key: usize,
        tok: Tok,
        pass: bool,
    },
    /// SELECT 0 or 1: keys, tags and leases belong to a database.
    Select {
        db: u8,
    },
    /// Native SET: the key holds a string (WRONGTYPE for the module's commands on it).
    NativeSet {
        key: usize,
    },
    Persist {
        key: usize,
    },
    /// PEXPIREAT to 2096, or to 1970 (which deletes the key).
    PexpireAt {
        key: usize,
        past: bool,
    },
    Exists {
        key: usize,
    },
    /// MULTI ... EXEC: the reclaim timer cannot run in between, so invalidated entries are still in
    /// their keys for the commands after the INVALIDATE (the window a client can otherwise only hit
    /// by chance).
    Multi(Vec<TxOp>),
}

/// A command inside MULTI. No lease reads or fills (a token is only known after EXEC), and no SET that
/// expires at once.
#[derive(Clone, Debug)]
enum TxOp {
    Set(SetOp),
    Get { key: usize, encoded: bool },
    Meta { key: usize },
    Exists { key: usize },
    Del { keys: Vec<usize>, native: bool },
    Invalidate { tags: Vec<usize> },
    TagCount { tag: usize },
    TagKeys { tag: usize },
}

fn tx_op_strategy() -> impl Strategy<Value = TxOp> {
    let key = 0..KEYS.len();
    prop_oneof![
        5 => set_strategy().prop_map(|mut s| {
            s.lease = None;
            if matches!(s.fresh, Fresh::Pxat(PAST_MS) | Fresh::Exat(1)) && !s.keepttl {
                s.stale = Some(LONG_STALE_S);
            }
            // Tagged, so that the INVALIDATE in the middle of the transaction finds something.
            if s.tags.as_ref().is_none_or(|t| t.is_empty()) {
                s.tags = Some(vec![s.key % TAGS.len()]);
            }
            TxOp::Set(s)
        }),
        3 => (key.clone(), any::<bool>()).prop_map(|(key, encoded)| TxOp::Get { key, encoded }),
        3 => key.clone().prop_map(|key| TxOp::Meta { key }),
        2 => key.clone().prop_map(|key| TxOp::Exists { key }),
        2 => (prop::collection::vec(key, 1..3), any::<bool>()).prop_map(|(keys, native)| TxOp::Del { keys, native }),
        4 => prop::collection::vec(0..TAGS.len(), 1..3).prop_map(|tags| TxOp::Invalidate { tags }),
        3 => (0..TAGS.len()).prop_map(|tag| TxOp::TagCount { tag }),
        2 => (0..TAGS.len()).prop_map(|tag| TxOp::TagKeys { tag }),
    ]
}

fn tag_name(i: usize) -> &'static [u8] {
    if i < TAGS.len() {
        TAGS[i]
    } else {
        OTHER_TAGS[i - TAGS.len()]
    }
}

fn val_strategy() -> impl Strategy<Value = Val> {
    prop_oneof![
        4 => prop::collection::vec(prop_oneof![Just(0u8), Just(b'v'), Just(0xff), any::<u8>()], 0..12).prop_map(Val::Bytes),
        2 => (900usize..3000).prop_map(Val::Text),
        1 => (1000usize..1400, any::<u64>()).prop_map(|(n, s)| Val::Noise(n, s)),
    ]
}

fn fresh_strategy() -> impl Strategy<Value = Fresh> {
    prop_oneof![
        2 => Just(Fresh::Forever),
        2 => (100_000i64..200_000).prop_map(Fresh::Ex),
        2 => (100_000_000i64..200_000_000).prop_map(Fresh::Px),
        1 => prop_oneof![Just(FAR_MS / 1000), Just(1)].prop_map(Fresh::Exat),
        3 => prop_oneof![Just(FAR_MS), Just(PAST_MS)].prop_map(Fresh::Pxat),
    ]
}

fn tok_strategy() -> impl Strategy<Value = Tok> {
    prop_oneof![
        6 => Just(Tok::Current),
        3 => (0usize..8).prop_map(Tok::Seen),
        1 => Just(Tok::Unknown),
        1 => Just(Tok::Invalid),
    ]
}

fn set_strategy() -> impl Strategy<Value = SetOp> {
    let enc = prop_oneof![
        6 => Just(Enc::Auto),
        1 => Just(Enc::NoCompress),
        1 => Just(Enc::Raw),
        2 => Just(Enc::Lz4(Frame::Valid)),
        1 => prop_oneof![Just(Frame::Short), Just(Frame::TooLarge), Just(Frame::Implausible), Just(Frame::Truncated)]
            .prop_map(Enc::Lz4),
    ];
    (
        0..KEYS.len(),
        val_strategy(),
        prop_oneof![
            4 => (
                fresh_strategy(),
                prop_oneof![6 => Just(None), 1 => Just(Some(0)), 1 => Just(Some(5)), 3 => Just(Some(LONG_STALE_S))],
            ),
            // Stale from the start, for a century: the stale paths without waiting.
            1 => Just((Fresh::Pxat(PAST_MS), Some(LONG_STALE_S))),
        ],
        prop::bool::weighted(0.15),
        prop::option::weighted(0.6, prop::collection::vec(0..TAGS.len(), 0..4)),
        enc,
        prop::option::weighted(0.2, 0i64..2_000_000_000_000),
        prop::option::weighted(0.35, tok_strategy()),
    )
        .prop_map(|(key, val, (fresh, stale), keepttl, tags, enc, created, lease)| SetOp {
            key,
            val,
            fresh,
            keepttl,
            stale,
            tags,
            enc,
            created,
            lease,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let key = 0..KEYS.len();
    prop_oneof![
        30 => set_strategy().prop_map(Op::Set),
        10 => (key.clone(), any::<bool>()).prop_map(|(key, encoded)| Op::Get { key, encoded }),
        12 => (key.clone(), any::<bool>(), any::<bool>()).prop_map(|(key, encoded, withttl)| Op::LeaseGet { key, encoded, withttl }),
        8 => key.clone().prop_map(|key| Op::Meta { key }),
        8 => (prop::collection::vec(key.clone(), 1..3), any::<bool>()).prop_map(|(keys, native)| Op::Del { keys, native }),
        8 => prop::collection::vec(0..TAGS.len() + 1, 1..3).prop_map(|tags| Op::Invalidate { tags }),
        2 => prop::option::of(0..TAGS.len()).prop_map(|hot| Op::InvalidateMany { hot }),
        5 => (0..TAGS.len() + OTHER_TAGS.len()).prop_map(|tag| Op::TagCount { tag }),
        5 => (0..TAGS.len() + OTHER_TAGS.len(), prop::option::weighted(0.4, prop_oneof![Just(0i64), Just(1), Just(2), Just(100)]))
            .prop_map(|(tag, count)| Op::TagKeys { tag, count }),
        8 => (key.clone(), tok_strategy(), any::<bool>()).prop_map(|(key, tok, pass)| Op::Release { key, tok, pass }),
        3 => (0u8..2).prop_map(|db| Op::Select { db }),
        2 => key.clone().prop_map(|key| Op::NativeSet { key }),
        2 => key.clone().prop_map(|key| Op::Persist { key }),
        3 => (key.clone(), prop::bool::weighted(0.4)).prop_map(|(key, past)| Op::PexpireAt { key, past }),
        2 => key.prop_map(|key| Op::Exists { key }),
        4 => (
            prop::collection::vec(tx_op_strategy(), 0..4),
            prop::collection::vec(0..TAGS.len(), 1..3),
            prop::collection::vec(tx_op_strategy(), 1..6),
        )
            .prop_map(|(mut before, tags, after)| {
                before.push(TxOp::Invalidate { tags });
                before.extend(after);
                Op::Multi(before)
            }),
    ]
}

/// At most 30 operations (a lease remembers each invalidated tag once: at most 64 distinct ones).
fn sequence_strategy() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op_strategy(), 1..30)
}

// ---------------------------------------------------------------------------------------------
// The reference model.

/// A point in time as the model knows it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum T {
    Never,
    Abs(i64),
    /// `off` ms after the server's "now" of the n-th SET of the case (learned from a reply).
    Rel(u32, i64),
}

impl T {
    fn plus(self, ms: i64) -> T {
        match self {
            T::Never => T::Never,
            T::Abs(v) => T::Abs(v + ms),
            T::Rel(id, off) => T::Rel(id, off + ms),
        }
    }

    /// True when this time has passed. Absolute times are 1970 or 2096, relative ones >= 100 s ahead.
    fn passed(self) -> bool {
        match self {
            T::Never => false,
            T::Abs(v) => v <= now_ms(),
            T::Rel(_, off) => off <= 0,
        }
    }
}

#[derive(Clone, Debug)]
struct MEntry {
    value: Vec<u8>,
    stored: Vec<u8>,
    lz4: bool,
    fresh_until: T,
    expire_at: T,
    created: T,
    tags: Vec<Vec<u8>>,
    /// The tags whose slots still list this entry: an invalidation drops a tag's slot, and the entry's
    /// other tags keep counting it until the reclaim timer deletes the key.
    indexed: Vec<Vec<u8>>,
    /// Invalidated, not reclaimed yet: the key exists, readers see nothing.
    dead: bool,
}

impl MEntry {
    fn fresh(&self) -> bool {
        !self.fresh_until.passed()
    }
    fn encoding(&self) -> &'static str {
        if self.lz4 {
            "lz4"
        } else {
            "raw"
        }
    }
}

#[derive(Clone, Debug)]
struct MLease {
    token: Vec<u8>,
    key_changed: bool,
    invalidated: Vec<Vec<u8>>,
    all_tags: bool,
}

#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    hits: i64,
    misses: i64,
    sets: i64,
    fenced: i64,
    stale_served: i64,
    leases_granted: i64,
    passes: i64,
    invalidations: i64,
}

#[derive(Default)]
struct Model {
    /// The selected database.
    db: u8,
    /// Entries, strings and leases by qualified key: the database number, then the key (see `qk`).
    entries: BTreeMap<Vec<u8>, MEntry>,
    /// Native strings, with whether they have a TTL.
    strings: BTreeMap<Vec<u8>, bool>,
    leases: BTreeMap<Vec<u8>, MLease>,
    /// Every token the server gave out in this case, in order.
    tokens: Vec<Vec<u8>>,
    /// The server's "now" of each SET, once a reply revealed it.
    nows: HashMap<u32, i64>,
    next_set: u32,
    counters: Counters,
    case_start_ms: i64,
}

const NOT_HELD: &str = "FENCED the lease is not held by this token (expired, released or re-granted)";
const KEY_CHANGED: &str = "FENCED the key was written or deleted after the lease was granted";
const WRONGTYPE: &str = common::WRONGTYPE;
const TAG_INVALIDATED: &str = "FENCED a tag of this entry was invalidated after the lease was granted";

/// The documented frame check (COMMANDS.md, "What SET ENCODING lz4 checks"): header, then decode.
fn frame_check(frame: &[u8]) -> Result<usize, &'static str> {
    if frame.len() < 4 {
        return Err("ERR invalid lz4 frame header");
    }
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > 512 * 1024 * 1024 {
        return Err("ERR lz4 frame announces more than 512 MiB");
    }
    let payload = frame.len() - 4;
    let plausible = if len == 0 { payload == 1 } else { payload > 0 && payload * 255 >= len };
    if !plausible {
        return Err("ERR invalid lz4 frame header");
    }
    let mut out = vec![0u8; len];
    match lz4_flex::block::decompress_into(&frame[4..], &mut out) {
        Ok(n) if n == len => Ok(len),
        _ => Err("ERR corrupt lz4 frame"),
    }
}

fn make_frame(kind: Frame, value: &[u8]) -> Vec<u8> {
    let valid = common::lz4_frame(value);
    match kind {
        Frame::Valid => valid,
        Frame::Short => valid[..3].to_vec(),
        Frame::TooLarge => {
            let mut f = valid;
            f[..4].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        }
        Frame::Implausible => {
            let mut f = valid;
            let claim = ((f.len() - 4) * 255 + 1) as u32;
            f[..4].copy_from_slice(&claim.to_le_bytes());
            f
        }
        Frame::Truncated => valid[..valid.len() - 1].to_vec(),
    }
}

/// What the model expects a command to answer.
#[derive(Debug, PartialEq)]
enum Want {
    Ok,
    Err(String),
    Int(i64),
    Nil,
    Bulk(Vec<u8>),
}

impl Model {
    /// The live (not invalidated) entry at a qualified key: what GET, META and lease reads see.
    fn live(&self, qk: &[u8]) -> Option<&MEntry> {
        self.entries.get(qk).filter(|e| !e.dead)
    }

    /// The reclaim timer ran: invalidated keys are deleted (which fences nothing).
    fn reclaim(&mut self) {
        self.entries.retain(|_, e| !e.dead);
    }

    fn new() -> Model {
        Model { case_start_ms: now_ms(), ..Model::default() }
    }

    /// The model's name for `key` in the selected database.
    fn qk(&self, key: &[u8]) -> Vec<u8> {
        let mut k = vec![self.db];
        k.extend_from_slice(key);
        k
    }

    fn exists(&self, qk: &[u8]) -> bool {
        self.entries.contains_key(qk) || self.strings.contains_key(qk)
    }

    /// Deletes a key of any type; true if it existed. A delete by a client fences its lease.
    fn delete(&mut self, qk: &[u8]) -> bool {
        let existed = self.entries.remove(qk).is_some() | self.strings.remove(qk).is_some();
        if existed {
            self.fence_key(qk);
        }
        existed
    }

    /// `key` is qualified (`qk`).
    fn token(&self, t: Tok, key: &[u8]) -> Vec<u8> {
        match t {
            Tok::Current => match self.leases.get(key) {
                Some(l) => l.token.clone(),
                None => self.token(Tok::Seen(0), key),
            },
            Tok::Seen(_) if self.tokens.is_empty() => b"12345".to_vec(),
            Tok::Seen(i) => self.tokens[i % self.tokens.len()].clone(),
            Tok::Unknown => b"12345".to_vec(),
            Tok::Invalid => b"0".to_vec(),
        }
    }

    /// `DEL` (native) or `TIERCACHE.DEL` of the pool keys `keys`: the command, and how many keys it
    /// deletes. A native DEL of a missing key is a no-op; TIERCACHE.DEL fences the lease anyway.
    fn del(&mut self, keys: &[usize], native: bool) -> (redis::Cmd, i64) {
        let mut cmd = redis::cmd(if native { "DEL" } else { "TIERCACHE.DEL" });
        let mut deleted = 0;
        for &i in keys {
            let k = key_arg(i);
            cmd.arg(k);
            let qk = self.qk(k);
            deleted += i64::from(self.delete(&qk));
            if !native {
                self.fence_key(&qk);
            }
        }
        (cmd, deleted)
    }

    /// A write or delete by a client (not the holder's own fill) fences the key's lease.
    fn fence_key(&mut self, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(key) {
            l.key_changed = true;
        }
    }

    /// TIERCACHE.SET: the expected reply, and whether the key was written already expired.
    fn set(&mut self, op: &SetOp, value_arg: &[u8]) -> (Want, bool) {
        let key = self.qk(KEYS[op.key]);
        // Options, left to right: only LEASE's token can fail here with what the generator makes.
        let token = op.lease.map(|t| self.token(t, &key));
        if matches!(op.lease, Some(Tok::Invalid)) {
            return (Want::Err("ERR invalid lease token".into()), false);
        }
        if op.keepttl && op.stale.is_some() {
            return (Want::Err("ERR syntax error".into()), false);
        }
        if op.stale.is_some_and(|s| s > 0) && matches!(op.fresh, Fresh::Forever) {
            return (Want::Err("ERR STALE needs a fresh period: add EX, PX, EXAT or PXAT".into()), false);
        }
        let value = op.val.bytes();
        let (stored, lz4) = match op.enc {
            Enc::Auto => {
                let frame = common::lz4_frame(&value);
                if value.len() >= COMPRESS_MIN && frame.len() * 10 <= value.len() * 9 {
                    (frame, true)
                } else {
                    (value.clone(), false)
                }
            }
            Enc::NoCompress | Enc::Raw => (value.clone(), false),
            Enc::Lz4(_) => match frame_check(value_arg) {
                Ok(_) => (value_arg.to_vec(), true),
                Err(e) => return (Want::Err(e.into()), false),
            },
        };
        let tags_given: Vec<Vec<u8>> = op.tags.iter().flatten().map(|&i| TAGS[i].to_vec()).collect();
        if self.strings.contains_key(&key) {
            return (Want::Err(WRONGTYPE.into()), false);
        }
        if let Some(token) = token {
            let Some(l) = self.leases.get(&key).filter(|l| l.token == token) else {
                self.counters.fenced += 1;
                return (Want::Err(NOT_HELD.into()), false);
            };
            let fence = if l.key_changed {
                Some(KEY_CHANGED)
            } else if !tags_given.is_empty() && (l.all_tags || tags_given.iter().any(|t| l.invalidated.contains(t))) {
                Some(TAG_INVALIDATED)
            } else {
                None
            };
            // The lease ends either way: stored, or refused and handed off (nobody waits here).
            self.leases.remove(&key);
            if let Some(f) = fence {
                self.counters.fenced += 1;
                return (Want::Err(f.into()), false);
            }
        } else {
            self.fence_key(&key);
        }
        let id = self.next_set;
        self.next_set += 1;
        let now = T::Rel(id, 0);
        let fresh_until = match op.fresh {
            Fresh::Forever => T::Never,
            Fresh::Ex(s) => now.plus(s * 1000),
            Fresh::Px(ms) => now.plus(ms),
            Fresh::Exat(s) => T::Abs(s * 1000),
            Fresh::Pxat(ms) => T::Abs(ms),
        };
        let expire_at = if op.keepttl {
            self.entries.get(&key).map_or(T::Never, |e| e.expire_at)
        } else {
            fresh_until.plus(op.stale.unwrap_or(0) * 1000)
        };
        let mut tags: Vec<Vec<u8>> = Vec::new();
        for t in tags_given {
            if !tags.contains(&t) {
                tags.push(t);
            }
        }
        let value = if lz4 && matches!(op.enc, Enc::Lz4(_)) { common::lz4_unframe(&stored) } else { value };
        let entry = MEntry {
            value,
            stored,
            lz4,
            fresh_until,
            expire_at,
            created: op.created.map_or(now, T::Abs),
            indexed: tags.clone(),
            tags,
            dead: false,
        };
        self.counters.sets += 1;
        let expired = entry.expire_at.passed();
        if expired {
            self.entries.remove(&key);
        } else {
            self.entries.insert(key, entry);
        }
        (Want::Ok, expired)
    }

    /// INVALIDATE in the selected database: the sum over the distinct tags named of the entries listed
    /// under each (dead ones included; an entry under two of them counts twice), drops the tags' slots,
    /// and marks those entries dead (see `reclaim`).
    fn invalidate(&mut self, tags: &[Vec<u8>]) -> i64 {
        let db = self.db;
        let mut hit = 0;
        for (k, e) in self.entries.iter_mut() {
            let under = e.indexed.iter().filter(|t| tags.contains(t)).count() as i64;
            if k[0] != db || under == 0 {
                continue;
            }
            hit += under;
            e.dead = true;
            e.indexed.retain(|t| !tags.contains(t));
        }
        for (k, l) in self.leases.iter_mut() {
            if k[0] != self.db || l.all_tags {
                continue;
            }
            // "A lease remembers up to 64 invalidated tags": tags, so a tag named again is not new.
            for t in tags {
                if !l.invalidated.contains(t) {
                    l.invalidated.push(t.clone());
                }
            }
            if l.invalidated.len() > REMEMBERED_TAGS {
                l.invalidated.clear();
                l.all_tags = true;
            }
        }
        self.counters.invalidations += 1;
        hit
    }

    /// The keys of the selected database whose entries carry `tag`, by their names.
    fn tag_keys(&self, tag: &[u8]) -> BTreeSet<Vec<u8>> {
        self.entries
            .iter()
            .filter(|(k, e)| k[0] == self.db && e.indexed.iter().any(|t| t == tag))
            .map(|(k, _)| k[1..].to_vec())
            .collect()
    }

    /// Checks a time the server reported against the model's, learning a SET's "now" on first sight.
    fn check_time(&mut self, want: T, got: i64, what: &str) -> Result<(), String> {
        match want {
            T::Never if got == -1 => Ok(()),
            T::Abs(v) if got == v => Ok(()),
            T::Rel(id, off) => {
                match self.nows.get(&id) {
                    Some(&now) if got == now + off => Ok(()),
                    Some(&now) => Err(format!("{what}: expected {now} + {off} = {} (SET #{id}'s now), got {got}", now + off)),
                    None => {
                        let now = got - off;
                        // The server's clock, read during this case: a loose sanity bound, not a timing check.
                        let (lo, hi) = (self.case_start_ms - 60_000, now_ms() + 60_000);
                        if now < lo || now > hi {
                            return Err(format!("{what}: {got} implies SET #{id} ran at {now}, outside [{lo}, {hi}]"));
                        }
                        self.nows.insert(id, now);
                        Ok(())
                    }
                }
            }
            _ => Err(format!("{what}: expected {want:?}, got {got}")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a sequence.

thread_local! {
    /// How often each outcome was seen (printed at the end, to show what the cases reached).
    static TALLY: std::cell::RefCell<BTreeMap<String, u64>> = const { std::cell::RefCell::new(BTreeMap::new()) };
}

fn tally(what: impl Into<String>) {
    TALLY.with(|t| *t.borrow_mut().entry(what.into()).or_default() += 1);
}

fn key_arg(i: usize) -> &'static [u8] {
    KEYS[i]
}

fn bulk_or_nil(v: &Value) -> Option<Option<Vec<u8>>> {
    match v {
        Value::Nil => Some(None),
        Value::BulkString(b) => Some(Some(b.clone())),
        _ => None,
    }
}

fn show(b: &[u8]) -> String {
    if b.len() > 48 {
        format!("{:?}...({} bytes)", String::from_utf8_lossy(&b[..32]), b.len())
    } else {
        format!("{:?}", String::from_utf8_lossy(b))
    }
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Compares a simple reply with what the model wants.
fn expect(got: &Value, want: &Want) -> Result<(), String> {
    let ok = match (want, got) {
        (Want::Ok, v) => is_ok(v),
        (Want::Err(e), Value::ServerError(se)) => error_text(se) == *e,
        (Want::Int(n), Value::Int(m)) => n == m,
        (Want::Nil, Value::Nil) => true,
        (Want::Bulk(b), Value::BulkString(g)) => b == g,
        _ => false,
    };
    ensure!(ok, "expected {want:?}, got {got:?}");
    Ok(())
}

/// What META of a key should show: WRONGTYPE, nothing, or the entry.
#[derive(Clone, Debug)]
enum MetaWant {
    WrongType,
    Entry(Option<MEntry>),
}

fn meta_want(model: &Model, key: &[u8]) -> MetaWant {
    let qk = model.qk(key);
    tally(match model.live(&qk) {
        Some(e) if e.fresh() => "META fresh",
        Some(_) => "META stale",
        None if model.strings.contains_key(&qk) => "META wrongtype",
        None if model.entries.contains_key(&qk) => "META invalidated (key still there)",
        None => "META nil",
    });
    if model.strings.contains_key(&qk) {
        MetaWant::WrongType
    } else {
        MetaWant::Entry(model.live(&qk).cloned())
    }
}

fn check_meta(model: &mut Model, key: &[u8], got: &Value, proto: Proto) -> Result<(), String> {
    let want = meta_want(model, key);
    check_meta_with(model, key, want, got, proto)
}

fn check_meta_with(model: &mut Model, key: &[u8], want: MetaWant, got: &Value, proto: Proto) -> Result<(), String> {
    let MetaWant::Entry(want) = want else {
        return expect(got, &Want::Err(WRONGTYPE.into()));
    };
    let Some(e) = want else {
        ensure!(*got == Value::Nil, "META {}: the model has no entry, the server answered {got:?}", show(key));
        return Ok(());
    };
    ensure!(*got != Value::Nil, "META {}: the model has {e:?}, the server answered nil", show(key));
    let p = pairs(got, &META_FIELDS, proto, "TIERCACHE.META");
    let int = |i: usize| as_int(&p[i].1).ok_or_else(|| format!("META {} not an integer: {:?}", p[i].0, p[i].1));
    let text = |i: usize| match &p[i].1 {
        Value::BulkString(b) => Ok(b.clone()),
        Value::SimpleString(s) => Ok(s.clone().into_bytes()),
        other => Err(format!("META {} not a string: {other:?}", p[i].0)),
    };
    let fresh = e.fresh();
    ensure!(text(0)? == if fresh { &b"fresh"[..] } else { b"stale" }, "META state: fresh={fresh}, got {:?}", p[0].1);
    let fresh_ttl = int(1)?;
    match (e.fresh_until, fresh) {
        (T::Never, _) => ensure!(fresh_ttl == -1, "META fresh_ttl_ms {fresh_ttl}, want -1"),
        (_, false) => ensure!(fresh_ttl == 0, "META fresh_ttl_ms {fresh_ttl}, want 0 (stale)"),
        _ => ensure!(fresh_ttl > 0, "META fresh_ttl_ms {fresh_ttl}, want > 0"),
    }
    let stale_ttl = int(2)?;
    match e.expire_at {
        T::Never => ensure!(stale_ttl == -1, "META stale_ttl_ms {stale_ttl}, want -1"),
        _ => ensure!(stale_ttl > 0, "META stale_ttl_ms {stale_ttl}, want > 0"),
    }
    model.check_time(e.fresh_until, int(3)?, "META fresh_until_ms")?;
    model.check_time(e.expire_at, int(4)?, "META expire_at_ms")?;
    let tags: Vec<Vec<u8>> = match &p[5].1 {
        Value::Array(items) => items
            .iter()
            .map(|t| match t {
                Value::BulkString(b) => Ok(b.clone()),
                other => Err(format!("META tag not a bulk string: {other:?}")),
            })
            .collect::<Result<_, _>>()?,
        other => return Err(format!("META tags not an array: {other:?}")),
    };
    ensure!(tags == e.tags, "META tags: want {:?}, got {:?}", e.tags, tags);
    ensure!(text(6)? == e.encoding().as_bytes(), "META encoding: want {}, got {:?}", e.encoding(), p[6].1);
    ensure!(int(7)? == e.value.len() as i64, "META size: want {}, got {:?}", e.value.len(), p[7].1);
    ensure!(int(8)? == e.stored.len() as i64, "META stored_size: want {}, got {:?}", e.stored.len(), p[8].1);
    model.check_time(e.created, int(9)?, "META created_ms")?;
    Ok(())
}

/// One lease read: the reply's shape, status, value, token, encoding and fresh time left.
fn lease_get(model: &mut Model, key: &[u8], encoded: bool, withttl: bool, got: &Value) -> Result<(), String> {
    let key = &model.qk(key)[..];
    if model.strings.contains_key(key) {
        tally("lease read WRONGTYPE");
        return expect(got, &Want::Err(WRONGTYPE.into()));
    }
    let Value::Array(items) = got else {
        return Err(format!("lease read: not an array: {got:?}"));
    };
    let len = 3 + usize::from(encoded) + usize::from(withttl);
    ensure!(items.len() == len, "lease read: {} elements, want {len}: {got:?}", items.len());
    let elems: Vec<Option<Vec<u8>>> = items[..3 + usize::from(encoded)]
        .iter()
        .map(|v| bulk_or_nil(v).ok_or_else(|| format!("lease read: element not a bulk string or null: {got:?}")))
        .collect::<Result<_, _>>()?;
    let entry = model.live(key).cloned();
    let held = model.leases.contains_key(key);
    let (status, value, grant): (&[u8], Option<&MEntry>, bool) = match &entry {
        Some(e) if e.fresh() => (b"HIT", Some(e), false),
        Some(e) => (b"STALE", Some(e), !held),
        None if held => (b"BUSY", None, false),
        None => (b"FILL", None, true),
    };
    tally(format!("lease read {}{}", String::from_utf8_lossy(status), if grant { " + token" } else { "" }));
    match status {
        b"HIT" => model.counters.hits += 1,
        b"STALE" => model.counters.stale_served += 1,
        _ => model.counters.misses += 1,
    }
    ensure!(
        elems[0].as_deref() == Some(status),
        "lease read: status {}, want {}",
        show(elems[0].as_deref().unwrap_or(b"nil")),
        show(status)
    );
    let want_value = value.map(|e| if encoded { e.stored.clone() } else { e.value.clone() });
    ensure!(
        elems[1] == want_value,
        "lease read {}: value {:?}, want {:?}",
        show(status),
        elems[1].as_deref().map(show),
        want_value.as_deref().map(show)
    );
    match (&elems[2], grant) {
        (Some(t), true) => {
            ensure!(
                !t.is_empty() && t.iter().all(u8::is_ascii_digit) && t.len() <= 20 && t != b"0",
                "lease read: token {} is not a positive decimal",
                show(t)
            );
            ensure!(!model.tokens.contains(t), "lease read: token {} was given out before", show(t));
            model.tokens.push(t.clone());
            model
                .leases
                .insert(key.to_vec(), MLease { token: t.clone(), key_changed: false, invalidated: Vec::new(), all_tags: false });
            model.counters.leases_granted += 1;
        }
        (None, false) => {}
        (t, _) => {
            return Err(format!(
                "lease read {}: token {:?}, want {}",
                show(status),
                t.as_deref().map(show),
                if grant { "a token" } else { "nil" }
            ))
        }
    }
    if encoded {
        let want = value.map(|e| e.encoding().as_bytes().to_vec());
        ensure!(elems[3] == want, "lease read: encoding {:?}, want {:?}", elems[3], want);
    }
    if withttl {
        let ttl = &items[len - 1];
        match value {
            None => ensure!(*ttl == Value::Nil, "lease read WITHTTL: {ttl:?}, want nil"),
            Some(e) => {
                let Value::Int(n) = ttl else {
                    return Err(format!("lease read WITHTTL: not an integer: {ttl:?}"));
                };
                let ok = match (e.fresh_until, e.fresh()) {
                    (T::Never, _) => *n == -1,
                    (_, false) => *n == 0,
                    _ => *n > 0,
                };
                ensure!(ok, "lease read WITHTTL: {n} for fresh_until {:?}", e.fresh_until);
            }
        }
    }
    Ok(())
}

/// The TIERCACHE.SET command of `s`, and the value argument it sends.
fn set_cmd(model: &Model, s: &SetOp) -> (redis::Cmd, Vec<u8>) {
    let value = s.val.bytes();
    let value_arg = match s.enc {
        Enc::Lz4(kind) => make_frame(kind, &value),
        _ => value.clone(),
    };
    let mut cmd = redis::cmd("TIERCACHE.SET");
    cmd.arg(key_arg(s.key)).arg(&value_arg[..]);
    match s.fresh {
        Fresh::Forever => {}
        Fresh::Ex(v) => {
            cmd.arg("EX").arg(v);
        }
        Fresh::Px(v) => {
            cmd.arg("PX").arg(v);
        }
        Fresh::Exat(v) => {
            cmd.arg("EXAT").arg(v);
        }
        Fresh::Pxat(v) => {
            cmd.arg("PXAT").arg(v);
        }
    }
    if s.keepttl {
        cmd.arg("KEEPTTL");
    }
    if let Some(st) = s.stale {
        cmd.arg("STALE").arg(st);
    }
    if let Some(tags) = &s.tags {
        cmd.arg("TAGS").arg(tags.len());
        for &t in tags {
            cmd.arg(TAGS[t]);
        }
    }
    match s.enc {
        Enc::Auto => {}
        Enc::NoCompress => {
            cmd.arg("NOCOMPRESS");
        }
        Enc::Raw => {
            cmd.arg("ENCODING").arg("raw");
        }
        Enc::Lz4(_) => {
            cmd.arg("ENCODING").arg("lz4");
        }
    }
    if let Some(cr) = s.created {
        cmd.arg("CREATED").arg(cr);
    }
    if let Some(t) = s.lease {
        cmd.arg("LEASE").arg(model.token(t, &model.qk(key_arg(s.key))));
    }
    (cmd, value_arg)
}

fn run_op(c: &mut Conn, model: &mut Model, op: &Op) -> Result<(), String> {
    match op {
        Op::Set(s) => {
            let (cmd, value_arg) = set_cmd(model, s);
            let (want, expired) = model.set(s, &value_arg);
            tally(match &want {
                Want::Err(e) => format!("SET error: {e}"),
                _ if expired => "SET ok, expired at once".to_string(),
                _ => format!(
                    "SET ok{}{}",
                    if s.lease.is_some() { " (lease fill)" } else { "" },
                    if s.keepttl { " KEEPTTL" } else { "" }
                ),
            });
            let got = c.raw(&cmd);
            expect(&got, &want).map_err(|e| format!("{}: {e}", cmd_text(&cmd)))?;
            if expired {
                // Written already expired: lazy expiry removes it now, so the tag index is exact.
                let n = c.raw(&cmd!("EXISTS", key_arg(s.key)));
                ensure!(n == Value::Int(0), "EXISTS after a SET that expired at once: {n:?}");
            }
            Ok(())
        }
        Op::Get { key, encoded } => {
            let k = key_arg(*key);
            let cmd = if *encoded { cmd!("TIERCACHE.GET", k, "ENCODED") } else { cmd!("TIERCACHE.GET", k) };
            let got = c.raw(&cmd);
            let qk = model.qk(k);
            if model.strings.contains_key(&qk) {
                tally("GET wrongtype");
                return expect(&got, &Want::Err(WRONGTYPE.into())).map_err(|e| format!("{}: {e}", cmd_text(&cmd)));
            }
            let live = model.live(&qk).filter(|e| e.fresh()).cloned();
            tally(match model.live(&qk) {
                Some(e) if e.fresh() => format!("GET hit {}", e.encoding()),
                Some(_) => "GET stale (nil)".to_string(),
                None => "GET missing (nil)".to_string(),
            });
            if live.is_some() {
                model.counters.hits += 1;
            } else {
                model.counters.misses += 1;
            }
            match (live, encoded) {
                (None, _) => expect(&got, &Want::Nil),
                (Some(e), false) => expect(&got, &Want::Bulk(e.value.clone())),
                (Some(e), true) => {
                    let want = Value::Array(vec![
                        Value::BulkString(e.encoding().as_bytes().to_vec()),
                        Value::BulkString(e.stored.clone()),
                    ]);
                    ensure!(got == want, "expected [{}, {}], got {got:?}", e.encoding(), show(&e.stored));
                    Ok(())
                }
            }
            .map_err(|e| format!("{}: {e}", cmd_text(&cmd)))
        }
        Op::LeaseGet { key, encoded, withttl } => {
            let k = key_arg(*key);
            let mut cmd = cmd!("TIERCACHE.GET", k);
            if *encoded {
                cmd.arg("ENCODED");
            }
            if *withttl {
                cmd.arg("WITHTTL");
            }
            cmd.arg("LEASE").arg(LEASE_MS);
            let got = c.raw(&cmd);
            lease_get(model, k, *encoded, *withttl, &got).map_err(|e| format!("{}: {e}", cmd_text(&cmd)))
        }
        Op::Meta { key } => {
            let k = key_arg(*key);
            let got = c.raw(&cmd!("TIERCACHE.META", k));
            check_meta(model, k, &got, c.proto)
        }
        Op::Del { keys, native } => {
            let (cmd, deleted) = model.del(keys, *native);
            let got = c.raw(&cmd);
            expect(&got, &Want::Int(deleted)).map_err(|e| format!("{}: {e}", cmd_text(&cmd)))
        }
        Op::Invalidate { tags } => {
            let names: Vec<Vec<u8>> = tags.iter().map(|&i| tag_name(i).to_vec()).collect();
            let mut cmd = redis::cmd("TIERCACHE.INVALIDATE");
            for n in &names {
                cmd.arg(&n[..]);
            }
            let want = model.invalidate(&names);
            tally(if want > 0 { "INVALIDATE of live entries" } else { "INVALIDATE of nothing" });
            let got = c.raw(&cmd);
            expect(&got, &Want::Int(want)).map_err(|e| format!("{}: {e}", cmd_text(&cmd)))?;
            wait_reclaimed(c)?;
            model.reclaim();
            Ok(())
        }
        Op::InvalidateMany { hot } => {
            let names: Vec<Vec<u8>> = (0..=REMEMBERED_TAGS)
                .map(|i| match hot {
                    Some(t) => TAGS[*t].to_vec(),
                    None => format!("many:{i}").into_bytes(),
                })
                .collect();
            let mut cmd = redis::cmd("TIERCACHE.INVALIDATE");
            for n in &names {
                cmd.arg(&n[..]);
            }
            let want = model.invalidate(&names);
            let got = c.raw(&cmd);
            tally(if hot.is_some() { "INVALIDATE of one tag 65 times" } else { "INVALIDATE of 65 tags" });
            expect(&got, &Want::Int(want)).map_err(|e| format!("INVALIDATE of 65 tags: {e}"))?;
            wait_reclaimed(c)?;
            model.reclaim();
            Ok(())
        }
        Op::TagCount { tag } => {
            let t = tag_name(*tag);
            let got = c.raw(&cmd!("TIERCACHE.TAGCOUNT", t));
            expect(&got, &Want::Int(model.tag_keys(t).len() as i64)).map_err(|e| format!("TAGCOUNT {}: {e}", show(t)))
        }
        Op::TagKeys { tag, count } => {
            let t = tag_name(*tag);
            let mut cmd = cmd!("TIERCACHE.TAGKEYS", t);
            if let Some(n) = count {
                cmd.arg("COUNT").arg(*n);
            }
            let got = c.raw(&cmd);
            check_tagkeys(model, t, *count, &got).map_err(|e| format!("{}: {e}", cmd_text(&cmd)))
        }
        Op::Release { key, tok, pass } => {
            let k = key_arg(*key);
            let qk = model.qk(k);
            let token = model.token(*tok, &qk);
            let mut cmd = cmd!("TIERCACHE.RELEASE", k, &token[..]);
            if *pass {
                cmd.arg("PASS");
            }
            let want = if matches!(tok, Tok::Invalid) {
                Want::Err("ERR invalid lease token".into())
            } else if model.leases.get(&qk).is_some_and(|l| l.token == token) {
                model.leases.remove(&qk);
                if *pass {
                    model.counters.passes += 1;
                }
                Want::Int(1)
            } else {
                Want::Int(0)
            };
            tally(format!("RELEASE{} -> {want:?}", if *pass { " PASS" } else { "" }));
            let got = c.raw(&cmd);
            expect(&got, &want).map_err(|e| format!("{}: {e}", cmd_text(&cmd)))
        }
        Op::Select { db } => {
            model.db = *db;
            let got = c.raw(&cmd!("SELECT", *db));
            expect(&got, &Want::Ok).map_err(|e| format!("SELECT {db}: {e}"))
        }
        Op::NativeSet { key } => {
            let k = key_arg(*key);
            let qk = model.qk(k);
            // Replacing an entry with a string: the entry leaves the index. Whether this fences a
            // lease cannot show: a fill on a string key is WRONGTYPE, and removing the string fences.
            model.entries.remove(&qk);
            model.strings.insert(qk, false);
            tally("native SET");
            let got = c.raw(&cmd!("SET", k, "native"));
            expect(&got, &Want::Ok).map_err(|e| format!("SET: {e}"))
        }
        Op::Persist { key } => {
            let k = key_arg(*key);
            let qk = model.qk(k);
            let had_ttl = match (model.entries.get_mut(&qk), model.strings.get_mut(&qk)) {
                (Some(e), _) => std::mem::replace(&mut e.expire_at, T::Never) != T::Never,
                (None, Some(ttl)) => std::mem::replace(ttl, false),
                (None, None) => false,
            };
            tally(format!("PERSIST -> {}", i64::from(had_ttl)));
            let got = c.raw(&cmd!("PERSIST", k));
            expect(&got, &Want::Int(i64::from(had_ttl))).map_err(|e| format!("PERSIST: {e}"))
        }
        Op::PexpireAt { key, past } => {
            let k = key_arg(*key);
            let qk = model.qk(k);
            let at = if *past { PAST_MS } else { FAR_MS };
            let existed = model.exists(&qk);
            if *past {
                // A time in the past deletes the key, which fences a lease on it.
                model.delete(&qk);
            } else if let Some(e) = model.entries.get_mut(&qk) {
                e.expire_at = T::Abs(at);
            } else if let Some(ttl) = model.strings.get_mut(&qk) {
                *ttl = true;
            }
            tally(format!("PEXPIREAT {} -> {}", if *past { "past" } else { "future" }, i64::from(existed)));
            let got = c.raw(&cmd!("PEXPIREAT", k, at));
            expect(&got, &Want::Int(i64::from(existed))).map_err(|e| format!("PEXPIREAT {at}: {e}"))
        }
        Op::Exists { key } => {
            let k = key_arg(*key);
            let want = i64::from(model.exists(&model.qk(k)));
            let got = c.raw(&cmd!("EXISTS", k));
            expect(&got, &Want::Int(want)).map_err(|e| format!("EXISTS: {e}"))
        }
        Op::Multi(ops) => run_multi(c, model, ops),
    }
}

/// What one command inside MULTI should answer, decided when it is queued.
enum TxWant {
    Plain(Want),
    Exact(Value),
    Meta(Vec<u8>, MetaWant),
    TagKeys(BTreeSet<Vec<u8>>),
}

fn run_multi(c: &mut Conn, model: &mut Model, ops: &[TxOp]) -> Result<(), String> {
    let mut queued: Vec<(redis::Cmd, TxWant)> = Vec::new();
    for op in ops {
        let (cmd, want) = match op {
            TxOp::Set(s) => {
                let (cmd, value_arg) = set_cmd(model, s);
                let (want, expired) = model.set(s, &value_arg);
                ensure!(!expired, "generator: a SET in MULTI must not expire at once: {s:?}");
                tally(match &want {
                    Want::Err(e) => format!("MULTI: SET error: {e}"),
                    _ => "MULTI: SET ok".to_string(),
                });
                (cmd, TxWant::Plain(want))
            }
            TxOp::Get { key, encoded } => {
                let k = key_arg(*key);
                let qk = model.qk(k);
                let cmd = if *encoded { cmd!("TIERCACHE.GET", k, "ENCODED") } else { cmd!("TIERCACHE.GET", k) };
                let want = if model.strings.contains_key(&qk) {
                    TxWant::Plain(Want::Err(WRONGTYPE.into()))
                } else {
                    let live = model.live(&qk).filter(|e| e.fresh()).cloned();
                    tally(match (&live, model.entries.get(&qk)) {
                        (Some(_), _) => "MULTI: GET hit",
                        (None, Some(e)) if e.dead => "MULTI: GET of an invalidated key (nil)",
                        _ => "MULTI: GET nil",
                    });
                    if live.is_some() {
                        model.counters.hits += 1;
                    } else {
                        model.counters.misses += 1;
                    }
                    match (live, encoded) {
                        (None, _) => TxWant::Plain(Want::Nil),
                        (Some(e), false) => TxWant::Plain(Want::Bulk(e.value)),
                        (Some(e), true) => TxWant::Exact(Value::Array(vec![
                            Value::BulkString(e.encoding().as_bytes().to_vec()),
                            Value::BulkString(e.stored),
                        ])),
                    }
                };
                (cmd, want)
            }
            TxOp::Meta { key } => {
                let k = key_arg(*key);
                (cmd!("TIERCACHE.META", k), TxWant::Meta(k.to_vec(), meta_want(model, k)))
            }
            TxOp::Exists { key } => {
                let k = key_arg(*key);
                let qk = model.qk(k);
                if model.entries.get(&qk).is_some_and(|e| e.dead) {
                    tally("MULTI: EXISTS of an invalidated key (1)");
                }
                (cmd!("EXISTS", k), TxWant::Plain(Want::Int(i64::from(model.exists(&qk)))))
            }
            TxOp::Del { keys, native } => {
                let (cmd, deleted) = model.del(keys, *native);
                (cmd, TxWant::Plain(Want::Int(deleted)))
            }
            TxOp::Invalidate { tags } => {
                let names: Vec<Vec<u8>> = tags.iter().map(|&i| TAGS[i].to_vec()).collect();
                let mut cmd = redis::cmd("TIERCACHE.INVALIDATE");
                for n in &names {
                    cmd.arg(&n[..]);
                }
                let dead_before = model.entries.values().filter(|e| e.dead).count();
                let want = model.invalidate(&names);
                if dead_before > 0 && want > 0 {
                    tally("MULTI: INVALIDATE with invalidated entries not reclaimed yet");
                }
                (cmd, TxWant::Plain(Want::Int(want)))
            }
            TxOp::TagCount { tag } => {
                let t = TAGS[*tag];
                let n = model.tag_keys(t).len() as i64;
                (cmd!("TIERCACHE.TAGCOUNT", t), TxWant::Plain(Want::Int(n)))
            }
            TxOp::TagKeys { tag } => {
                let t = TAGS[*tag];
                (cmd!("TIERCACHE.TAGKEYS", t), TxWant::TagKeys(model.tag_keys(t)))
            }
        };
        queued.push((cmd, want));
    }
    expect(&c.raw(&cmd!("MULTI")), &Want::Ok).map_err(|e| format!("MULTI: {e}"))?;
    for (cmd, _) in &queued {
        let q = c.raw(cmd);
        ensure!(matches!(&q, Value::SimpleString(s) if s == "QUEUED"), "{} in MULTI: {q:?}, want QUEUED", cmd_text(cmd));
    }
    let exec = c.raw(&cmd!("EXEC"));
    let Value::Array(replies) = exec else {
        return Err(format!("EXEC: not an array: {exec:?}"));
    };
    ensure!(replies.len() == queued.len(), "EXEC: {} replies for {} commands", replies.len(), queued.len());
    for (i, ((cmd, want), got)) in queued.into_iter().zip(&replies).enumerate() {
        let r = match want {
            TxWant::Plain(w) => expect(got, &w),
            TxWant::Exact(v) => {
                if *got == v {
                    Ok(())
                } else {
                    Err(format!("expected {v:?}, got {got:?}"))
                }
            }
            TxWant::Meta(k, m) => check_meta_with(model, &k, m, got, c.proto),
            TxWant::TagKeys(set) => check_tagkeys_with(set, None, got),
        };
        r.map_err(|e| format!("MULTI command #{i} {}: {e}", cmd_text(&cmd)))?;
    }
    wait_reclaimed(c)?;
    model.reclaim();
    Ok(())
}

fn check_tagkeys(model: &Model, tag: &[u8], count: Option<i64>, got: &Value) -> Result<(), String> {
    check_tagkeys_with(model.tag_keys(tag), count, got)
}

fn check_tagkeys_with(want: BTreeSet<Vec<u8>>, count: Option<i64>, got: &Value) -> Result<(), String> {
    if count == Some(0) {
        return expect(got, &Want::Err("ERR COUNT must be a positive integer".into()));
    }
    let Value::Array(items) = got else {
        return Err(format!("TAGKEYS: not an array: {got:?}"));
    };
    let keys: Vec<Vec<u8>> = items
        .iter()
        .map(|v| match v {
            Value::BulkString(b) => Ok(b.clone()),
            other => Err(format!("TAGKEYS: element not a bulk string: {other:?}")),
        })
        .collect::<Result<_, _>>()?;
    let set: BTreeSet<Vec<u8>> = keys.iter().cloned().collect();
    ensure!(set.len() == keys.len(), "TAGKEYS: repeated names {keys:?}");
    let limit = count.unwrap_or(100) as usize;
    ensure!(set.is_subset(&want), "TAGKEYS: {set:?} not among {want:?}");
    ensure!(set.len() == want.len().min(limit), "TAGKEYS: {} names, want {} of {want:?}", set.len(), want.len().min(limit));
    Ok(())
}

/// Waits until the reclaim timer has deleted every invalidated key (bounded; not a timing assertion:
/// only a server that never finishes fails it).
fn wait_reclaimed(c: &mut Conn) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if c.stats().get("reclaim_pending") == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err("reclaim_pending still > 0 after 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stats_map(c: &mut Conn) -> BTreeMap<String, i64> {
    c.stats().0.into_iter().collect()
}

/// After a sequence: every key's META, every tag's keys, and STATS against the model.
fn final_sweep(c: &mut Conn, model: &mut Model, before: &BTreeMap<String, i64>) -> Result<(), String> {
    for db in 0..2u8 {
        model.db = db;
        c.ok(&cmd!("SELECT", db));
        for (i, k) in KEYS.iter().enumerate() {
            let got = c.raw(&cmd!("TIERCACHE.META", *k));
            check_meta(model, k, &got, c.proto).map_err(|e| format!("final META of key #{i} in db {db}: {e}"))?;
        }
        for i in 0..TAGS.len() + OTHER_TAGS.len() {
            let t = tag_name(i);
            let got = c.raw(&cmd!("TIERCACHE.TAGKEYS", t));
            check_tagkeys(model, t, None, &got).map_err(|e| format!("final TAGKEYS {} in db {db}: {e}", show(t)))?;
        }
    }
    let after = stats_map(c);
    let delta = |f: &str| after[f] - before[f];
    let got = Counters {
        hits: delta("hits"),
        misses: delta("misses"),
        sets: delta("sets"),
        fenced: delta("fenced"),
        stale_served: delta("stale_served"),
        leases_granted: delta("leases_granted"),
        passes: delta("passes"),
        invalidations: delta("invalidations"),
    };
    ensure!(got == model.counters, "STATS counters over the case: want {:?}, got {got:?}", model.counters);
    for f in ["handoffs", "waiters_parked", "waiters_woken", "wait_timeouts", "lease_timeouts", "early_refreshes"] {
        ensure!(delta(f) == 0, "STATS {f} moved by {}", delta(f));
    }
    let e = &model.entries;
    // (database, tag) pairs.
    let tags: BTreeSet<(u8, &Vec<u8>)> = e.iter().flat_map(|(k, x)| x.tags.iter().map(move |t| (k[0], t))).collect();
    let gauges = [
        ("entries", e.len() as i64),
        ("compressed_entries", e.values().filter(|x| x.lz4).count() as i64),
        ("bytes_original", e.values().map(|x| x.value.len() as i64).sum()),
        ("bytes_stored", e.values().map(|x| x.stored.len() as i64).sum()),
        ("tags", tags.len() as i64),
        ("tag_index_entries", e.values().map(|x| x.tags.len() as i64).sum()),
        ("reclaim_pending", 0),
        ("leases", model.leases.len() as i64),
        ("lease_waiters", 0),
    ];
    for (f, want) in gauges {
        ensure!(after[f] == want, "STATS {f}: want {want}, got {}", after[f]);
    }
    Ok(())
}

fn run_case(c: &mut Conn, ops: &[Op]) -> Result<(), String> {
    c.ok(&cmd!("FLUSHALL", "SYNC"));
    c.ok(&cmd!("SELECT", 0));
    let before = stats_map(c);
    let mut model = Model::new();
    for (i, op) in ops.iter().enumerate() {
        run_op(c, &mut model, op).map_err(|e| format!("step {i} ({op:?}): {e}"))?;
    }
    final_sweep(c, &mut model, &before)
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_CASES)
}

fn run_model(server: &Server, proto: Proto) {
    let mut c = server.conn_proto(proto);
    assert_eq!(STATS_FIELDS.len(), c.stats().0.len());
    // The runner wants a Fn: the connection is borrowed mutably inside each case.
    let c = std::cell::RefCell::new(c);
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&sequence_strategy(), |ops| run_case(&mut c.borrow_mut(), &ops).map_err(TestCaseError::fail));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, ops)) => {
            panic!("{proto:?}: the server disagrees with the model.\nminimal sequence ({} ops):\n{ops:#?}\n{why}", ops.len())
        }
        Err(e) => panic!("{proto:?}: {e}"),
    }
}

/// One server for the whole run, both protocols.
#[test]
fn server_matches_model() {
    // Leases must never expire inside a case: allow LEASE_MS above the default cap (60 s).
    let server = Server::builder().module_args(&["max-lease-ms", "600000"]).start();
    run_model(&server, Proto::Resp2);
    run_model(&server, Proto::Resp3);
    TALLY.with(|t| {
        for (what, n) in t.borrow().iter() {
            eprintln!("{n:>8}  {what}");
        }
    });
}
