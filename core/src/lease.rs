//! The fill-lease state machine behind `TIERCACHE.GET key LEASE ms [WAIT ms]` (stampede protection).
//!
//! ```text
//!            acquire                 SET ... LEASE token (not fenced)
//!   free ─────────────▶ held ───────────────────────────────▶ filled: waiters get HIT, lease gone
//!    ▲                   │ ├── RELEASE token PASS ──────────▶ passed: waiters get PASS, lease gone
//!    │                   │ └── expiry / holder disconnects /
//!    │                   │     RELEASE token / fenced SET ──▶ handed off: the first waiter holds a new
//!    └───────────────────┘        (no waiter: lease gone)      lease (FILL), the others keep waiting
//! ```
//!
//! A lease is *fenced* when the key is written or deleted by anyone but its holder, or when one of the
//! tags is invalidated after the grant: the holder's fill is then refused, so a value read before an
//! invalidation can never be stored after it.
//!
//! Waiters are opaque to this module (the Redis adapter stores blocked-client handles); they only need
//! to say which client they are.

use std::collections::{HashMap, VecDeque};

use ahash::RandomState;

/// A parked caller.
pub trait Waiter {
    /// The connection's client id.
    fn client(&self) -> u64;
}

/// Why a fill was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fence {
    /// No lease, another token holds it, or it expired.
    NotHeld,
    /// The key was written or deleted by someone else after the grant.
    KeyChanged,
    /// A tag of the fill was invalidated after the grant.
    TagInvalidated,
}

impl Fence {
    pub fn message(self) -> &'static str {
        match self {
            Fence::NotHeld => "FENCED the lease is not held by this token (expired, released or re-granted)",
            Fence::KeyChanged => "FENCED the key was written or deleted after the lease was granted",
            Fence::TagInvalidated => "FENCED a tag of this entry was invalidated after the lease was granted",
        }
    }
}

/// Tag hashes remembered per lease before it stops telling tags apart (then any tagged fill is fenced).
const MAX_REMEMBERED_TAGS: usize = 64;

#[derive(Debug)]
pub struct Lease<W> {
    pub token: u64,
    pub holder: u64,
    pub granted_ms: i64,
    pub expires_ms: i64,
    key_changed: bool,
    invalidated: Vec<u64>,
    all_tags_invalidated: bool,
    pub waiters: VecDeque<W>,
}

/// What `acquire` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// The caller now holds the lease.
    Granted(u64),
    /// Another client holds it.
    Busy,
}

/// A waiter to wake with a new lease of its own (hand-off).
#[derive(Debug)]
pub struct Handoff<W> {
    pub waiter: W,
    pub token: u64,
}

type Key = (usize, Box<[u8]>);

/// Every outstanding lease, by (db, key).
#[derive(Debug)]
pub struct LeaseTable<W> {
    leases: HashMap<Key, Lease<W>, RandomState>,
    by_client: HashMap<u64, Vec<Key>, RandomState>,
    hasher: RandomState,
    next_token: u64,
}

impl<W: Waiter> LeaseTable<W> {
    /// `seed` makes tokens unpredictable across restarts (any varying number will do).
    pub fn new(seed: u64) -> Self {
        LeaseTable {
            leases: HashMap::default(),
            by_client: HashMap::default(),
            hasher: RandomState::new(),
            next_token: seed | 1,
        }
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn waiting(&self) -> usize {
        self.leases.values().map(|l| l.waiters.len()).sum()
    }

    fn token(&mut self) -> u64 {
        // A Weyl sequence: distinct for 2^64 grants, not guessable from a client's own tokens alone.
        self.next_token = self.next_token.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.next_token;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).max(1)
    }

    fn insert(&mut self, key: Key, holder: u64, now: i64, ttl_ms: i64, waiters: VecDeque<W>) -> u64 {
        let token = self.token();
        self.by_client.entry(holder).or_default().push(key.clone());
        self.leases.insert(
            key,
            Lease {
                token,
                holder,
                granted_ms: now,
                expires_ms: now.saturating_add(ttl_ms),
                key_changed: false,
                invalidated: Vec::new(),
                all_tags_invalidated: false,
                waiters,
            },
        );
        token
    }

    fn take(&mut self, key: &Key) -> Option<Lease<W>> {
        let lease = self.leases.remove(key)?;
        if let Some(keys) = self.by_client.get_mut(&lease.holder) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_client.remove(&lease.holder);
            }
        }
        Some(lease)
    }

    /// Grants the lease on `key` to `client` for `ttl_ms` unless someone else holds an unexpired one.
    /// An expired lease found here is replaced (its waiters move to the new holder's lease).
    pub fn acquire(&mut self, db: usize, key: &[u8], client: u64, now: i64, ttl_ms: i64) -> Acquire {
        let k: Key = (db, Box::from(key));
        let waiters = match self.leases.get(&k) {
            Some(l) if l.expires_ms > now => return Acquire::Busy,
            Some(_) => self.take(&k).map(|l| l.waiters).unwrap_or_default(),
            None => VecDeque::new(),
        };
        Acquire::Granted(self.insert(k, client, now, ttl_ms, waiters))
    }

    /// True when an unexpired lease exists on `key`.
    pub fn is_held(&self, db: usize, key: &[u8], now: i64) -> bool {
        self.leases.get(&(db, Box::from(key))).is_some_and(|l| l.expires_ms > now)
    }

    /// Parks a waiter on the lease of `key` (which must be held).
    pub fn park(&mut self, db: usize, key: &[u8], waiter: W) -> Result<(), W> {
        match self.leases.get_mut(&(db, Box::from(key))) {
            Some(l) => {
                l.waiters.push_back(waiter);
                Ok(())
            }
            None => Err(waiter),
        }
    }

    /// Removes a waiter (timeout, disconnect); returns it if it was parked.
    pub fn unpark(&mut self, db: usize, key: &[u8], is_it: impl Fn(&W) -> bool) -> Option<W> {
        let l = self.leases.get_mut(&(db, Box::from(key)))?;
        let at = l.waiters.iter().position(is_it)?;
        l.waiters.remove(at)
    }

    /// A fill with `token` and `tags` arrives: on success the lease is gone and returned (its waiters are
    /// to be woken with the new value), with how long the fill took in ms.
    pub fn fill(&mut self, db: usize, key: &[u8], token: u64, tags: &[&[u8]], now: i64) -> Result<(Lease<W>, i64), Fence> {
        let k: Key = (db, Box::from(key));
        let l = self.leases.get(&k).ok_or(Fence::NotHeld)?;
        if l.token != token || l.expires_ms <= now {
            return Err(Fence::NotHeld);
        }
        if l.key_changed {
            return Err(Fence::KeyChanged);
        }
        if !tags.is_empty() && (l.all_tags_invalidated || tags.iter().any(|t| l.invalidated.contains(&self.hasher.hash_one(t)))) {
            return Err(Fence::TagInvalidated);
        }
        let lease = self.take(&k).ok_or(Fence::NotHeld)?;
        let took = now.saturating_sub(lease.granted_ms);
        Ok((lease, took))
    }

    /// `RELEASE key token`: returns the lease if `token` held it.
    pub fn release(&mut self, db: usize, key: &[u8], token: u64, now: i64) -> Option<Lease<W>> {
        let k: Key = (db, Box::from(key));
        match self.leases.get(&k) {
            Some(l) if l.token == token && l.expires_ms > now => self.take(&k),
            _ => None,
        }
    }

    /// The lease timer: returns the lease if `token` still holds it and it has expired.
    pub fn expire(&mut self, db: usize, key: &[u8], token: u64, now: i64) -> Option<Lease<W>> {
        let k: Key = (db, Box::from(key));
        match self.leases.get(&k) {
            Some(l) if l.token == token && l.expires_ms <= now => self.take(&k),
            _ => None,
        }
    }

    /// A client disconnected: the leases it held, as `(db, key, lease)`.
    pub fn client_gone(&mut self, client: u64) -> Vec<(usize, Box<[u8]>, Lease<W>)> {
        let keys = self.by_client.remove(&client).unwrap_or_default();
        keys.into_iter().filter_map(|k| self.leases.remove(&k).map(|l| (k.0, k.1, l))).collect()
    }

    /// Gives a lease that ended without a value to its first waiter: the new lease runs `ttl_ms` from
    /// `now` and keeps the other waiters. `None` when nobody waits.
    pub fn hand_off(&mut self, db: usize, key: &[u8], mut lease: Lease<W>, now: i64, ttl_ms: i64) -> Option<Handoff<W>> {
        let waiter = lease.waiters.pop_front()?;
        let token = self.insert((db, Box::from(key)), waiter.client(), now, ttl_ms, std::mem::take(&mut lease.waiters));
        Some(Handoff { waiter, token })
    }

    /// Someone other than the holder wrote or deleted `key`.
    pub fn key_changed(&mut self, db: usize, key: &[u8]) {
        if let Some(l) = self.leases.get_mut(&(db, Box::from(key))) {
            l.key_changed = true;
        }
    }

    /// Tags were invalidated in `db`: every lease there remembers them.
    pub fn tags_invalidated(&mut self, db: usize, tags: &[&[u8]]) {
        if self.leases.is_empty() {
            return;
        }
        let hashes: Vec<u64> = tags.iter().map(|t| self.hasher.hash_one(t)).collect();
        for ((d, _), l) in self.leases.iter_mut() {
            if *d != db || l.all_tags_invalidated {
                continue;
            }
            // Each tag once: a hot tag invalidated over and over must not use up the room that tells
            // the other tags apart (it used to, and then fenced fills that carry none of them).
            for &h in &hashes {
                if l.invalidated.contains(&h) {
                    continue;
                }
                l.invalidated.push(h);
                if l.invalidated.len() > MAX_REMEMBERED_TAGS {
                    l.invalidated = Vec::new();
                    l.all_tags_invalidated = true;
                    break;
                }
            }
        }
    }

    /// Forgets the leases of one database (FLUSHDB) or of all (`None`: FLUSHALL, full resync): returns
    /// them so their waiters can be answered.
    pub fn drain(&mut self, db: Option<usize>) -> Vec<(usize, Box<[u8]>, Lease<W>)> {
        let keys: Vec<Key> = self.leases.keys().filter(|k| db.is_none_or(|d| k.0 == d)).cloned().collect();
        keys.into_iter().filter_map(|k| self.take(&k).map(|l| (k.0, k.1, l))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    #[derive(Debug, PartialEq)]
    struct W(u64);
    impl Waiter for W {
        fn client(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn one_holder_then_fill_wakes_everyone() {
        let clock = ManualClock::new(1_000);
        let mut t: LeaseTable<W> = LeaseTable::new(7);
        let Acquire::Granted(tok) = t.acquire(0, b"k", 1, clock.now_ms(), 5_000) else { panic!() };
        assert_eq!(t.acquire(0, b"k", 2, clock.now_ms(), 5_000), Acquire::Busy);
        assert!(t.park(0, b"k", W(2)).is_ok());
        assert!(t.park(0, b"k", W(3)).is_ok());
        assert_eq!(t.waiting(), 2);
        clock.advance(120);
        assert_eq!(t.fill(0, b"k", tok ^ 1, &[], clock.now_ms()).unwrap_err(), Fence::NotHeld);
        let (lease, took) = t.fill(0, b"k", tok, &[], clock.now_ms()).unwrap();
        assert_eq!(took, 120);
        assert_eq!(lease.waiters, VecDeque::from([W(2), W(3)]));
        assert!(t.is_empty());
        assert!(t.park(0, b"k", W(4)).is_err(), "no lease to wait on");
    }

    #[test]
    fn expiry_and_disconnect_hand_off_to_the_first_waiter() {
        let mut t: LeaseTable<W> = LeaseTable::new(1);
        let Acquire::Granted(tok) = t.acquire(0, b"k", 1, 0, 100) else { panic!() };
        t.park(0, b"k", W(2)).unwrap();
        t.park(0, b"k", W(3)).unwrap();
        assert!(t.expire(0, b"k", tok, 50).is_none(), "not expired yet");
        let lease = t.expire(0, b"k", tok, 100).expect("expired");
        let h = t.hand_off(0, b"k", lease, 100, 100).expect("a waiter");
        assert_eq!(h.waiter, W(2));
        assert_ne!(h.token, tok);
        assert_eq!(t.waiting(), 1, "W(3) keeps waiting on the new lease");
        // The new holder disconnects: W(3) gets it.
        let mut gone = t.client_gone(2);
        assert_eq!(gone.len(), 1);
        let (db, key, lease) = gone.pop().unwrap();
        let h = t.hand_off(db, &key, lease, 150, 100).unwrap();
        assert_eq!(h.waiter, W(3));
        let lease = t.release(0, b"k", h.token, 160).unwrap();
        assert!(t.hand_off(0, b"k", lease, 160, 100).is_none());
        assert!(t.is_empty());
        assert!(t.client_gone(3).is_empty());
    }

    #[test]
    fn fencing() {
        let mut t: LeaseTable<W> = LeaseTable::new(1);
        let Acquire::Granted(a) = t.acquire(0, b"a", 1, 0, 1_000) else { panic!() };
        let Acquire::Granted(b) = t.acquire(0, b"b", 1, 0, 1_000) else { panic!() };
        let Acquire::Granted(c) = t.acquire(1, b"c", 1, 0, 1_000) else { panic!() };
        t.key_changed(0, b"a");
        t.tags_invalidated(0, &[b"user:1"]);
        assert_eq!(t.fill(0, b"a", a, &[], 10).unwrap_err(), Fence::KeyChanged);
        assert_eq!(t.fill(0, b"b", b, &[b"org:1", b"user:1"], 10).unwrap_err(), Fence::TagInvalidated);
        assert!(t.fill(0, b"b", b, &[b"org:1"], 10).is_ok(), "other tags are fine");
        assert!(t.fill(1, b"c", c, &[b"user:1"], 10).is_ok(), "other databases are fine");
        assert_eq!(t.fill(0, b"a", a, &[], 2_000).unwrap_err(), Fence::NotHeld, "expired first");
        let Acquire::Granted(d) = t.acquire(0, b"d", 1, 0, 1_000) else { panic!() };
        assert_eq!(t.fill(0, b"d", d, &[], 1_000).unwrap_err(), Fence::NotHeld, "expired");
        let many: Vec<Vec<u8>> = (0..100).map(|i| format!("t{i}").into_bytes()).collect();
        let Acquire::Granted(e) = t.acquire(0, b"e", 1, 0, 1_000) else { panic!() };
        t.tags_invalidated(0, &many.iter().map(Vec::as_slice).collect::<Vec<_>>());
        assert_eq!(t.fill(0, b"e", e, &[b"unrelated"], 10).unwrap_err(), Fence::TagInvalidated, "past the limit");
        assert!(t.fill(0, b"e", e, &[], 10).is_ok(), "an untagged fill is not affected");
    }

    /// Found while modelling the 64-tag rule for tests/model.rs: 65 invalidations of one tag (in one
    /// INVALIDATE or in 65) counted as 65 remembered tags, so the lease stopped telling tags apart and
    /// fenced a fill tagged only `cold`.
    #[test]
    fn a_tag_invalidated_again_is_remembered_once() {
        let mut t: LeaseTable<W> = LeaseTable::new(1);
        let Acquire::Granted(a) = t.acquire(0, b"a", 1, 0, 1_000) else { panic!() };
        let Acquire::Granted(b) = t.acquire(0, b"b", 1, 0, 1_000) else { panic!() };
        for _ in 0..=MAX_REMEMBERED_TAGS {
            t.tags_invalidated(0, &[b"hot"]);
        }
        t.tags_invalidated(0, &[&b"hot"[..]; MAX_REMEMBERED_TAGS + 1]);
        assert!(t.fill(0, b"a", a, &[b"cold"], 10).is_ok(), "one tag remembered, not 130");
        assert_eq!(t.fill(0, b"b", b, &[b"cold", b"hot"], 10).unwrap_err(), Fence::TagInvalidated);

        // 64 distinct tags still tell them apart; the 65th makes every tagged fill fenced.
        let Acquire::Granted(c) = t.acquire(0, b"c", 1, 0, 1_000) else { panic!() };
        let Acquire::Granted(d) = t.acquire(0, b"d", 1, 0, 1_000) else { panic!() };
        let names: Vec<Vec<u8>> = (0..MAX_REMEMBERED_TAGS).map(|i| format!("t{i}").into_bytes()).collect();
        t.tags_invalidated(0, &names.iter().map(Vec::as_slice).collect::<Vec<_>>());
        t.tags_invalidated(0, &[b"t0", b"t1"]);
        assert!(t.fill(0, b"c", c, &[b"cold"], 10).is_ok(), "64 distinct tags: still exact");
        t.tags_invalidated(0, &[b"t64"]);
        assert_eq!(t.fill(0, b"d", d, &[b"cold"], 10).unwrap_err(), Fence::TagInvalidated, "65 distinct tags");
    }

    #[test]
    fn an_expired_lease_is_replaced_on_acquire() {
        let mut t: LeaseTable<W> = LeaseTable::new(1);
        let Acquire::Granted(a) = t.acquire(0, b"k", 1, 0, 100) else { panic!() };
        t.park(0, b"k", W(5)).unwrap();
        let Acquire::Granted(b) = t.acquire(0, b"k", 2, 100, 100) else { panic!() };
        assert_ne!(a, b);
        assert_eq!(t.waiting(), 1, "waiters carry over");
        assert!(t.client_gone(1).is_empty(), "the old holder no longer holds it");
        assert_eq!(t.len(), 1);
        let Acquire::Granted(_) = t.acquire(3, b"k", 9, 100, 100) else { panic!() };
        assert_eq!(t.drain(Some(3)).len(), 1, "FLUSHDB of db 3 only");
        assert_eq!(t.len(), 1);
        assert_eq!(t.drain(None).len(), 1);
        assert!(t.is_empty());
        assert!(t.client_gone(2).is_empty() && t.client_gone(9).is_empty(), "holders forgotten too");
    }
}
