//! The cache entry: the stored bytes (raw or an lz4 frame), the fresh deadline, creation time and tags.
//!
//! Time model: an entry is *fresh* while `now < fresh_until` (or forever without a deadline). After that it
//! is *stale* until the Redis key itself expires (`fresh_until + stale window`, kept as the key's TTL so
//! that native TTL/EXPIRE/PERSIST keep working), then gone.

use std::borrow::Cow;

use crate::lz4::{self, FrameError};
use crate::tags::TagList;

/// "No deadline" for `fresh_until` and for TTL fields.
pub const NO_DEADLINE: i64 = -1;

/// How the stored bytes encode the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    Raw = 0,
    Lz4 = 1,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Raw => "raw",
            Encoding::Lz4 => "lz4",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"raw") {
            Some(Encoding::Raw)
        } else if name.eq_ignore_ascii_case(b"lz4") {
            Some(Encoding::Lz4)
        } else {
            None
        }
    }

    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(Encoding::Raw),
            1 => Some(Encoding::Lz4),
            _ => None,
        }
    }
}

/// How `TIERCACHE.SET` should store a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// Compress with lz4 when the value has at least this many bytes and the frame saves 10 %.
    Auto { compress_min_size: usize },
    /// The value is already in this encoding: store it verbatim.
    Verbatim(Encoding),
}

impl Storage {
    /// The size `value` has once decoded when stored this way: its length, or the size an lz4 frame
    /// announces (the header is checked, the body is not decoded). Lets a caller refuse a value by its
    /// decoded size before paying for it.
    pub fn decoded_len(self, value: &[u8]) -> Result<usize, FrameError> {
        match self {
            Storage::Verbatim(Encoding::Lz4) => lz4::original_len(value),
            Storage::Auto { .. } | Storage::Verbatim(Encoding::Raw) => Ok(value.len()),
        }
    }
}

/// One cached value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    fresh_until: i64,
    created: i64,
    data: Box<[u8]>,
    tags: TagList,
    orig_len: u64,
    /// How long the fill that wrote this entry took (lease grant to SET), for XFetch; 0 when unknown.
    fill_ms: u32,
    encoding: Encoding,
}

impl Entry {
    /// Builds an entry from a client's value. A `Verbatim(Lz4)` value must be a frame that decodes (it is
    /// checked once here, so a GET can never find an unreadable entry).
    pub fn from_value(value: &[u8], storage: Storage, fresh_until: i64, created: i64, tags: TagList) -> Result<Self, FrameError> {
        let (data, encoding, orig_len) = match storage {
            Storage::Auto { compress_min_size } => match lz4::compress_if_worth(value, compress_min_size) {
                Some(frame) => (frame.into_boxed_slice(), Encoding::Lz4, value.len()),
                None => (Box::from(value), Encoding::Raw, value.len()),
            },
            Storage::Verbatim(Encoding::Raw) => (Box::from(value), Encoding::Raw, value.len()),
            Storage::Verbatim(Encoding::Lz4) => (Box::from(value), Encoding::Lz4, lz4::decompress(value)?.len()),
        };
        Self::from_parts(data, encoding, orig_len, fresh_until, created, tags)
    }

    /// Assembles an entry from stored parts (RDB load, copy), checking that they agree.
    pub fn from_parts(
        data: Box<[u8]>,
        encoding: Encoding,
        orig_len: usize,
        fresh_until: i64,
        created: i64,
        tags: TagList,
    ) -> Result<Self, FrameError> {
        let ok = match encoding {
            Encoding::Raw => orig_len == data.len(),
            Encoding::Lz4 => lz4::original_len(&data)? == orig_len,
        };
        if !ok || fresh_until < NO_DEADLINE {
            return Err(FrameError::BadHeader);
        }
        let orig_len = orig_len as u64;
        Ok(Entry { fresh_until, created, data, tags, orig_len, fill_ms: 0, encoding })
    }

    /// Absolute fresh deadline in unix ms, or [`NO_DEADLINE`].
    pub fn fresh_until(&self) -> i64 {
        self.fresh_until
    }

    pub fn created(&self) -> i64 {
        self.created
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    pub fn tags(&self) -> &TagList {
        &self.tags
    }

    /// Milliseconds the fill that wrote this entry took (0: unknown, e.g. not written through a lease).
    pub fn fill_ms(&self) -> u32 {
        self.fill_ms
    }

    pub fn set_fill_ms(&mut self, ms: i64) {
        self.fill_ms = u32::try_from(ms.max(0)).unwrap_or(u32::MAX);
    }

    /// XFetch (Vattani et al.): refresh early when `now - delta * beta * ln(rand) >= fresh_until`,
    /// with `delta` the last fill's duration and `rand` uniform in (0, 1]. Never for entries without a
    /// deadline or a known fill duration.
    pub fn refresh_early(&self, now_ms: i64, beta: f64, rand: f64) -> bool {
        if self.fresh_until == NO_DEADLINE || self.fill_ms == 0 || !(rand > 0.0 && rand <= 1.0) {
            return false;
        }
        let gap = -(self.fill_ms as f64) * beta * rand.ln();
        now_ms as f64 + gap >= self.fresh_until as f64
    }

    /// The tags, to record the epochs they are attached under (see `index`).
    pub fn tags_mut(&mut self) -> &mut TagList {
        &mut self.tags
    }

    /// The bytes as stored (an lz4 frame for [`Encoding::Lz4`]).
    pub fn stored(&self) -> &[u8] {
        &self.data
    }

    /// The value's original size in bytes.
    pub fn size(&self) -> usize {
        self.orig_len as usize
    }

    #[inline]
    pub fn is_fresh(&self, now_ms: i64) -> bool {
        self.fresh_until == NO_DEADLINE || now_ms < self.fresh_until
    }

    /// Milliseconds of freshness left: [`NO_DEADLINE`] without a deadline, 0 once stale.
    pub fn fresh_ttl_ms(&self, now_ms: i64) -> i64 {
        if self.fresh_until == NO_DEADLINE {
            NO_DEADLINE
        } else {
            self.fresh_until.saturating_sub(now_ms).max(0)
        }
    }

    /// The value itself: borrowed when raw, decoded when compressed.
    pub fn value(&self) -> Result<Cow<'_, [u8]>, FrameError> {
        match self.encoding {
            Encoding::Raw => Ok(Cow::Borrowed(&self.data)),
            Encoding::Lz4 => lz4::decompress(&self.data).map(Cow::Owned),
        }
    }

    /// Decodes the value into a reusable buffer, or returns the stored bytes when raw.
    #[inline]
    pub fn value_into<'a>(&'a self, scratch: &'a mut Vec<u8>) -> Result<&'a [u8], FrameError> {
        match self.encoding {
            Encoding::Raw => Ok(&self.data),
            Encoding::Lz4 => {
                lz4::decompress_into(&self.data, scratch)?;
                Ok(scratch)
            }
        }
    }

    /// Heap and inline bytes held by this entry (for MEMORY USAGE).
    pub fn mem_usage(&self) -> usize {
        std::mem::size_of::<Self>() + self.data.len() + self.tags.heap_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    fn tags(t: &[&[u8]]) -> TagList {
        TagList::new(t)
    }

    #[test]
    fn fresh_then_stale_on_a_moving_clock() {
        let clock = ManualClock::new(10_000);
        let e =
            Entry::from_value(b"v", Storage::Auto { compress_min_size: 1024 }, 10_100, clock.now_ms(), TagList::EMPTY).unwrap();
        assert!(e.is_fresh(clock.now_ms()));
        assert_eq!(e.fresh_ttl_ms(clock.now_ms()), 100);
        clock.advance(99);
        assert!(e.is_fresh(clock.now_ms()));
        clock.advance(1);
        assert!(!e.is_fresh(clock.now_ms()), "fresh_until itself is no longer fresh");
        assert_eq!(e.fresh_ttl_ms(clock.now_ms()), 0);
        let forever = Entry::from_value(b"v", Storage::Verbatim(Encoding::Raw), NO_DEADLINE, 0, TagList::EMPTY).unwrap();
        assert!(forever.is_fresh(i64::MAX));
        assert_eq!(forever.fresh_ttl_ms(5), NO_DEADLINE);
    }

    #[test]
    fn auto_compresses_large_compressible_values_only() {
        let big = b"abcdefgh".repeat(512);
        let e = Entry::from_value(&big, Storage::Auto { compress_min_size: 1024 }, NO_DEADLINE, 0, tags(&[b"t"])).unwrap();
        assert_eq!(e.encoding(), Encoding::Lz4);
        assert_eq!(e.size(), big.len());
        assert!(e.stored().len() < big.len() / 4);
        assert_eq!(&*e.value().unwrap(), &big[..]);
        let mut scratch = Vec::new();
        assert_eq!(e.value_into(&mut scratch).unwrap(), &big[..]);

        let small =
            Entry::from_value(&big[..1000], Storage::Auto { compress_min_size: 1024 }, NO_DEADLINE, 0, TagList::EMPTY).unwrap();
        assert_eq!(small.encoding(), Encoding::Raw);
        let forced_raw = Entry::from_value(&big, Storage::Verbatim(Encoding::Raw), NO_DEADLINE, 0, TagList::EMPTY).unwrap();
        assert_eq!(forced_raw.encoding(), Encoding::Raw);
        assert_eq!(forced_raw.stored(), &big[..]);
    }

    #[test]
    fn verbatim_lz4_takes_a_client_frame_and_rejects_garbage() {
        let big = b"0123456789".repeat(300);
        let frame = lz4::compress(&big);
        let e = Entry::from_value(&frame, Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, TagList::EMPTY).unwrap();
        assert_eq!(e.stored(), &frame[..]);
        assert_eq!(e.size(), big.len());
        assert_eq!(&*e.value().unwrap(), &big[..]);
        assert!(Entry::from_value(b"xy", Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, TagList::EMPTY).is_err());
        let mut corrupt = frame.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        corrupt.truncate(last - 3);
        assert!(
            Entry::from_value(&corrupt, Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, TagList::EMPTY).is_err(),
            "a frame whose body does not decode"
        );
    }

    #[test]
    fn xfetch_refreshes_early_more_often_near_the_deadline() {
        let mut e = Entry::from_value(b"v", Storage::Verbatim(Encoding::Raw), 10_000, 0, TagList::EMPTY).unwrap();
        assert!(!e.refresh_early(9_999, 1.0, 0.001), "unknown fill time: never");
        e.set_fill_ms(100);
        assert_eq!(e.fill_ms(), 100);
        // gap = -100 * ln(rand): rand 0.5 -> 69 ms, rand 0.001 -> 690 ms
        assert!(!e.refresh_early(9_000, 1.0, 0.5));
        assert!(e.refresh_early(9_950, 1.0, 0.5));
        assert!(e.refresh_early(9_400, 1.0, 0.001));
        assert!(!e.refresh_early(9_400, 0.1, 0.001), "a small beta refreshes later");
        assert!(!e.refresh_early(9_950, 1.0, 0.0), "rand outside (0, 1]");
    }

    #[test]
    fn decoded_len_reads_the_frame_header_only() {
        let frame = lz4::compress(&[0u8; 100_000]);
        assert!(frame.len() < 1000);
        assert_eq!(Storage::Verbatim(Encoding::Lz4).decoded_len(&frame), Ok(100_000));
        assert_eq!(Storage::Verbatim(Encoding::Raw).decoded_len(&frame), Ok(frame.len()));
        assert_eq!(Storage::Auto { compress_min_size: 0 }.decoded_len(b"abc"), Ok(3));
        assert_eq!(Storage::Verbatim(Encoding::Lz4).decoded_len(b"xy"), Err(FrameError::BadHeader));
    }

    #[test]
    fn from_parts_checks_consistency() {
        assert!(Entry::from_parts(Box::from(&b"abc"[..]), Encoding::Raw, 4, NO_DEADLINE, 0, TagList::EMPTY).is_err());
        assert!(Entry::from_parts(Box::from(&b"abc"[..]), Encoding::Raw, 3, -5, 0, TagList::EMPTY).is_err());
        assert!(Entry::from_parts(Box::from(&b"abc"[..]), Encoding::Raw, 3, NO_DEADLINE, 0, TagList::EMPTY).is_ok());
    }
}
