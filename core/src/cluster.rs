//! Redis Cluster support with no Redis dependency: the messages masters exchange over the cluster bus for
//! the cluster-wide `TIERCACHE.INVALIDATE`, `TAGCOUNT` and `TAGKEYS`, and the record of recent
//! invalidations that keeps a migrating key from bringing an old value back.
//!
//! Messages are MessagePack arrays (the bus carries bytes; rmp is already used for the invalidation
//! messages). A request is `[1, id, op, db, count, [tag, ...]]`; its acknowledgement is
//! `[1, id, count, [key, ...]]`. `id` is chosen by the node that asks and is only meaningful to it: an
//! acknowledgement whose id it no longer waits for (a request that timed out) is dropped.
//!
//! ## Migration and invalidation
//!
//! An entry's tags record per-node slot epochs that are never persisted: a DUMP carries tag names and an
//! "invalidated" flag, and the target attaches a RESTOREd entry under its own current epochs. That alone
//! lets one race through: the source DUMPs a still-valid entry, the target applies a cluster-wide
//! invalidation of its tag, then the RESTORE lands on the target (after the invalidation, under a fresh
//! epoch) while the source applies the invalidation to a key that has already left. The old value would
//! survive on the target although every master acknowledged the invalidation.
//!
//! [`Recent`] closes it: every node remembers, for a window (`2 x tiercache.cluster-timeout-ms`), when it
//! last invalidated each tag. A RESTOREd entry carrying a tag invalidated on the target within the window
//! is taken as invalidated. Why the window suffices: an invalidation is reported successful only when
//! every master applied it within the timeout of its start; the source DUMPs before it applies it, and
//! MIGRATE's RESTORE follows its DUMP at once, so the RESTORE lands within one timeout (plus the transfer)
//! of the target's own invalidation. The rule errs one way only: an entry written after the invalidation on
//! the source and migrated within the window is dropped too (one extra miss), never kept stale.

use std::collections::{HashMap, VecDeque};

/// Operations a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Invalidate,
    TagCount,
    TagKeys,
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Invalidate => 1,
            Op::TagCount => 2,
            Op::TagKeys => 3,
        }
    }

    fn from_code(c: u64) -> Option<Op> {
        match c {
            1 => Some(Op::Invalidate),
            2 => Some(Op::TagCount),
            3 => Some(Op::TagKeys),
            _ => None,
        }
    }
}

/// A request from the node running the command to every other master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: u64,
    pub op: Op,
    pub db: u64,
    /// TAGKEYS: most keys wanted.
    pub count: u64,
    pub tags: Vec<Vec<u8>>,
}

/// A master's answer: the count (INVALIDATE, TAGCOUNT) or keys (TAGKEYS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub id: u64,
    pub count: u64,
    pub keys: Vec<Vec<u8>>,
}

/// Most bytes of key names one acknowledgement carries (a TAGKEYS reply is cut there): the cluster bus
/// is shared with Redis's own gossip, so no single message should be large.
pub const MAX_ACK_KEY_BYTES: usize = 1024 * 1024;

const VERSION: u64 = 1;

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        use rmp::encode::*;
        let mut m = Vec::with_capacity(32 + self.tags.iter().map(|t| t.len() + 5).sum::<usize>());
        let _ = write_array_len(&mut m, 6);
        let _ = write_uint(&mut m, VERSION);
        let _ = write_uint(&mut m, self.id);
        let _ = write_uint(&mut m, u64::from(self.op.code()));
        let _ = write_uint(&mut m, self.db);
        let _ = write_uint(&mut m, self.count);
        let _ = write_array_len(&mut m, self.tags.len() as u32);
        for t in &self.tags {
            let _ = write_bin(&mut m, t);
        }
        m
    }

    /// `None` for anything malformed (a message from another version, or garbage).
    pub fn decode(mut b: &[u8]) -> Option<Request> {
        use rmp::decode::*;
        if read_array_len(&mut b).ok()? != 6 || read_int::<u64, _>(&mut b).ok()? != VERSION {
            return None;
        }
        let id = read_int(&mut b).ok()?;
        let op = Op::from_code(read_int(&mut b).ok()?)?;
        let db = read_int(&mut b).ok()?;
        let count = read_int(&mut b).ok()?;
        let tags = read_bins(&mut b)?;
        b.is_empty().then_some(Request { id, op, db, count, tags })
    }
}

impl Ack {
    pub fn encode(&self) -> Vec<u8> {
        use rmp::encode::*;
        let mut m = Vec::with_capacity(32 + self.keys.iter().map(|t| t.len() + 5).sum::<usize>());
        let _ = write_array_len(&mut m, 4);
        let _ = write_uint(&mut m, VERSION);
        let _ = write_uint(&mut m, self.id);
        let _ = write_uint(&mut m, self.count);
        let _ = write_array_len(&mut m, self.keys.len() as u32);
        for k in &self.keys {
            let _ = write_bin(&mut m, k);
        }
        m
    }

    pub fn decode(mut b: &[u8]) -> Option<Ack> {
        use rmp::decode::*;
        if read_array_len(&mut b).ok()? != 4 || read_int::<u64, _>(&mut b).ok()? != VERSION {
            return None;
        }
        let id = read_int(&mut b).ok()?;
        let count = read_int(&mut b).ok()?;
        let keys = read_bins(&mut b)?;
        b.is_empty().then_some(Ack { id, count, keys })
    }
}

/// An array of bin strings, each bounded by what is left of the message (no allocation from a claimed
/// length alone).
fn read_bins(b: &mut &[u8]) -> Option<Vec<Vec<u8>>> {
    use rmp::decode::*;
    let n = read_array_len(b).ok()? as usize;
    if n > b.len() {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = read_bin_len(b).ok()? as usize;
        let item = b.get(..len)?;
        out.push(item.to_vec());
        *b = &b[len..];
    }
    Some(out)
}

/// When each (db, tag) was last invalidated here, for `window_ms` (see the module docs). Bounded by the
/// invalidations of one window: older records are dropped as time moves on.
#[derive(Debug, Default)]
pub struct Recent {
    last: HashMap<(u64, Box<[u8]>), i64>,
    order: VecDeque<(i64, u64, Box<[u8]>)>,
}

impl Recent {
    pub fn new() -> Self {
        Self::default()
    }

    fn prune(&mut self, now_ms: i64, window_ms: i64) {
        while let Some((at, _, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) <= window_ms {
                break;
            }
            let Some((at, db, tag)) = self.order.pop_front() else { break };
            let key = (db, tag);
            if self.last.get(&key) == Some(&at) {
                self.last.remove(&key);
            }
        }
    }

    /// Records that `tags` of `db` were invalidated at `now_ms`.
    pub fn record(&mut self, db: u64, tags: &[&[u8]], now_ms: i64, window_ms: i64) {
        self.prune(now_ms, window_ms);
        for t in tags {
            let tag: Box<[u8]> = Box::from(*t);
            self.last.insert((db, tag.clone()), now_ms);
            self.order.push_back((now_ms, db, tag));
        }
    }

    /// True when one of `tags` of `db` was invalidated within the window.
    pub fn any_recent<'a>(&mut self, db: u64, mut tags: impl Iterator<Item = &'a [u8]>, now_ms: i64, window_ms: i64) -> bool {
        self.prune(now_ms, window_ms);
        if self.last.is_empty() {
            return false;
        }
        tags.any(|t| self.last.contains_key(&(db, Box::from(t))))
    }

    /// Tags remembered (for INFO and tests).
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    pub fn clear(&mut self) {
        self.last.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r =
            Request { id: u64::MAX, op: Op::TagKeys, db: 3, count: 100, tags: vec![b"a".to_vec(), b"\0\xff".to_vec(), vec![]] };
        assert_eq!(Request::decode(&r.encode()), Some(r.clone()));
        for op in [Op::Invalidate, Op::TagCount] {
            let r = Request { op, ..r.clone() };
            assert_eq!(Request::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn ack_round_trip() {
        let a = Ack { id: 7, count: 12345, keys: vec![b"k1".to_vec(), b"".to_vec()] };
        assert_eq!(Ack::decode(&a.encode()), Some(a));
    }

    #[test]
    fn garbage_is_refused_not_panicking() {
        let r = Request { id: 1, op: Op::Invalidate, db: 0, count: 0, tags: vec![b"tag".to_vec()] }.encode();
        for cut in 0..r.len() {
            assert_eq!(Request::decode(&r[..cut]), None, "prefix of {cut} bytes");
        }
        let mut extra = r.clone();
        extra.push(0);
        assert_eq!(Request::decode(&extra), None);
        // An ack is not a request and the reverse; a wrong version is refused.
        let a = Ack { id: 1, count: 0, keys: vec![] }.encode();
        assert_eq!(Request::decode(&a), None);
        assert_eq!(Ack::decode(&r), None);
        let mut v2 = r.clone();
        v2[1] = 2;
        assert_eq!(Request::decode(&v2), None);
        // A claimed array far longer than the message.
        assert_eq!(Ack::decode(&[0x94, 1, 1, 0, 0xdd, 0xff, 0xff, 0xff, 0xff]), None);
        for b in 0..=255u8 {
            let _ = Request::decode(&[b, b, b]);
            let _ = Ack::decode(&[b; 9]);
        }
    }

    #[test]
    fn recent_invalidations_expire_after_the_window() {
        let mut r = Recent::new();
        r.record(0, &[b"a", b"b"], 1000, 100);
        assert!(r.any_recent(0, [&b"x"[..], b"a"].into_iter(), 1050, 100));
        assert!(!r.any_recent(1, [&b"a"[..]].into_iter(), 1050, 100), "per database");
        assert!(!r.any_recent(0, [&b"c"[..]].into_iter(), 1050, 100));
        r.record(0, &[b"a"], 1080, 100);
        // b's record is older than the window; a was renewed at 1080.
        assert!(!r.any_recent(0, [&b"b"[..]].into_iter(), 1150, 100));
        assert!(r.any_recent(0, [&b"a"[..]].into_iter(), 1150, 100));
        assert_eq!(r.len(), 1);
        assert!(!r.any_recent(0, [&b"a"[..]].into_iter(), 1181, 100));
        assert!(r.is_empty());
    }
}
