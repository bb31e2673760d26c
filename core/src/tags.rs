//! A compact, binary-safe list of distinct tags with the epoch each tag had when the entry was attached
//! to the tag index: one allocation holding, per tag, an 8-byte epoch and a LEB128 length-prefixed name;
//! none at all for an untagged entry.
//!
//! Epoch values: [`PENDING`] (not attached yet: just written or loaded), [`DEAD`] (invalidated before it
//! was persisted), anything else is the epoch of the tag's slot at attach time (see `index`).

/// Not attached to the index yet.
pub const PENDING: u64 = 0;
/// Invalidated: never valid again.
pub const DEAD: u64 = u64::MAX;

const EPOCH_LEN: usize = 8;

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

impl TagList {
    pub const EMPTY: TagList = TagList(None);

    /// Builds a list from tags (all [`PENDING`]), dropping repeats (the first occurrence keeps its place).
    pub fn new<'a, I: IntoIterator<Item = &'a [u8]>>(tags: I) -> Self {
        let mut buf = Vec::new();
        let mut seen: Vec<&[u8]> = Vec::new();
        for tag in tags {
            if seen.contains(&tag) {
                continue;
            }
            seen.push(tag);
            buf.extend_from_slice(&PENDING.to_le_bytes());
            put_varint(&mut buf, tag.len());
            buf.extend_from_slice(tag);
        }
        if seen.is_empty() {
            TagList(None)
        } else {
            TagList(Some(buf.into_boxed_slice()))
        }
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Tag names.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.with_epochs().map(|(_, t)| t)
    }

    /// `(epoch, name)` pairs.
    #[inline]
    pub fn with_epochs(&self) -> TagIter<'_> {
        TagIter { buf: self.0.as_deref().unwrap_or(&[]) }
    }

    pub fn contains(&self, tag: &[u8]) -> bool {
        self.iter().any(|t| t == tag)
    }

    /// Sets every tag's epoch to `f(name, old epoch)`.
    pub fn set_epochs(&mut self, mut f: impl FnMut(&[u8], u64) -> u64) {
        let Some(buf) = self.0.as_deref_mut() else { return };
        let mut at = 0;
        while at + EPOCH_LEN < buf.len() {
            let Some((len, n)) = get_varint(&buf[at + EPOCH_LEN..]) else { return };
            let name_at = at + EPOCH_LEN + n;
            let Some(end) = name_at.checked_add(len).filter(|&e| e <= buf.len()) else { return };
            let mut epoch = [0u8; EPOCH_LEN];
            epoch.copy_from_slice(&buf[at..at + EPOCH_LEN]);
            let new = f(&buf[name_at..end], u64::from_le_bytes(epoch));
            buf[at..at + EPOCH_LEN].copy_from_slice(&new.to_le_bytes());
            at = end;
        }
    }

    /// Heap bytes held by the list.
    pub fn heap_size(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.len())
    }
}

/// Iterates over the `(epoch, name)` pairs of a [`TagList`].
pub struct TagIter<'a> {
    buf: &'a [u8],
}

impl<'a> Iterator for TagIter<'a> {
    type Item = (u64, &'a [u8]);
    #[inline]
    fn next(&mut self) -> Option<(u64, &'a [u8])> {
        let epoch: [u8; EPOCH_LEN] = self.buf.get(..EPOCH_LEN)?.try_into().ok()?;
        let (len, n) = get_varint(&self.buf[EPOCH_LEN..])?;
        let rest = &self.buf[EPOCH_LEN + n..];
        let tag = rest.get(..len)?;
        self.buf = &rest[len..];
        Some((u64::from_le_bytes(epoch), tag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_drops_repeats_and_is_binary_safe() {
        let long = vec![b'x'; 300];
        let tags: Vec<&[u8]> = vec![b"user:42", b"a\0b", b"user:42", &long, b"\xff"];
        let list = TagList::new(tags);
        let got: Vec<&[u8]> = list.iter().collect();
        assert_eq!(got, vec![&b"user:42"[..], b"a\0b", &long[..], b"\xff"]);
        assert_eq!(list.len(), 4);
        assert!(list.contains(b"a\0b"));
        assert!(!list.contains(b"a"));
        assert!(list.with_epochs().all(|(e, _)| e == PENDING));
    }

    #[test]
    fn epochs_are_set_in_place() {
        let mut list = TagList::new([&b"a"[..], b"bb"]);
        list.set_epochs(|name, old| {
            assert_eq!(old, PENDING);
            name.len() as u64 * 10
        });
        let got: Vec<(u64, &[u8])> = list.with_epochs().collect();
        assert_eq!(got, vec![(10, &b"a"[..]), (20, &b"bb"[..])]);
        list.set_epochs(|_, _| DEAD);
        assert!(list.with_epochs().all(|(e, _)| e == DEAD));
    }

    #[test]
    fn empty_list_allocates_nothing() {
        let list = TagList::new(std::iter::empty());
        assert!(list.is_empty());
        assert_eq!(list.len(), 0);
        assert_eq!(list.heap_size(), 0);
        assert_eq!(list, TagList::EMPTY);
    }
}
