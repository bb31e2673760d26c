//! The tag index: per database, tag -> {epoch, keys of the live entries attached under that epoch},
//! plus the queue of invalidated keys waiting to be reclaimed.
//!
//! Invalidation is O(1) in the number of keys: `invalidate` removes the tag's slot (so every entry that
//! recorded the old epoch stops being valid at once) and moves its key set, as a whole, onto the reclaim
//! queue, which is drained a bounded number of keys at a time. A tag that comes back gets a new slot with
//! a new epoch from a counter that never repeats, so old entries can never match it again.
//!
//! An entry's tag list records, per tag, the epoch it was attached under (or PENDING / DEAD, see `tags`).
//! The index never holds pointers to entries, only key names, so a value Redis frees without telling us
//! cannot leave a dangling reference.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, HashSet, VecDeque};

use ahash::RandomState;

use crate::tags::{TagList, DEAD, PENDING};

type Key = Box<[u8]>;
type KeySet = HashSet<Key, RandomState>;

/// One tag in one database.
#[derive(Debug)]
pub struct Slot {
    epoch: u64,
    keys: KeySet,
}

/// The index of one database.
#[derive(Debug, Default)]
pub struct DbIndex {
    tags: HashMap<Key, Slot, RandomState>,
    /// Key sets taken out by invalidations, drained a few keys at a time.
    queue: VecDeque<std::collections::hash_set::IntoIter<Key>>,
    queued: usize,
    members: usize,
}

/// What `attach` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// The entry is valid and indexed under its key.
    Live,
    /// The entry was invalidated: the caller should queue it for reclaim.
    Dead,
}

/// The whole index.
#[derive(Debug, Default)]
pub struct Registry {
    dbs: Vec<DbIndex>,
    last_epoch: u64,
}

/// Gauges for INFO.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    /// Distinct tags with at least one live entry, over all databases.
    pub tags: usize,
    /// Sum over tags of the live entries carrying them.
    pub entries: usize,
    /// Keys waiting to be reclaimed.
    pub reclaim_pending: usize,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn db_mut(&mut self, db: usize) -> &mut DbIndex {
        if self.dbs.len() <= db {
            self.dbs.resize_with(db + 1, DbIndex::default);
        }
        &mut self.dbs[db]
    }

    fn next_epoch(&mut self) -> u64 {
        self.last_epoch += 1;
        self.last_epoch
    }

    /// True when every tag of the entry still has the epoch the entry was attached under.
    #[inline]
    pub fn is_valid(&self, db: usize, tags: &TagList) -> bool {
        if tags.is_empty() {
            return true;
        }
        let Some(index) = self.dbs.get(db) else { return false };
        tags.with_epochs()
            .all(|(epoch, name)| epoch != PENDING && epoch != DEAD && index.tags.get(name).is_some_and(|s| s.epoch == epoch))
    }

    /// True when the entry was invalidated: loaded dead, or attached under an epoch its tag no longer
    /// has. A PENDING entry (not attached yet) is not dead. Used when persisting.
    pub fn is_dead(&self, db: usize, tags: &TagList) -> bool {
        let index = self.dbs.get(db);
        tags.with_epochs().any(|(epoch, name)| {
            epoch == DEAD
                || (epoch != PENDING && index.and_then(|i| i.tags.get(name)).is_none_or(|s| s.epoch != epoch))
        })
    }

    /// Indexes an entry stored under `key`. A PENDING entry (just written or loaded) takes the current
    /// epochs, creating slots as needed; an entry attached before (COPY, RENAME) is indexed again if
    /// still valid; anything else is dead.
    pub fn attach(&mut self, db: usize, key: &[u8], tags: &mut TagList) -> Attach {
        if tags.is_empty() {
            return Attach::Live;
        }
        let pending = tags.with_epochs().all(|(e, _)| e == PENDING);
        if pending {
            let mut fresh = Vec::new();
            {
                let index = self.db_mut(db);
                for name in tags.iter() {
                    if !index.tags.contains_key(name) {
                        fresh.push(Key::from(name));
                    }
                }
            }
            for name in fresh {
                let epoch = self.next_epoch();
                self.db_mut(db).tags.insert(name, Slot { epoch, keys: KeySet::default() });
            }
        } else if !self.is_valid(db, tags) {
            return Attach::Dead;
        }
        let index = self.db_mut(db);
        tags.set_epochs(|name, _| {
            let slot = index.tags.get_mut(name).expect("slot created above");
            if slot.keys.insert(Key::from(key)) {
                index.members += 1;
            }
            slot.epoch
        });
        Attach::Live
    }

    /// Removes an entry's key from every slot it is indexed under (the entry is being deleted,
    /// overwritten, renamed or moved), leaving its tags PENDING.
    pub fn detach(&mut self, db: usize, key: &[u8], tags: &mut TagList) {
        if tags.is_empty() {
            return;
        }
        let Some(index) = self.dbs.get_mut(db) else { return };
        let mut all_attached = true;
        tags.set_epochs(|name, epoch| {
            if epoch == PENDING || epoch == DEAD {
                all_attached &= epoch == PENDING;
                return epoch;
            }
            if let MapEntry::Occupied(mut slot) = index.tags.entry(Key::from(name)) {
                if slot.get().epoch == epoch {
                    if slot.get_mut().keys.remove(key) {
                        index.members -= 1;
                    }
                    if slot.get().keys.is_empty() {
                        slot.remove();
                    }
                    return PENDING;
                }
            }
            all_attached = false;
            epoch
        });
        // An entry that had lost any tag stays dead wherever it goes next.
        if !all_attached {
            tags.set_epochs(|_, _| DEAD);
        }
    }

    /// Invalidates tags in `db`: returns how many distinct live entries carried any of them. With
    /// `queue`, their keys are queued for reclaim; otherwise (replicas) the key sets are dropped.
    pub fn invalidate(&mut self, db: usize, tags: &[&[u8]], queue: bool) -> usize {
        let index = self.db_mut(db);
        let mut taken: Vec<KeySet> = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some(slot) = index.tags.remove(*tag) {
                index.members -= slot.keys.len();
                taken.push(slot.keys);
            }
        }
        // Distinct keys: the largest set counts whole, the others only for keys it lacks.
        taken.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut count = 0;
        for (i, set) in taken.iter().enumerate() {
            count += if i == 0 { set.len() } else { set.iter().filter(|k| !taken[..i].iter().any(|s| s.contains(*k))).count() };
        }
        if queue {
            for set in taken {
                if !set.is_empty() {
                    index.queued += set.len();
                    index.queue.push_back(set.into_iter());
                }
            }
        }
        count
    }

    /// Queues one key for reclaim (a dead entry found on load).
    pub fn queue_key(&mut self, db: usize, key: &[u8]) {
        let index = self.db_mut(db);
        let mut one = KeySet::default();
        one.insert(Key::from(key));
        index.queued += 1;
        index.queue.push_back(one.into_iter());
    }

    /// Takes up to `budget` queued keys, oldest invalidation first, as `(db, key)`.
    pub fn take_reclaim(&mut self, budget: usize) -> Vec<(usize, Key)> {
        let mut out = Vec::new();
        for (db, index) in self.dbs.iter_mut().enumerate() {
            while out.len() < budget {
                let Some(front) = index.queue.front_mut() else { break };
                match front.next() {
                    Some(key) => {
                        index.queued -= 1;
                        out.push((db, key));
                    }
                    None => {
                        index.queue.pop_front();
                    }
                }
            }
            // Release exhausted iterators (and their tables) promptly.
            while index.queue.front().is_some_and(|it| it.len() == 0) {
                index.queue.pop_front();
            }
        }
        out
    }

    pub fn reclaim_pending(&self) -> usize {
        self.dbs.iter().map(|d| d.queued).sum()
    }

    /// Live entries carrying `tag` in `db`.
    pub fn tag_count(&self, db: usize, tag: &[u8]) -> usize {
        self.dbs.get(db).and_then(|d| d.tags.get(tag)).map_or(0, |s| s.keys.len())
    }

    /// Up to `n` keys of live entries carrying `tag` in `db`.
    pub fn tag_keys(&self, db: usize, tag: &[u8], n: usize) -> Vec<&[u8]> {
        self.dbs
            .get(db)
            .and_then(|d| d.tags.get(tag))
            .map(|s| s.keys.iter().take(n).map(|k| &k[..]).collect())
            .unwrap_or_default()
    }

    /// Forgets one database (FLUSHDB) or all of them (`None`, FLUSHALL and full reloads).
    pub fn flush(&mut self, db: Option<usize>) {
        match db {
            Some(db) => {
                if let Some(d) = self.dbs.get_mut(db) {
                    *d = DbIndex::default();
                }
            }
            None => self.dbs.clear(),
        }
    }

    /// SWAPDB.
    pub fn swap(&mut self, a: usize, b: usize) {
        self.db_mut(a.max(b));
        self.dbs.swap(a, b);
    }

    pub fn stats(&self) -> IndexStats {
        IndexStats {
            tags: self.dbs.iter().map(|d| d.tags.len()).sum(),
            entries: self.dbs.iter().map(|d| d.members).sum(),
            reclaim_pending: self.reclaim_pending(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(t: &[&str]) -> TagList {
        TagList::new(t.iter().map(|s| s.as_bytes()))
    }

    #[test]
    fn attach_then_invalidate_makes_entries_invalid_at_once() {
        let mut r = Registry::new();
        let mut a = tl(&["user:1", "org:7"]);
        let mut b = tl(&["user:1"]);
        let mut c = tl(&["org:7"]);
        assert!(!r.is_valid(0, &a), "pending is not valid");
        assert!(!r.is_dead(0, &a), "pending is not dead either");
        assert_eq!(r.attach(0, b"a", &mut a), Attach::Live);
        assert_eq!(r.attach(0, b"b", &mut b), Attach::Live);
        assert_eq!(r.attach(0, b"c", &mut c), Attach::Live);
        assert!(r.is_valid(0, &a) && r.is_valid(0, &b) && r.is_valid(0, &c));
        assert!(!r.is_valid(1, &a), "per database");
        assert_eq!(r.tag_count(0, b"user:1"), 2);
        assert_eq!(r.stats(), IndexStats { tags: 2, entries: 4, reclaim_pending: 0 });

        assert_eq!(r.invalidate(0, &[b"user:1"], true), 2);
        assert!(!r.is_valid(0, &a) && !r.is_valid(0, &b));
        assert!(r.is_dead(0, &a) && r.is_dead(0, &b));
        assert!(r.is_valid(0, &c) && !r.is_dead(0, &c));
        assert_eq!(r.tag_count(0, b"user:1"), 0);
        assert_eq!(r.reclaim_pending(), 2);

        // A new entry with the tag is valid; the old ones never come back.
        let mut d = tl(&["user:1"]);
        assert_eq!(r.attach(0, b"d", &mut d), Attach::Live);
        assert!(r.is_valid(0, &d));
        assert!(!r.is_valid(0, &a) && !r.is_valid(0, &b));

        let mut got: Vec<Vec<u8>> = r.take_reclaim(10).into_iter().map(|(db, k)| { assert_eq!(db, 0); k.to_vec() }).collect();
        got.sort();
        assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
        assert_eq!(r.reclaim_pending(), 0);

        // Deleting the dead `a` removes it from org:7 too.
        r.detach(0, b"a", &mut a);
        assert_eq!(r.tag_count(0, b"org:7"), 1);
        assert!(a.with_epochs().all(|(e, _)| e == DEAD));
        assert_eq!(r.attach(0, b"a2", &mut a), Attach::Dead, "a dead entry stays dead when copied");
    }

    #[test]
    fn invalidate_counts_distinct_entries_and_drains_in_budgets() {
        let mut r = Registry::new();
        let mut lists: Vec<TagList> = (0..10).map(|i| if i % 2 == 0 { tl(&["x", "y"]) } else { tl(&["x"]) }).collect();
        for (i, l) in lists.iter_mut().enumerate() {
            r.attach(0, format!("k{i}").as_bytes(), l);
        }
        assert_eq!(r.invalidate(0, &[b"y", b"x", b"nope"], true), 10);
        assert_eq!(r.stats().entries, 0);
        assert_eq!(r.stats().tags, 0);
        let mut seen = 0;
        loop {
            let batch = r.take_reclaim(3);
            if batch.is_empty() {
                break;
            }
            assert!(batch.len() <= 3);
            seen += batch.len();
        }
        assert_eq!(seen, 15, "keys of both sets are queued (duplicates are checked on reclaim)");
    }

    #[test]
    fn detach_and_reattach_follow_renames_and_overwrites() {
        let mut r = Registry::new();
        let mut e = tl(&["t"]);
        r.attach(0, b"old", &mut e);
        r.detach(0, b"old", &mut e);
        assert_eq!(r.stats(), IndexStats::default(), "an empty tag leaves the index");
        assert!(e.with_epochs().all(|(ep, _)| ep == PENDING));
        assert_eq!(r.attach(3, b"new", &mut e), Attach::Live, "MOVE to db 3");
        assert_eq!(r.tag_keys(3, b"t", 10), vec![&b"new"[..]]);
        // attaching twice is harmless
        assert_eq!(r.attach(3, b"new", &mut e), Attach::Live);
        assert_eq!(r.stats().entries, 1);
    }

    #[test]
    fn flush_swap_and_replica_mode() {
        let mut r = Registry::new();
        let mut a = tl(&["t"]);
        let mut b = tl(&["t"]);
        r.attach(0, b"a", &mut a);
        r.attach(1, b"b", &mut b);
        r.swap(0, 1);
        assert!(r.is_valid(1, &a) && r.is_valid(0, &b));
        r.flush(Some(0));
        assert!(!r.is_valid(0, &b) && r.is_valid(1, &a));
        assert_eq!(r.invalidate(1, &[b"t"], false), 1);
        assert_eq!(r.reclaim_pending(), 0, "replicas do not queue");
        r.queue_key(2, b"dead");
        assert_eq!(r.take_reclaim(5), vec![(2, Key::from(&b"dead"[..]))]);
        r.flush(None);
        assert_eq!(r.stats(), IndexStats::default());
    }
}
