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
    /// The adapter's expiry-timer id (opaque here; 0 until [`LeaseTable::set_timer`]), so the timer can
    /// be cancelled when the lease ends early instead of lingering until its deadline.
    pub timer: u64,
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
type Leases<W> = HashMap<Box<[u8]>, Lease<W>, RandomState>;

/// Where lease tokens come from. A token is the only proof of holding a lease, so in production it
/// must be unpredictable (the module draws it from Redis's cryptographic random bytes); tests may
/// count.
pub type TokenSource = fn() -> u64;

/// Every outstanding lease, by database, then key (looked up by `&[u8]`: no allocation per lookup,
/// which matters because every client DEL in the server asks whether a lease is to be fenced).
#[derive(Debug)]
pub struct LeaseTable<W> {
    dbs: Vec<Leases<W>>,
    count: usize,
    by_client: HashMap<u64, Vec<Key>, RandomState>,
    hasher: RandomState,
    tokens: TokenSource,
}

impl<W: Waiter> LeaseTable<W> {
    pub fn new(tokens: TokenSource) -> Self {
        LeaseTable { dbs: Vec::new(), count: 0, by_client: HashMap::default(), hasher: RandomState::new(), tokens }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn waiting(&self) -> usize {
        self.dbs.iter().flat_map(|d| d.values()).map(|l| l.waiters.len()).sum()
    }

    fn get(&self, db: usize, key: &[u8]) -> Option<&Lease<W>> {
        self.dbs.get(db)?.get(key)
    }

    fn get_mut(&mut self, db: usize, key: &[u8]) -> Option<&mut Lease<W>> {
        self.dbs.get_mut(db)?.get_mut(key)
    }

    /// A fresh token: never 0 (0 is not a valid token) and never the one the key held just before.
    fn token(&mut self, previous: u64) -> u64 {
        loop {
            let t = (self.tokens)();
            if t != 0 && t != previous {
                return t;
            }
        }
    }

    fn insert(&mut self, key: Key, holder: u64, now: i64, ttl_ms: i64, waiters: VecDeque<W>, previous: u64) -> u64 {
        let token = self.token(previous);
        self.by_client.entry(holder).or_default().push(key.clone());
        let (db, name) = key;
        if self.dbs.len() <= db {
            self.dbs.resize_with(db + 1, HashMap::default);
        }
        self.count += 1;
        self.dbs[db].insert(
            name,
            Lease {
                token,
                holder,
                granted_ms: now,
                expires_ms: now.saturating_add(ttl_ms),
                timer: 0,
                key_changed: false,
                invalidated: Vec::new(),
                all_tags_invalidated: false,
                waiters,
            },
        );
        token
    }

    fn take(&mut self, db: usize, key: &[u8]) -> Option<Lease<W>> {
        let lease = self.dbs.get_mut(db)?.remove(key)?;
        self.count -= 1;
        if let Some(keys) = self.by_client.get_mut(&lease.holder) {
            keys.retain(|k| k.0 != db || &*k.1 != key);
            if keys.is_empty() {
                self.by_client.remove(&lease.holder);
            }
        }
        Some(lease)
    }

    /// Grants the lease on `key` to `client` for `ttl_ms` unless someone else holds an unexpired one.
    /// An expired lease found here is replaced (its waiters move to the new holder's lease).
    pub fn acquire(&mut self, db: usize, key: &[u8], client: u64, now: i64, ttl_ms: i64) -> Acquire {
        let (waiters, previous) = match self.get(db, key) {
            Some(l) if l.expires_ms > now => return Acquire::Busy,
            Some(_) => self.take(db, key).map(|l| (l.waiters, l.token)).unwrap_or_default(),
            None => (VecDeque::new(), 0),
        };
        Acquire::Granted(self.insert((db, Box::from(key)), client, now, ttl_ms, waiters, previous))
    }

    /// Records the adapter's expiry timer of the lease `token` holds on `key`.
    pub fn set_timer(&mut self, db: usize, key: &[u8], token: u64, timer: u64) {
        if let Some(l) = self.get_mut(db, key) {
            if l.token == token {
                l.timer = timer;
            }
        }
    }

    /// True when an unexpired lease exists on `key`.
    pub fn is_held(&self, db: usize, key: &[u8], now: i64) -> bool {
        self.get(db, key).is_some_and(|l| l.expires_ms > now)
    }

    /// Parks a waiter on the lease of `key` (which must be held).
    pub fn park(&mut self, db: usize, key: &[u8], waiter: W) -> Result<(), W> {
        match self.get_mut(db, key) {
            Some(l) => {
                l.waiters.push_back(waiter);
                Ok(())
            }
            None => Err(waiter),
        }
    }

    /// Removes a waiter (timeout, disconnect); returns it if it was parked.
    pub fn unpark(&mut self, db: usize, key: &[u8], is_it: impl Fn(&W) -> bool) -> Option<W> {
        let l = self.get_mut(db, key)?;
        let at = l.waiters.iter().position(is_it)?;
        l.waiters.remove(at)
    }

    /// A fill with `token` and `tags` arrives: on success the lease is gone and returned (its waiters are
    /// to be woken with the new value), with how long the fill took in ms.
    pub fn fill(&mut self, db: usize, key: &[u8], token: u64, tags: &[&[u8]], now: i64) -> Result<(Lease<W>, i64), Fence> {
        let l = self.get(db, key).ok_or(Fence::NotHeld)?;
        if l.token != token || l.expires_ms <= now {
            return Err(Fence::NotHeld);
        }
        if l.key_changed {
            return Err(Fence::KeyChanged);
        }
        if !tags.is_empty() && (l.all_tags_invalidated || tags.iter().any(|t| l.invalidated.contains(&self.hasher.hash_one(t)))) {
            return Err(Fence::TagInvalidated);
        }
        let lease = self.take(db, key).ok_or(Fence::NotHeld)?;
        let took = now.saturating_sub(lease.granted_ms);
        Ok((lease, took))
    }

    /// `RELEASE key token`: returns the lease if `token` held it.
    pub fn release(&mut self, db: usize, key: &[u8], token: u64, now: i64) -> Option<Lease<W>> {
        match self.get(db, key) {
            Some(l) if l.token == token && l.expires_ms > now => self.take(db, key),
            _ => None,
        }
    }

    /// The lease timer: returns the lease if `token` still holds it and it has expired.
    pub fn expire(&mut self, db: usize, key: &[u8], token: u64, now: i64) -> Option<Lease<W>> {
        match self.get(db, key) {
            Some(l) if l.token == token && l.expires_ms <= now => self.take(db, key),
            _ => None,
        }
    }

    /// A client disconnected: the leases it held, as `(db, key, lease)`.
    pub fn client_gone(&mut self, client: u64) -> Vec<(usize, Box<[u8]>, Lease<W>)> {
        let keys = self.by_client.remove(&client).unwrap_or_default();
        let gone: Vec<_> = keys.into_iter().filter_map(|(db, k)| self.dbs.get_mut(db)?.remove(&k).map(|l| (db, k, l))).collect();
        self.count -= gone.len();
        gone
    }

    /// Gives a lease that ended without a value to its first waiter: the new lease runs `ttl_ms` from
    /// `now` and keeps the other waiters. `None` when nobody waits.
    pub fn hand_off(&mut self, db: usize, key: &[u8], mut lease: Lease<W>, now: i64, ttl_ms: i64) -> Option<Handoff<W>> {
        let waiter = lease.waiters.pop_front()?;
        let token =
            self.insert((db, Box::from(key)), waiter.client(), now, ttl_ms, std::mem::take(&mut lease.waiters), lease.token);
        Some(Handoff { waiter, token })
    }

    /// Someone other than the holder wrote or deleted `key`.
    pub fn key_changed(&mut self, db: usize, key: &[u8]) {
        if let Some(l) = self.get_mut(db, key) {
            l.key_changed = true;
        }
    }

    /// Tags were invalidated in `db`: every lease there remembers them.
    pub fn tags_invalidated(&mut self, db: usize, tags: &[&[u8]]) {
        let Some(leases) = self.dbs.get_mut(db).filter(|d| !d.is_empty()) else { return };
        let hashes: Vec<u64> = tags.iter().map(|t| self.hasher.hash_one(t)).collect();
        for l in leases.values_mut() {
            if l.all_tags_invalidated {
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
        let keys: Vec<Key> = (0..self.dbs.len())
            .filter(|d| db.is_none_or(|x| x == *d))
            .flat_map(|d| self.dbs[d].keys().map(move |k| (d, k.clone())))
            .collect();
        keys.into_iter().filter_map(|(d, k)| self.take(d, &k).map(|l| (d, k, l))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    /// Counting tokens: predictable on purpose, so the tests can tell grants apart.
    fn counter() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

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
        let mut t: LeaseTable<W> = LeaseTable::new(counter);
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
        let mut t: LeaseTable<W> = LeaseTable::new(counter);
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
        let mut t: LeaseTable<W> = LeaseTable::new(counter);
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
        let mut t: LeaseTable<W> = LeaseTable::new(counter);
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
        let mut t: LeaseTable<W> = LeaseTable::new(counter);
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

    #[test]
    fn tokens_come_from_the_source_never_zero_never_the_previous_one() {
        fn source() -> u64 {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static I: AtomicUsize = AtomicUsize::new(0);
            [0, 0, 7, 7, 7, 9][I.fetch_add(1, Ordering::Relaxed).min(5)]
        }
        let mut t: LeaseTable<W> = LeaseTable::new(source);
        assert_eq!(t.acquire(0, b"k", 1, 0, 10), Acquire::Granted(7), "zeros are skipped");
        assert_eq!(t.acquire(0, b"k", 2, 10, 10), Acquire::Granted(9), "the expired lease's token is not reused");
        t.set_timer(0, b"k", 7, 42);
        assert_eq!(t.get(0, b"k").map(|l| l.timer), Some(0), "a stale token sets nothing");
        t.set_timer(0, b"k", 9, 42);
        assert_eq!(t.get(0, b"k").map(|l| l.timer), Some(42));
    }
}
