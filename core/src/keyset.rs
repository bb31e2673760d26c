//! The key set of one tag: the names of the live entries that carry it, packed.
//!
//! Same linear hashing as [`LinTable`](crate::lintable::LinTable) (grown and shrunk one bucket at a time,
//! so no operation's cost grows with the set), but a bucket is one byte buffer of length-prefixed key
//! names instead of a slice of boxed names. A 10-byte key costs 11 bytes in its bucket plus its share of
//! the bucket's allocation, instead of a 16-byte pointer, a separate allocation rounded up to 16 bytes and
//! the bucket's share: about 15 bytes per (tag, key) instead of about 37, the largest cost of a tagged
//! entry after the value itself.
//!
//! Buckets hold up to [`PACKED_LOAD`] keys on average: a lookup compares a handful of short names in one
//! cache line or two, which costs less than the pointer chase of a boxed name.

use crate::lintable::{bucket_of, buddy_of, ChunkVec, Hashing};

/// Average keys per bucket above which the next bucket is split; below half of it, the last one is merged.
pub const PACKED_LOAD: usize = 8;

/// Records of one bucket: `varint(len) name` repeated.
type Bucket = Box<[u8]>;

#[derive(Debug, Default)]
pub struct KeySet {
    /// Bucket 0.
    head: Bucket,
    /// Buckets 1 and up: bucket `i` is `buckets[i - 1]`.
    buckets: ChunkVec<Bucket>,
    len: usize,
}

fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The records of a bucket, as `(start, end)` of each record and its name: `buf[start..end]` is the whole
/// record. A truncated record (which `KeySet` never writes) ends the walk.
struct Records<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = (usize, usize, &'a [u8]);
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let start = self.at;
        let mut len: usize = 0;
        let mut i = start;
        loop {
            let b = *self.buf.get(i)?;
            len |= ((b & 0x7f) as usize).checked_shl(7 * (i - start) as u32)?;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let end = i.checked_add(len)?;
        let name = self.buf.get(i..end)?;
        self.at = end;
        Some((start, end, name))
    }
}

#[inline]
fn records(buf: &[u8]) -> Records<'_> {
    Records { buf, at: 0 }
}

impl KeySet {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Buckets in use: always at least one (an empty bucket 0 allocates nothing).
    pub fn buckets(&self) -> usize {
        1 + self.buckets.len()
    }

    #[inline]
    fn bucket(&self, i: usize) -> Option<&Bucket> {
        if i == 0 {
            Some(&self.head)
        } else {
            self.buckets.get(i - 1)
        }
    }

    #[inline]
    fn bucket_mut(&mut self, i: usize) -> Option<&mut Bucket> {
        if i == 0 {
            Some(&mut self.head)
        } else {
            self.buckets.get_mut(i - 1)
        }
    }

    /// The bucket `key` belongs in and, when present, the byte range of its record.
    fn find(&self, h: &Hashing, key: &[u8]) -> (usize, Option<(usize, usize)>) {
        let b = bucket_of(h.hash(key), self.buckets());
        let Some(bucket) = self.bucket(b) else { return (b, None) };
        let mut seen = 0;
        let mut found = None;
        for (start, end, name) in records(bucket) {
            seen += 1;
            if name == key {
                found = Some((start, end));
                break;
            }
        }
        h.step(seen);
        (b, found)
    }

    pub fn contains(&self, h: &Hashing, key: &[u8]) -> bool {
        self.len > 0 && self.find(h, key).1.is_some()
    }

    /// Adds `key`; false when it was there already.
    pub fn insert(&mut self, h: &Hashing, key: &[u8]) -> bool {
        let (b, found) = self.find(h, key);
        if found.is_some() {
            return false;
        }
        let Some(bucket) = self.bucket_mut(b) else { return false };
        let mut v = std::mem::take(bucket).into_vec();
        v.reserve_exact(key.len() + 2);
        put_varint(&mut v, key.len());
        v.extend_from_slice(key);
        *bucket = v.into_boxed_slice();
        self.len += 1;
        if self.len > PACKED_LOAD * self.buckets() {
            self.split(h);
        }
        true
    }

    /// Removes `key`; false when it was not there.
    pub fn remove(&mut self, h: &Hashing, key: &[u8]) -> bool {
        if self.len == 0 {
            return false;
        }
        let (b, Some((start, end))) = self.find(h, key) else { return false };
        let Some(bucket) = self.bucket_mut(b) else { return false };
        let mut v = std::mem::take(bucket).into_vec();
        v.drain(start..end);
        *bucket = v.into_boxed_slice();
        self.len -= 1;
        if self.len == 0 {
            // At most a couple of empty buckets are left: free them now.
            *self = KeySet::default();
        } else if self.buckets() > 1 && self.len * 2 < PACKED_LOAD * self.buckets() {
            self.merge(h);
        }
        true
    }

    /// Adds bucket `j` (the current count) and moves into it the keys of its buddy that now belong to it.
    fn split(&mut self, h: &Hashing) {
        let j = self.buckets();
        let n = j + 1;
        let from = buddy_of(j);
        let Some(bucket) = self.bucket_mut(from) else { return };
        let old = std::mem::take(bucket);
        let (mut stay, mut go) = (Vec::with_capacity(old.len()), Vec::new());
        let mut moved = 0;
        for (start, end, name) in records(&old) {
            moved += 1;
            let out = if bucket_of(h.hash(name), n) == from { &mut stay } else { &mut go };
            out.extend_from_slice(&old[start..end]);
        }
        h.step(moved);
        if let Some(bucket) = self.bucket_mut(from) {
            *bucket = stay.into_boxed_slice();
        }
        self.buckets.push(go.into_boxed_slice());
    }

    /// Removes the last bucket and appends its keys to its buddy.
    fn merge(&mut self, h: &Hashing) {
        let Some(last) = self.buckets.pop() else { return };
        let into = buddy_of(self.buckets());
        let Some(bucket) = self.bucket_mut(into) else { return };
        h.step(records(&last).count() + records(bucket).count());
        if !last.is_empty() {
            let mut v = std::mem::take(bucket).into_vec();
            v.extend_from_slice(&last);
            *bucket = v.into_boxed_slice();
        }
    }

    /// Every key, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.head).chain(self.buckets.iter()).flat_map(|b| records(b).map(|(_, _, name)| name))
    }
}

impl IntoIterator for KeySet {
    type Item = Box<[u8]>;
    type IntoIter = KeyDrain;
    fn into_iter(self) -> KeyDrain {
        KeyDrain { set: self, current: Box::default(), at: 0 }
    }
}

/// Takes a set's keys one at a time, freeing each bucket (and each emptied chunk) as it goes, so that
/// draining a large set a few keys at a time never frees much at once.
#[derive(Debug)]
pub struct KeyDrain {
    set: KeySet,
    current: Bucket,
    at: usize,
}

impl Iterator for KeyDrain {
    type Item = Box<[u8]>;
    fn next(&mut self) -> Option<Box<[u8]>> {
        loop {
            if let Some((_, end, name)) = (Records { buf: &self.current, at: self.at }).next() {
                self.at = end;
                self.set.len = self.set.len.saturating_sub(1);
                return Some(Box::from(name));
            }
            self.at = 0;
            self.current = match self.set.buckets.pop() {
                Some(b) => b,
                None if !self.set.head.is_empty() => std::mem::take(&mut self.set.head),
                None => {
                    self.current = Box::default();
                    return None;
                }
            };
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.set.len, Some(self.set.len))
    }
}

impl ExactSizeIterator for KeyDrain {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn key(i: u64) -> Vec<u8> {
        format!("key:{i}").into_bytes()
    }

    /// Every key sits in the bucket its hash names, the count is right and the load within bounds.
    fn check(s: &KeySet, h: &Hashing) {
        let n = s.buckets();
        let mut count = 0;
        for i in 0..n {
            let b = s.bucket(i).unwrap();
            let mut end = 0;
            for (_, e, name) in records(b) {
                assert_eq!(bucket_of(h.hash(name), n), i, "key in the wrong bucket");
                count += 1;
                end = e;
            }
            assert_eq!(end, b.len(), "bucket bytes are exactly its records");
        }
        assert_eq!(count, s.len());
        assert_eq!(s.iter().count(), s.len());
        assert!(s.len() <= PACKED_LOAD * n.max(1), "over the load limit: {} in {n}", s.len());
        assert!(s.is_empty() || n == 1 || s.len() * 2 >= PACKED_LOAD * (n - 1), "under the load limit");
    }

    #[test]
    fn inserts_and_removes_like_a_set() {
        let h = Hashing::with_seed(7);
        let mut s = KeySet::new();
        let mut model = HashSet::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = key(x % 3000);
            if round % 3 == 2 {
                assert_eq!(s.remove(&h, &k), model.remove(&k));
            } else {
                assert_eq!(s.insert(&h, &k), model.insert(k.clone()));
            }
            assert_eq!(s.contains(&h, &k), model.contains(&k));
            if round % 997 == 0 {
                check(&s, &h);
            }
        }
        check(&s, &h);
        let got: HashSet<Vec<u8>> = s.iter().map(|k| k.to_vec()).collect();
        assert_eq!(got, model);
        for k in model.iter() {
            assert!(s.remove(&h, k));
        }
        assert!(s.is_empty() && s.buckets() == 1 && s.head.is_empty(), "an emptied set frees its buckets");
    }

    #[test]
    fn binary_safe_and_long_names() {
        let h = Hashing::with_seed(1);
        let mut s = KeySet::new();
        let long = vec![0xffu8; 300]; // a two-byte length prefix
        let names: Vec<Vec<u8>> = vec![b"".to_vec(), b"\0\r\n".to_vec(), long.clone(), vec![0x80, 0x81]];
        for n in &names {
            assert!(s.insert(&h, n));
            assert!(!s.insert(&h, n));
        }
        for n in &names {
            assert!(s.contains(&h, n));
        }
        check(&s, &h);
        let mut drained: Vec<Vec<u8>> = s.into_iter().map(|k| k.to_vec()).collect();
        drained.sort();
        let mut want = names.clone();
        want.sort();
        assert_eq!(drained, want);
    }

    #[test]
    fn drain_yields_every_key_once_and_counts_down() {
        let h = Hashing::with_seed(3);
        let mut s = KeySet::new();
        for i in 0..5000 {
            s.insert(&h, &key(i));
        }
        let mut d = s.into_iter();
        assert_eq!(d.len(), 5000);
        let mut seen = HashSet::new();
        for left in (0..5000).rev() {
            assert!(seen.insert(d.next().unwrap()));
            assert_eq!(d.len(), left);
        }
        assert!(d.next().is_none() && d.next().is_none());
    }

    #[test]
    fn work_per_operation_is_bounded() {
        let h = Hashing::with_seed(9);
        let mut s = KeySet::new();
        let mut worst = 0;
        for i in 0..200_000 {
            h.take_steps();
            s.insert(&h, &key(i));
            worst = worst.max(h.take_steps());
        }
        // A lookup scans one bucket; a split moves one bucket: a few times the load, never the set.
        assert!(worst <= 8 * PACKED_LOAD as u64, "worst insert touched {worst} keys");
    }
}
