//! A compact, binary-safe list of distinct tags: one allocation holding LEB128 length-prefixed tags,
//! none at all for an untagged entry.

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

fn get_varint(buf: &[u8]) -> Option<(usize, &[u8])> {
    let mut v: usize = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        v |= ((b & 0x7f) as usize).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((v, &buf[i + 1..]));
        }
    }
    None
}

impl TagList {
    pub const EMPTY: TagList = TagList(None);

    /// Builds a list from tags, dropping repeats (the first occurrence keeps its place).
    pub fn new<'a, I: IntoIterator<Item = &'a [u8]>>(tags: I) -> Self {
        let mut buf = Vec::new();
        let mut seen: Vec<&[u8]> = Vec::new();
        for tag in tags {
            if seen.contains(&tag) {
                continue;
            }
            seen.push(tag);
            put_varint(&mut buf, tag.len());
            buf.extend_from_slice(tag);
        }
        if buf.is_empty() && seen.is_empty() {
            TagList(None)
        } else {
            TagList(Some(buf.into_boxed_slice()))
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn iter(&self) -> TagIter<'_> {
        TagIter(self.0.as_deref().unwrap_or(&[]))
    }

    pub fn contains(&self, tag: &[u8]) -> bool {
        self.iter().any(|t| t == tag)
    }

    /// Heap bytes held by the list.
    pub fn heap_size(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.len())
    }
}

/// Iterates over the tags of a [`TagList`].
pub struct TagIter<'a>(&'a [u8]);

impl<'a> Iterator for TagIter<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = get_varint(self.0)?;
        let tag = rest.get(..len)?;
        self.0 = &rest[len..];
        Some(tag)
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
