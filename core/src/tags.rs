//! A compact, binary-safe list of distinct tags, each with the index slot and epoch it was attached
//! under: one allocation holding, per tag, an 8-byte epoch, a 4-byte slot number and a LEB128
//! length-prefixed name; none at all for an untagged entry.
//!
//! Epoch values: [`PENDING`] (not attached yet: just written or loaded), [`DEAD`] (invalidated before it
//! was persisted), anything else is the epoch of the tag's slot at attach time (see `index`). Keeping the
//! slot number lets the read path check a tag with one array lookup instead of hashing its name.

/// Not attached to the index yet.
pub const PENDING: u64 = 0;
/// Invalidated: never valid again.
pub const DEAD: u64 = u64::MAX;

const EPOCH_LEN: usize = 8;
const SLOT_LEN: usize = 4;
const HEAD: usize = EPOCH_LEN + SLOT_LEN;
/// Up to this many tags, repeats are found by scanning the tags before each one (cheaper than hashing
/// for the few tags an entry usually has); above it, with a hash set.
const LINEAR_DEDUP_MAX: usize = 16;

/// The tags of one entry, in the order first given, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct TagList(Option<Box<[u8]>>);

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

fn varint_len(v: usize) -> usize {
    (usize::BITS - (v | 1).leading_zeros()).div_ceil(7) as usize
}

fn get_varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut v: usize = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= ((b & 0x7f) as usize).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// A tag list in place: the bytes of a [`TagList`], or the tag section of an entry's single allocation.
/// Everything but building a list works on this view.
#[repr(transparent)]
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Tags([u8]);

impl Tags {
    /// Views bytes laid out by [`TagList::new`] (as copied into an entry). A malformed tail ends
    /// iteration early; it never panics.
    #[inline]
    pub fn from_bytes(b: &[u8]) -> &Tags {
        // SAFETY: Tags is a repr(transparent) wrapper of [u8]: same layout and same slice metadata.
        unsafe { &*(b as *const [u8] as *const Tags) }
    }

    #[inline]
    pub fn from_bytes_mut(b: &mut [u8]) -> &mut Tags {
        // SAFETY: as in `from_bytes`; the exclusive borrow is passed on unchanged.
        unsafe { &mut *(b as *mut [u8] as *mut Tags) }
    }

    /// The list's bytes, as [`TagList::new`] lays them out.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Tag names.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.refs().map(|r| r.name)
    }

    /// `(epoch, name)` pairs.
    pub fn with_epochs(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.refs().map(|r| (r.epoch, r.name))
    }

    /// Every tag with its slot and epoch.
    #[inline]
    pub fn refs(&self) -> TagIter<'_> {
        TagIter { buf: &self.0 }
    }

    pub fn contains(&self, tag: &[u8]) -> bool {
        self.iter().any(|t| t == tag)
    }

    /// Sets every tag's epoch to `f(name, old epoch)`, keeping its slot.
    pub fn set_epochs(&mut self, mut f: impl FnMut(&[u8], u64) -> u64) {
        self.set_refs(|r| (f(r.name, r.epoch), r.slot));
    }

    /// Takes `other`'s slots and epochs. The two hold the same names in the same order (checked by the
    /// caller), so their bytes differ only there: a copy of the whole layout does it. Lists of different
    /// lengths are left alone.
    pub fn take_refs_of(&mut self, other: &Tags) {
        if self.0.len() == other.0.len() {
            self.0.copy_from_slice(&other.0);
        }
    }

    /// Sets every tag's `(epoch, slot)` to `f(current)`.
    pub fn set_refs(&mut self, mut f: impl FnMut(TagRef<'_>) -> (u64, u32)) {
        let buf = &mut self.0;
        let mut at = 0;
        while at + HEAD < buf.len() {
            let Some((len, n)) = get_varint(&buf[at + HEAD..]) else { return };
            let name_at = at + HEAD + n;
            let Some(end) = name_at.checked_add(len).filter(|&e| e <= buf.len()) else { return };
            let (head, rest) = buf[at..].split_at_mut(HEAD);
            let name = &rest[n..n + len];
            let r = TagRef { epoch: read_u64(&head[..EPOCH_LEN]), slot: read_u32(&head[EPOCH_LEN..]), name };
            let (epoch, slot) = f(r);
            head[..EPOCH_LEN].copy_from_slice(&epoch.to_le_bytes());
            head[EPOCH_LEN..].copy_from_slice(&slot.to_le_bytes());
            at = end;
        }
    }
}

impl TagList {
    pub const EMPTY: TagList = TagList(None);

    /// Builds a list from tags (all [`PENDING`]), dropping repeats (the first occurrence keeps its place).
    /// One exact-size allocation; none for no tags.
    ///
    /// Repeats are found in O(n) expected time (a hash set above [`LINEAR_DEDUP_MAX`] tags, a scan of
    /// the few before each tag below it), so a long list costs no more to load than to read.
    pub fn new(tags: &[&[u8]]) -> Self {
        if tags.is_empty() {
            return TagList(None);
        }
        let encoded = Encoder::new(tags);
        let mut buf = Vec::with_capacity(encoded.len());
        encoded.write(&mut buf);
        TagList(Some(buf.into_boxed_slice()))
    }

    /// An owned copy of a list in place.
    pub fn from_tags(tags: &Tags) -> Self {
        if tags.is_empty() {
            TagList(None)
        } else {
            TagList(Some(Box::from(tags.as_bytes())))
        }
    }

    /// Heap bytes held by the list.
    pub fn heap_size(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.len())
    }
}

/// Tag names laid out as a list's bytes (all [`PENDING`], repeats dropped), written straight into a
/// caller's buffer (an entry's single allocation) without building a [`TagList`] first.
pub struct Encoder<'a> {
    tags: &'a [&'a [u8]],
    /// For up to [`LINEAR_DEDUP_MAX`] tags: bit `i` set when tag `i` repeats an earlier one.
    repeats: u16,
    /// Above it: which tags to keep.
    keep: Option<Vec<bool>>,
    len: usize,
}

impl<'a> Encoder<'a> {
    /// Repeats are found in O(n) expected time (a hash set above [`LINEAR_DEDUP_MAX`] tags, a scan of the
    /// few before each tag below it, with no allocation).
    #[inline]
    pub fn new(tags: &'a [&'a [u8]]) -> Self {
        if tags.is_empty() {
            return Encoder { tags, repeats: 0, keep: None, len: 0 };
        }
        Self::of(tags)
    }

    fn of(tags: &'a [&'a [u8]]) -> Self {
        let (repeats, keep) = if tags.len() <= LINEAR_DEDUP_MAX {
            let mask = (0..tags.len()).filter(|&i| tags[..i].contains(&tags[i])).fold(0u16, |m, i| m | (1 << i));
            (mask, None)
        } else {
            let mut seen = ahash::AHashSet::with_capacity(tags.len());
            (0, Some(tags.iter().map(|t| seen.insert(*t)).collect()))
        };
        let mut e = Encoder { tags, repeats, keep, len: 0 };
        e.len = e.kept().map(|t| HEAD + varint_len(t.len()) + t.len()).sum();
        e
    }

    fn kept(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.tags.iter().enumerate().filter(|&(i, _)| self.keeps(i)).map(|(_, t)| *t)
    }

    #[inline]
    fn keeps(&self, i: usize) -> bool {
        match &self.keep {
            Some(keep) => keep.get(i).copied().unwrap_or(false),
            None => self.repeats & (1 << i) == 0,
        }
    }

    /// Bytes the list takes.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tags kept (without repeats).
    pub fn count(&self) -> usize {
        self.kept().count()
    }

    /// Appends the list's bytes to `out`.
    #[inline]
    pub fn write(&self, out: &mut Vec<u8>) {
        if self.len != 0 {
            self.write_kept(out);
        }
    }

    fn write_kept(&self, out: &mut Vec<u8>) {
        for t in self.kept() {
            out.extend_from_slice(&PENDING.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            put_varint(out, t.len());
            out.extend_from_slice(t);
        }
    }
}

impl std::ops::Deref for TagList {
    type Target = Tags;
    #[inline]
    fn deref(&self) -> &Tags {
        Tags::from_bytes(self.0.as_deref().unwrap_or(&[]))
    }
}

impl std::ops::DerefMut for TagList {
    #[inline]
    fn deref_mut(&mut self) -> &mut Tags {
        match self.0.as_deref_mut() {
            Some(b) => Tags::from_bytes_mut(b),
            None => Tags::from_bytes_mut(&mut []),
        }
    }
}

#[inline]
fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[inline]
fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// One tag of a list: its name and the slot and epoch it was attached under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagRef<'a> {
    pub epoch: u64,
    pub slot: u32,
    pub name: &'a [u8],
}

/// Iterates over the tags of a [`TagList`].
pub struct TagIter<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for TagIter<'a> {
    type Item = TagRef<'a>;
    #[inline]
    fn next(&mut self) -> Option<TagRef<'a>> {
        let head = self.buf.get(..HEAD)?;
        let (len, n) = get_varint(&self.buf[HEAD..])?;
        let rest = &self.buf[HEAD + n..];
        let name = rest.get(..len)?;
        let r = TagRef { epoch: read_u64(&head[..EPOCH_LEN]), slot: read_u32(&head[EPOCH_LEN..]), name };
        self.buf = &rest[len..];
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_drops_repeats_and_is_binary_safe() {
        let long = vec![b'x'; 300];
        let tags: Vec<&[u8]> = vec![b"user:42", b"a\0b", b"user:42", &long, b"\xff"];
        let list = TagList::new(&tags);
        let got: Vec<&[u8]> = list.iter().collect();
        assert_eq!(got, vec![&b"user:42"[..], b"a\0b", &long[..], b"\xff"]);
        assert_eq!(list.len(), 4);
        assert!(list.contains(b"a\0b"));
        assert!(!list.contains(b"a"));
        assert!(list.with_epochs().all(|(e, _)| e == PENDING));
    }

    #[test]
    fn long_lists_drop_repeats_like_short_ones() {
        let names: Vec<Vec<u8>> = (0..70_000).map(|i| format!("t{}", i % 50_000).into_bytes()).collect();
        let tags: Vec<&[u8]> = names.iter().map(Vec::as_slice).collect();
        let list = TagList::new(&tags);
        assert_eq!(list.len(), 50_000);
        assert!(list.iter().zip(&tags).all(|(a, b)| a == *b), "first occurrences, in order");
        let short: Vec<&[u8]> = vec![b"a", b"b", b"a", b"c", b"b"];
        for n in [LINEAR_DEDUP_MAX, LINEAR_DEDUP_MAX + 1] {
            let many: Vec<&[u8]> = short.iter().cycle().take(n).copied().collect();
            assert_eq!(TagList::new(&many).iter().collect::<Vec<_>>(), vec![&b"a"[..], b"b", b"c"], "{n} tags");
        }
    }

    #[test]
    fn epochs_are_set_in_place() {
        let mut list = TagList::new(&[&b"a"[..], b"bb"]);
        list.set_epochs(|name, old| {
            assert_eq!(old, PENDING);
            name.len() as u64 * 10
        });
        let got: Vec<(u64, &[u8])> = list.with_epochs().collect();
        assert_eq!(got, vec![(10, &b"a"[..]), (20, &b"bb"[..])]);
        list.set_refs(|r| (r.epoch + 1, r.name.len() as u32 + 100));
        let got: Vec<(u64, u32)> = list.refs().map(|r| (r.epoch, r.slot)).collect();
        assert_eq!(got, vec![(11, 101), (21, 102)]);
        list.set_epochs(|_, _| DEAD);
        assert!(list.with_epochs().all(|(e, _)| e == DEAD));
    }

    #[test]
    fn varint_lengths() {
        for (v, n) in [(0, 1), (1, 1), (127, 1), (128, 2), (16383, 2), (16384, 3)] {
            assert_eq!(varint_len(v), n, "{v}");
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), n);
        }
    }

    #[test]
    fn empty_list_allocates_nothing() {
        let list = TagList::new(&[]);
        assert!(list.is_empty());
        assert_eq!(list.len(), 0);
        assert_eq!(list.heap_size(), 0);
        assert_eq!(list, TagList::EMPTY);
    }
}
