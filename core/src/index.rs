//! The tag index: per database, tag -> {epoch, keys of the live entries attached under that epoch},
//! plus the queue of invalidated keys waiting to be reclaimed.
//!
//! Invalidation is O(1) in the number of keys: `invalidate` removes the tag's slot (so every entry that
//! recorded the old epoch stops being valid at once) and moves its key set, as a whole, onto the reclaim
//! queue, which is drained a bounded number of keys at a time. A tag that comes back gets a new slot with
//! a new epoch from a counter that never repeats, so old entries can never match it again.
//!
//! No operation's cost grows with the size of a structure: key sets and the tag-name maps are
//! [`LinTable`]s (grown and shrunk one bucket at a time), slots and the free list are [`ChunkVec`]s (never
//! moved), and the reclaim queue drains a set bucket by bucket. Large structures that are dropped whole
//! (a replica's invalidated key sets, flushed databases) are handed out as [`Garbage`].
//!
//! An entry's tag list records, per tag, the epoch it was attached under (or PENDING / DEAD, see `tags`).
//! The index never holds pointers to entries, only key names, so a value Redis frees without telling us
//! cannot leave a dangling reference.

use std::collections::VecDeque;

use crate::keyset::{KeyDrain, KeySet};
use crate::lintable::{ChunkVec, Hashing, LinTable};
#[cfg(test)]
use crate::tags::TagList;
use crate::tags::{Tags, DEAD, PENDING};

type Key = Box<[u8]>;

/// Something large the index no longer needs, to be dropped off the caller's thread.
pub type Garbage = Box<dyn std::any::Any + Send>;

/// Structures with more entries than this are handed out as [`Garbage`] instead of being freed inline
/// (freeing a table of a million keys takes milliseconds).
pub const BIG: usize = 4096;

/// One tag of one database. Slots live in one chunked vector and are numbered; a freed slot gets epoch 0 and
/// its number is reused with a new epoch, so an entry holding an old (slot, epoch) pair never matches.
#[derive(Debug, Default)]
struct Slot {
    epoch: u64,
    keys: KeySet,
}

/// The index of one database: tag name -> slot number, and the reclaim queue.
#[derive(Debug, Default)]
struct DbIndex {
    by_name: LinTable<(Key, u32)>,
    /// Key sets taken out by invalidations (with their original size), drained a few keys at a time.
    /// Boxed, so that the deque itself stays small when many sets are queued.
    queue: VecDeque<Box<(KeyDrain, usize)>>,
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
    slots: ChunkVec<Slot>,
    free: ChunkVec<u32>,
    dbs: Vec<DbIndex>,
    last_epoch: u64,
    garbage: Vec<Garbage>,
    /// The hasher of every table, and the count of elements the table operations touched.
    hash: Hashing,
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

    #[inline]
    fn matches(&self, slot: u32, epoch: u64) -> bool {
        epoch != PENDING && epoch != DEAD && self.slots.get(slot as usize).is_some_and(|s| s.epoch == epoch)
    }

    /// Takes a free slot (or a new one) with a fresh epoch.
    fn new_slot(&mut self) -> u32 {
        self.last_epoch += 1;
        let epoch = self.last_epoch;
        match self.free.pop() {
            Some(id) => {
                if let Some(slot) = self.slots.get_mut(id as usize) {
                    slot.epoch = epoch;
                }
                id
            }
            None => {
                self.slots.push(Slot { epoch, keys: KeySet::default() });
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Drops `t` here if small, or keeps it for [`Registry::take_garbage`].
    fn discard<T: std::any::Any + Send>(&mut self, t: T, size: usize) {
        if size > BIG {
            self.garbage.push(Box::new(t));
        }
    }

    /// Large structures released since the last call, for the caller to drop elsewhere.
    pub fn take_garbage(&mut self) -> Vec<Garbage> {
        std::mem::take(&mut self.garbage)
    }

    /// Frees a slot; returns its keys.
    fn release(&mut self, id: u32) -> KeySet {
        let Some(slot) = self.slots.get_mut(id as usize) else { return KeySet::default() };
        slot.epoch = 0;
        let keys = std::mem::take(&mut slot.keys);
        self.free.push(id);
        keys
    }

    /// Elements compared or moved by the table operations since the last call: the work of one index
    /// operation, which depends on the tags it names and not on how many keys they have.
    pub fn take_steps(&self) -> u64 {
        self.hash.take_steps()
    }

    /// True when every tag of the entry still has the epoch the entry was attached under. One array
    /// lookup per tag: no hashing, and no database needed (epochs never repeat).
    #[inline]
    pub fn is_valid(&self, tags: &Tags) -> bool {
        tags.refs().all(|r| self.matches(r.slot, r.epoch))
    }

    /// True when the entry was invalidated: loaded dead, or attached under an epoch its tag no longer
    /// has. A PENDING entry (not attached yet) is not dead. Used when persisting.
    pub fn is_dead(&self, tags: &Tags) -> bool {
        tags.refs().any(|r| r.epoch == DEAD || (r.epoch != PENDING && !self.matches(r.slot, r.epoch)))
    }

    /// An entry overwritten by one with the same tags, in the same order (a refresh): when the old one is
    /// still valid, the new one takes its (slot, epoch) refs and its place in the key sets, so neither the
    /// detach of the old nor the attach of the new has to touch the index. Returns false (and changes
    /// nothing) otherwise.
    pub fn carry_over(&self, old: &Tags, new: &mut Tags) -> bool {
        if old.is_empty() || old.as_bytes().len() != new.as_bytes().len() {
            return false;
        }
        // One pass over both lists: the same names in the same order, the new ones pending, the old ones
        // valid.
        let (mut o, mut n) = (old.refs(), new.refs());
        loop {
            match (o.next(), n.next()) {
                (None, None) => break,
                (Some(o), Some(n)) if o.name == n.name && n.epoch == PENDING && self.matches(o.slot, o.epoch) => {}
                _ => return false,
            }
        }
        // Same names in the same order: the two layouts differ only in the refs, which the new one takes.
        new.take_refs_of(old);
        true
    }

    /// Indexes an entry stored under `key` in `db`. A PENDING entry (just written or loaded) takes the
    /// current slots of its tags, creating them as needed; an entry attached before (COPY, RENAME) is
    /// indexed again if still valid; anything else is dead.
    pub fn attach(&mut self, db: usize, key: &[u8], tags: &mut Tags) -> Attach {
        if tags.is_empty() {
            return Attach::Live;
        }
        if tags.refs().all(|r| r.epoch == PENDING) {
            tags.set_refs(|r| {
                let id = match self.dbs.get(db).and_then(|d| d.by_name.get(&self.hash, r.name)) {
                    Some(&(_, id)) => id,
                    None => {
                        let id = self.new_slot();
                        self.db_mut(db);
                        if let Some(index) = self.dbs.get_mut(db) {
                            index.by_name.insert_with(&self.hash, r.name, || (Key::from(r.name), id));
                        }
                        id
                    }
                };
                (self.slots.get(id as usize).map_or(DEAD, |s| s.epoch), id)
            });
        } else if !self.is_valid(tags) {
            return Attach::Dead;
        }
        let mut added = 0;
        for r in tags.refs() {
            if let Some(slot) = self.slots.get_mut(r.slot as usize) {
                if slot.keys.insert(&self.hash, key) {
                    added += 1;
                }
            }
        }
        self.db_mut(db).members += added;
        Attach::Live
    }

    /// Removes an entry's key from every slot it is indexed under (the entry is being deleted,
    /// overwritten, renamed or moved). A valid entry's tags become PENDING (it may be attached again
    /// under a new name); one that had lost any tag is marked DEAD for good.
    pub fn detach(&mut self, db: usize, key: &[u8], tags: &mut Tags) {
        if tags.is_empty() {
            return;
        }
        let mut all_attached = true;
        let mut removed = 0;
        let mut emptied: Vec<(u32, Key)> = Vec::new();
        tags.set_refs(|r| {
            if !self.matches(r.slot, r.epoch) {
                all_attached &= r.epoch == PENDING;
                return (r.epoch, r.slot);
            }
            if let Some(slot) = self.slots.get_mut(r.slot as usize) {
                if slot.keys.remove(&self.hash, key) {
                    removed += 1;
                }
                if slot.keys.is_empty() {
                    emptied.push((r.slot, Key::from(r.name)));
                }
            }
            (PENDING, 0)
        });
        if let Some(index) = self.dbs.get_mut(db) {
            index.members = index.members.saturating_sub(removed);
            for (_, name) in &emptied {
                index.by_name.remove(&self.hash, name);
            }
        }
        for (id, _) in emptied {
            self.release(id);
        }
        if !all_attached {
            tags.set_refs(|_| (DEAD, 0));
        }
    }

    /// Invalidates tags in `db`. Returns the sum, over the distinct tags named, of the live entries
    /// indexed under each: an entry carrying two of the tags counts twice. That is O(1) per tag (the size
    /// of each key set), where counting distinct entries would look every key up in the other sets. With
    /// `queue`, the keys are queued for reclaim; otherwise (replicas) the key sets are dropped.
    pub fn invalidate(&mut self, db: usize, tags: &[&[u8]], queue: bool) -> usize {
        self.db_mut(db);
        let Some(index) = self.dbs.get_mut(db) else { return 0 };
        let ids: Vec<u32> = tags.iter().filter_map(|t| index.by_name.remove(&self.hash, t)).map(|(_, id)| id).collect();
        let taken: Vec<KeySet> = ids.into_iter().map(|id| self.release(id)).collect();
        let count: usize = taken.iter().map(KeySet::len).sum();
        let Some(index) = self.dbs.get_mut(db) else { return count };
        index.members = index.members.saturating_sub(count);
        if queue {
            for set in taken {
                if !set.is_empty() {
                    index.queued += set.len();
                    let n = set.len();
                    index.queue.push_back(Box::new((set.into_iter(), n)));
                }
            }
        } else {
            // One piece of garbage for all the sets: 1024 sets just under BIG each would otherwise be
            // freed here one by one, millions of keys on the main thread.
            self.discard(taken, count);
        }
        count
    }

    /// Queues one key for reclaim (a dead entry found on load).
    pub fn queue_key(&mut self, db: usize, key: &[u8]) {
        self.db_mut(db);
        let Some(index) = self.dbs.get_mut(db) else { return };
        let mut one = KeySet::default();
        one.insert(&self.hash, key);
        index.queued += 1;
        index.queue.push_back(Box::new((one.into_iter(), 1)));
    }

    /// Takes up to `budget` queued keys, oldest invalidation first, as `(db, key)`.
    pub fn take_reclaim(&mut self, budget: usize) -> Vec<(usize, Key)> {
        let mut out = Vec::new();
        let mut spent = Vec::new();
        for (db, index) in self.dbs.iter_mut().enumerate() {
            while out.len() < budget {
                let Some(front) = index.queue.front_mut() else { break };
                match front.0.next() {
                    Some(key) => {
                        index.queued -= 1;
                        out.push((db, key));
                    }
                    None => spent.extend(index.queue.pop_front()),
                }
            }
            // Release exhausted iterators (and their tables) promptly.
            while index.queue.front().is_some_and(|f| f.0.len() == 0) {
                spent.extend(index.queue.pop_front());
            }
        }
        for spent in spent {
            let n = spent.1;
            self.discard(spent, n);
        }
        out
    }

    pub fn reclaim_pending(&self) -> usize {
        self.dbs.iter().map(|d| d.queued).sum()
    }

    fn slot_of(&self, db: usize, tag: &[u8]) -> Option<&Slot> {
        self.dbs.get(db)?.by_name.get(&self.hash, tag).and_then(|&(_, id)| self.slots.get(id as usize))
    }

    /// Live entries carrying `tag` in `db`.
    pub fn tag_count(&self, db: usize, tag: &[u8]) -> usize {
        self.slot_of(db, tag).map_or(0, |s| s.keys.len())
    }

    /// Up to `n` keys of live entries carrying `tag` in `db`.
    pub fn tag_keys(&self, db: usize, tag: &[u8], n: usize) -> Vec<&[u8]> {
        self.slot_of(db, tag).map(|s| s.keys.iter().take(n).collect()).unwrap_or_default()
    }

    /// Up to `n` keys of live entries carrying `tag` in `db` for which `keep` holds (TAGKEYS for a user
    /// whose ACL key patterns may hide some of them).
    pub fn tag_keys_where(&self, db: usize, tag: &[u8], n: usize, mut keep: impl FnMut(&[u8]) -> bool) -> Vec<&[u8]> {
        let Some(s) = self.slot_of(db, tag) else {
            return Vec::new();
        };
        s.keys.iter().filter(|k| keep(k)).take(n).collect()
    }

    /// Forgets one database (FLUSHDB) or all of them (`None`, FLUSHALL and full reloads).
    pub fn flush(&mut self, db: Option<usize>) {
        match db {
            Some(db) => {
                let Some(index) = self.dbs.get_mut(db) else { return };
                let old = std::mem::take(index);
                let mut size = old.queued + old.by_name.len();
                let mut sets = Vec::with_capacity(old.by_name.len());
                for &(_, id) in old.by_name.iter() {
                    let set = self.release(id);
                    size += set.len();
                    sets.push(set);
                }
                self.discard((old, sets), size);
            }
            None => {
                let size = self.stats().entries + self.slots.len() + self.reclaim_pending();
                let old = (std::mem::take(&mut self.dbs), std::mem::take(&mut self.slots), std::mem::take(&mut self.free));
                self.discard(old, size);
            }
        }
    }

    /// SWAPDB: the databases trade names and queues; slots (and so entries) are unaffected.
    pub fn swap(&mut self, a: usize, b: usize) {
        self.db_mut(a.max(b));
        self.dbs.swap(a, b);
    }

    pub fn stats(&self) -> IndexStats {
        IndexStats {
            tags: self.dbs.iter().map(|d| d.by_name.len()).sum(),
            entries: self.dbs.iter().map(|d| d.members).sum(),
            reclaim_pending: self.reclaim_pending(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(t: &[&str]) -> TagList {
        TagList::new(&t.iter().map(|s| s.as_bytes()).collect::<Vec<_>>())
    }

    #[test]
    fn an_overwrite_with_the_same_tags_keeps_its_place() {
        let mut r = Registry::new();
        let mut old = tl(&["a", "b"]);
        r.attach(0, b"k", &mut old);
        let before = r.stats();
        let mut new = tl(&["a", "b"]);
        assert!(r.carry_over(&old, &mut new));
        assert_eq!(
            new.refs().map(|x| (x.epoch, x.slot)).collect::<Vec<_>>(),
            old.refs().map(|x| (x.epoch, x.slot)).collect::<Vec<_>>()
        );
        assert!(r.is_valid(&new) && r.stats() == before, "indexed as before, nothing moved");
        assert_eq!(r.invalidate(0, &[b"b"], true), 1);
        assert!(!r.is_valid(&new), "the carried entry is invalidated with its tag");
        // different tags, a different order, or an invalidated old entry: no carry-over
        let mut other = tl(&["b", "a"]);
        assert!(!r.carry_over(&old, &mut other) && other.refs().all(|x| x.epoch == PENDING));
        let mut live = tl(&["a"]);
        r.attach(0, b"j", &mut live);
        let mut fewer = tl(&["a", "c"]);
        assert!(!r.carry_over(&live, &mut fewer));
        let mut again = tl(&["a", "b"]);
        assert!(!r.carry_over(&old, &mut again), "the old entry is no longer valid");
        // the same length but another name (the layouts differ in more than the refs)
        let mut xy = tl(&["x", "y"]);
        r.attach(0, b"i", &mut xy);
        let mut xz = tl(&["x", "z"]);
        assert!(!r.carry_over(&xy, &mut xz) && xz.refs().all(|x| x.epoch == PENDING));
        assert_eq!(xz.iter().collect::<Vec<_>>(), [b"x", b"z"]);
    }

    #[test]
    fn attach_then_invalidate_makes_entries_invalid_at_once() {
        let mut r = Registry::new();
        let mut a = tl(&["user:1", "org:7"]);
        let mut b = tl(&["user:1"]);
        let mut c = tl(&["org:7"]);
        assert!(!r.is_valid(&a), "pending is not valid");
        assert!(!r.is_dead(&a), "pending is not dead either");
        assert_eq!(r.attach(0, b"a", &mut a), Attach::Live);
        assert_eq!(r.attach(0, b"b", &mut b), Attach::Live);
        assert_eq!(r.attach(0, b"c", &mut c), Attach::Live);
        assert!(r.is_valid(&a) && r.is_valid(&b) && r.is_valid(&c));
        assert_eq!(r.tag_count(1, b"user:1"), 0, "per database");
        assert_eq!(r.tag_count(0, b"user:1"), 2);
        assert_eq!(r.stats(), IndexStats { tags: 2, entries: 4, reclaim_pending: 0 });

        assert_eq!(r.invalidate(0, &[b"user:1"], true), 2);
        assert!(!r.is_valid(&a) && !r.is_valid(&b));
        assert!(r.is_dead(&a) && r.is_dead(&b));
        assert!(r.is_valid(&c) && !r.is_dead(&c));
        assert_eq!(r.tag_count(0, b"user:1"), 0);
        assert_eq!(r.reclaim_pending(), 2);

        // A new entry with the tag is valid; the old ones never come back.
        let mut d = tl(&["user:1"]);
        assert_eq!(r.attach(0, b"d", &mut d), Attach::Live);
        assert!(r.is_valid(&d));
        assert!(!r.is_valid(&a) && !r.is_valid(&b));

        let mut got: Vec<Vec<u8>> = r
            .take_reclaim(10)
            .into_iter()
            .map(|(db, k)| {
                assert_eq!(db, 0);
                k.to_vec()
            })
            .collect();
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
    fn invalidate_counts_per_tag_and_drains_in_budgets() {
        let mut r = Registry::new();
        let mut lists: Vec<TagList> = (0..10).map(|i| if i % 2 == 0 { tl(&["x", "y"]) } else { tl(&["x"]) }).collect();
        for (i, l) in lists.iter_mut().enumerate() {
            r.attach(0, format!("k{i}").as_bytes(), l);
        }
        // x has 10 entries, y 5 (all also under x): the sum is 15, not the 10 distinct entries.
        assert_eq!(r.invalidate(0, &[b"y", b"x", b"nope", b"x"], true), 15);
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
        assert!(r.is_valid(&a) && r.is_valid(&b));
        assert_eq!(r.tag_keys(1, b"t", 5), vec![&b"a"[..]]);
        r.flush(Some(0));
        assert!(!r.is_valid(&b) && r.is_valid(&a));
        assert_eq!(r.invalidate(1, &[b"t"], false), 1);
        assert_eq!(r.reclaim_pending(), 0, "replicas do not queue");
        r.queue_key(2, b"dead");
        assert_eq!(r.take_reclaim(5), vec![(2, Key::from(&b"dead"[..]))]);
        r.flush(None);
        assert_eq!(r.stats(), IndexStats::default());
        assert!(r.take_garbage().is_empty(), "small structures are freed inline");
    }

    #[test]
    fn work_per_operation_does_not_grow_with_the_index() {
        // 256 tags x 200 entries, each entry under two neighbouring tags, plus one tag on every entry (the
        // namespace tag a client puts on every key): 51,200 keys under one tag.
        let mut r = Registry::new();
        let tags: Vec<Vec<u8>> = (0..256).map(|t| format!("t{t}").into_bytes()).collect();
        let mut lists = Vec::new();
        let mut worst_attach = 0;
        for i in 0..256 * 200usize {
            let (a, b) = (i % 256, (i + 1) % 256);
            let mut l = TagList::new(&[&tags[a][..], &tags[b][..], b"ns"]);
            r.take_steps();
            assert_eq!(r.attach(0, format!("k{i}").as_bytes(), &mut l), Attach::Live);
            worst_attach = worst_attach.max(r.take_steps());
            lists.push(l);
        }
        assert!(worst_attach <= 3 * 64, "one attach of 3 tags touched {worst_attach} elements");
        assert_eq!(r.tag_count(0, b"ns"), 256 * 200);
        let sum: usize = tags.iter().map(|t| r.tag_count(0, t)).sum();
        assert_eq!(sum, 2 * 256 * 200, "each entry is under two of the 256 tags");

        // One INVALIDATE of all 256 tags: the reply is the per-tag sum (each entry twice), and the work is
        // a few name lookups per tag, not a walk over the 102,400 keys.
        let names: Vec<&[u8]> = tags.iter().map(|t| &t[..]).collect();
        r.take_steps();
        assert_eq!(r.invalidate(0, &names, true), 2 * 256 * 200);
        let steps = r.take_steps();
        assert!(steps <= 32 * 256, "INVALIDATE of 256 tags touched {steps} elements");
        assert!(lists.iter().all(|l| !r.is_valid(l)));
        assert_eq!(r.reclaim_pending(), 2 * 256 * 200);

        // Detaching an entry from the giant set is as cheap as from a small one.
        let mut worst_detach = 0;
        for (i, l) in lists.iter_mut().enumerate().take(1000) {
            r.take_steps();
            r.detach(0, format!("k{i}").as_bytes(), l);
            worst_detach = worst_detach.max(r.take_steps());
        }
        assert!(worst_detach <= 3 * 96, "one detach touched {worst_detach} elements");
        assert_eq!(r.tag_count(0, b"ns"), 256 * 200 - 1000);
    }

    #[test]
    fn big_structures_become_garbage() {
        let mut r = Registry::new();
        let mut lists: Vec<TagList> = (0..BIG + 10).map(|_| tl(&["t"])).collect();
        for (i, l) in lists.iter_mut().enumerate() {
            r.attach(0, format!("k{i}").as_bytes(), l);
        }
        assert_eq!(r.invalidate(0, &[b"t"], false), BIG + 10);
        assert_eq!(r.take_garbage().len(), 1, "a replica's dropped key set");
        for (i, l) in lists.iter_mut().enumerate() {
            *l = tl(&["u"]);
            r.attach(0, format!("k{i}").as_bytes(), l);
        }
        r.invalidate(0, &[b"u"], true);
        while !r.take_reclaim(1000).is_empty() {}
        assert_eq!(r.take_garbage().len(), 1, "the drained reclaim table");
    }

    #[test]
    fn a_replica_frees_many_mid_sized_sets_off_the_main_thread() {
        // 3 tags of BIG / 2 keys each: none is big, together they are.
        let mut r = Registry::new();
        let mut lists = Vec::new();
        for i in 0..(3 * BIG / 2) {
            let mut l = TagList::new(&[format!("t{}", i % 3).as_bytes()]);
            r.attach(0, format!("k{i}").as_bytes(), &mut l);
            lists.push(l);
        }
        assert_eq!(r.invalidate(0, &[b"t0", b"t1", b"t2"], false), 3 * BIG / 2);
        assert_eq!(r.take_garbage().len(), 1, "the three sets, as one piece of garbage");
        assert_eq!(r.invalidate(0, &[b"t0"], false), 0);
        assert!(r.take_garbage().is_empty());
    }
}
