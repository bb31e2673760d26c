//! The entry's persistence layout, written through Redis's own RDB primitives (unsigned, signed and
//! string-buffer fields) behind an encoding version. The module maps [`Sink`] and [`Source`] onto
//! `RedisModule_Save*` / `RedisModule_Load*`; tests map them onto a vector.
//!
//! Encoding version 2, in order (version 1, written before tags could be invalidated, is the same
//! without field 7 and still loads):
//! 1. unsigned: encoding (0 raw, 1 lz4)
//! 2. signed: fresh deadline, unix ms, or -1 for none
//! 3. signed: creation time, unix ms
//! 4. unsigned: original size in bytes
//! 5. string: the stored bytes
//! 6. unsigned: number of tags, then one string per tag
//! 7. unsigned: flags; bit 0 = invalidated (a tag was invalidated before the save: the entry is loaded
//!    dead, answers nil and is queued for reclaim, so a restart never undoes an invalidation)
//!
//! The key's own TTL (the end of the stale window) is saved by Redis with the key.

use std::fmt;

use crate::entry::{Encoding, Entry, NO_DEADLINE};
use crate::lz4;
use crate::tags::{TagList, DEAD};

/// The encoding version written today.
pub const ENCODING_VERSION: i32 = 2;
/// At most this many tags are read back, whatever the payload claims: the upper bound of
/// `tiercache.max-tags`, which no `TIERCACHE.SET` can exceed. A SET replayed from a master or the AOF
/// ignores the local `max-tags` but not this bound, so a load and a replay accept the same entries.
pub const MAX_PERSISTED_TAGS: u64 = 1024;

/// Where fields are written.
pub trait Sink {
    fn put_unsigned(&mut self, v: u64);
    fn put_signed(&mut self, v: i64);
    fn put_bytes(&mut self, v: &[u8]);
}

/// Where fields are read from. Every read may fail (truncated or corrupt payload).
pub trait Source {
    fn get_unsigned(&mut self) -> Result<u64, LoadError>;
    fn get_signed(&mut self) -> Result<i64, LoadError>;
    fn get_bytes(&mut self) -> Result<Vec<u8>, LoadError>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The payload ended early or a primitive read failed.
    Io,
    /// Written by a newer tiercache.
    UnknownVersion(i32),
    /// Fields that cannot belong to a valid entry.
    Invalid(&'static str),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Io => f.write_str("truncated or unreadable entry"),
            LoadError::UnknownVersion(v) => write!(f, "unknown tiercache encoding version {v}"),
            LoadError::Invalid(what) => write!(f, "invalid entry: {what}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Flag bit: the entry had been invalidated.
pub const FLAG_INVALIDATED: u64 = 1;

/// Writes `entry` in the current encoding version; `invalidated` says whether one of its tags was
/// invalidated (the index knows, the entry alone does not).
pub fn save(entry: &Entry, invalidated: bool, out: &mut impl Sink) {
    out.put_unsigned(entry.encoding() as u64);
    out.put_signed(entry.fresh_until());
    out.put_signed(entry.created());
    out.put_unsigned(entry.size() as u64);
    out.put_bytes(entry.stored());
    let tags = entry.tags();
    out.put_unsigned(tags.len() as u64);
    for tag in tags.iter() {
        out.put_bytes(tag);
    }
    out.put_unsigned(if invalidated { FLAG_INVALIDATED } else { 0 });
}

/// Reads an entry written with encoding version `version`.
///
/// Only entries that `TIERCACHE.SET` could have written are accepted, so that whatever a load (RDB,
/// RESTORE, full sync) accepts, the AOF form of it (a replayed SET) accepts too: a known encoding, no
/// fresh deadline or a positive one, a creation time of 0 or more, a decoded size of at most
/// [`lz4::MAX_ORIGINAL_LEN`], an lz4 frame that decodes to exactly its announced size, at most
/// [`MAX_PERSISTED_TAGS`] tags and no empty tag.
pub fn load(src: &mut impl Source, version: i32) -> Result<Box<Entry>, LoadError> {
    if !(1..=ENCODING_VERSION).contains(&version) {
        return Err(LoadError::UnknownVersion(version));
    }
    let encoding = Encoding::from_code(src.get_unsigned()?).ok_or(LoadError::Invalid("encoding"))?;
    let fresh_until = src.get_signed()?;
    if fresh_until != NO_DEADLINE && fresh_until <= 0 {
        return Err(LoadError::Invalid("fresh deadline"));
    }
    let created = src.get_signed()?;
    if created < 0 {
        return Err(LoadError::Invalid("creation time"));
    }
    let size = usize::try_from(src.get_unsigned()?).map_err(|_| LoadError::Invalid("size"))?;
    if size > lz4::MAX_ORIGINAL_LEN {
        return Err(LoadError::Invalid("size"));
    }
    let data = src.get_bytes()?;
    if encoding == Encoding::Lz4 && lz4::check(&data) != Ok(size) {
        return Err(LoadError::Invalid("lz4 frame"));
    }
    let ntags = src.get_unsigned()?;
    if ntags > MAX_PERSISTED_TAGS {
        return Err(LoadError::Invalid("tag count"));
    }
    let mut tags = Vec::with_capacity(ntags as usize);
    for _ in 0..ntags {
        let tag = src.get_bytes()?;
        if tag.is_empty() {
            return Err(LoadError::Invalid("empty tag"));
        }
        tags.push(tag);
    }
    let flags = if version >= 2 { src.get_unsigned()? } else { 0 };
    if flags & !FLAG_INVALIDATED != 0 {
        return Err(LoadError::Invalid("flags"));
    }
    let mut tags = TagList::new(&tags.iter().map(Vec::as_slice).collect::<Vec<_>>());
    if flags & FLAG_INVALIDATED != 0 {
        tags.set_epochs(|_, _| DEAD);
    }
    Entry::from_parts(&data, encoding, size, fresh_until, created, &tags).map_err(|_| LoadError::Invalid("stored bytes"))
}

/// An in-memory field stream, for tests and for tools.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Field {
    #[default]
    None,
    Unsigned(u64),
    Signed(i64),
    Bytes(Vec<u8>),
}

impl Sink for Vec<Field> {
    fn put_unsigned(&mut self, v: u64) {
        self.push(Field::Unsigned(v));
    }
    fn put_signed(&mut self, v: i64) {
        self.push(Field::Signed(v));
    }
    fn put_bytes(&mut self, v: &[u8]) {
        self.push(Field::Bytes(v.to_vec()));
    }
}

impl Source for std::vec::IntoIter<Field> {
    fn get_unsigned(&mut self) -> Result<u64, LoadError> {
        match self.next() {
            Some(Field::Unsigned(v)) => Ok(v),
            _ => Err(LoadError::Io),
        }
    }
    fn get_signed(&mut self) -> Result<i64, LoadError> {
        match self.next() {
            Some(Field::Signed(v)) => Ok(v),
            _ => Err(LoadError::Io),
        }
    }
    fn get_bytes(&mut self) -> Result<Vec<u8>, LoadError> {
        match self.next() {
            Some(Field::Bytes(v)) => Ok(v),
            _ => Err(LoadError::Io),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Storage;

    fn sample(value: &[u8], tags: &[&[u8]]) -> Box<Entry> {
        Entry::from_value(value, Storage::Auto { compress_min_size: 64 }, 1_700_000_000_123, 1_699_999_999_000, tags).unwrap()
    }

    #[test]
    fn round_trips_raw_compressed_and_tagged_entries() {
        let big = b"{\"k\":\"value\"}".repeat(100);
        for e in [
            sample(b"", &[]),
            sample(b"small\0binary", &[b"user:1", b"\0\xff"]),
            sample(&big, &[b"t"]),
            Entry::from_value(b"v", Storage::Verbatim(Encoding::Raw), NO_DEADLINE, 5, &[]).unwrap(),
        ] {
            let mut fields: Vec<Field> = Vec::new();
            save(&e, false, &mut fields);
            let back = load(&mut fields.into_iter(), ENCODING_VERSION).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn invalidated_entries_load_dead() {
        let e = sample(b"v", &[b"a", b"b"]);
        let mut fields: Vec<Field> = Vec::new();
        save(&e, true, &mut fields);
        let back = load(&mut fields.into_iter(), ENCODING_VERSION).unwrap();
        assert!(back.tags().with_epochs().all(|(epoch, _)| epoch == DEAD));
        assert_eq!(back.tags().iter().collect::<Vec<_>>(), vec![&b"a"[..], b"b"]);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let e = sample(&b"xyz".repeat(100), &[b"a", b"b"]);
        let mut fields: Vec<Field> = Vec::new();
        save(&e, false, &mut fields);
        for cut in 0..fields.len() {
            let short: Vec<Field> = fields[..cut].to_vec();
            assert!(load(&mut short.into_iter(), ENCODING_VERSION).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn corrupt_fields_are_errors() {
        let e = sample(&b"xyz".repeat(100), &[b"a"]);
        let mut fields: Vec<Field> = Vec::new();
        save(&e, false, &mut fields);
        let mut bad = fields.clone();
        bad[0] = Field::Unsigned(9);
        assert_eq!(load(&mut bad.into_iter(), 2), Err(LoadError::Invalid("encoding")));
        let mut bad = fields.clone();
        bad[3] = Field::Unsigned(1 << 40);
        assert!(load(&mut bad.into_iter(), 2).is_err());
        let mut bad = fields.clone();
        bad[5] = Field::Unsigned(u64::MAX);
        assert_eq!(load(&mut bad.into_iter(), 2), Err(LoadError::Invalid("tag count")));
        let mut bad = fields.clone();
        let last = bad.len() - 1;
        bad[last] = Field::Unsigned(6);
        assert_eq!(load(&mut bad.into_iter(), 2), Err(LoadError::Invalid("flags")));
        assert_eq!(load(&mut fields.clone().into_iter(), 3), Err(LoadError::UnknownVersion(3)));
        assert_eq!(load(&mut fields.into_iter(), 0), Err(LoadError::UnknownVersion(0)));
    }

    #[test]
    fn fields_set_would_refuse_are_errors() {
        let big = b"xyz".repeat(100);
        let e = sample(&big, &[b"a"]);
        assert_eq!(e.encoding(), Encoding::Lz4);
        let mut fields: Vec<Field> = Vec::new();
        save(&e, false, &mut fields);
        let with = |i: usize, f: Field| {
            let mut bad = fields.clone();
            bad[i] = f;
            load(&mut bad.into_iter(), 2)
        };
        assert_eq!(with(1, Field::Signed(0)), Err(LoadError::Invalid("fresh deadline")));
        assert_eq!(with(1, Field::Signed(-2)), Err(LoadError::Invalid("fresh deadline")));
        assert!(with(1, Field::Signed(NO_DEADLINE)).is_ok());
        assert!(with(1, Field::Signed(1)).is_ok());
        assert_eq!(with(2, Field::Signed(-1)), Err(LoadError::Invalid("creation time")));
        assert!(with(2, Field::Signed(0)).is_ok());
        assert_eq!(with(3, Field::Unsigned(lz4::MAX_ORIGINAL_LEN as u64 + 1)), Err(LoadError::Invalid("size")));
        let Field::Bytes(frame) = &fields[4] else { panic!("stored bytes") };
        assert_eq!(with(4, Field::Bytes(frame[..frame.len() - 2].to_vec())), Err(LoadError::Invalid("lz4 frame")));
        // The tag count bound is the upper bound of tiercache.max-tags.
        let names: Vec<Vec<u8>> = (0..=MAX_PERSISTED_TAGS).map(|i| i.to_string().into_bytes()).collect();
        for n in [MAX_PERSISTED_TAGS, MAX_PERSISTED_TAGS + 1] {
            let tags: Vec<&[u8]> = names[..n as usize].iter().map(Vec::as_slice).collect();
            let mut many: Vec<Field> = Vec::new();
            save(&sample(b"v", &tags), false, &mut many);
            let r = load(&mut many.into_iter(), 2);
            if n == MAX_PERSISTED_TAGS {
                assert_eq!(r.map(|e| e.tags().len()), Ok(n as usize));
            } else {
                assert_eq!(r, Err(LoadError::Invalid("tag count")));
            }
        }
    }

    #[test]
    fn version_1_loads_without_flags() {
        let e = sample(b"old", &[b"t"]);
        let mut fields: Vec<Field> = Vec::new();
        save(&e, false, &mut fields);
        fields.pop();
        assert_eq!(load(&mut fields.into_iter(), 1).unwrap(), e);
    }
}
