//! The cache entry: the stored bytes (raw or an lz4 frame), the fresh deadline, creation time and tags.
//!
//! Time model: an entry is *fresh* while `now < fresh_until` (or forever without a deadline). After that it
//! is *stale* until the Redis key itself expires (`fresh_until + stale window`, kept as the key's TTL so
//! that native TTL/EXPIRE/PERSIST keep working), then gone.

use std::borrow::Cow;

use crate::lz4::{self, FrameError};
#[cfg(test)]
use crate::tags::TagList;
use crate::tags::{Encoder, Tags};

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

/// Bytes of the fixed header at the start of an entry's allocation: total length (u32), fresh deadline
/// (i64), creation time (i64), fill time in ms with the encoding in the top bit (u32), tag section length
/// (u32). All little-endian, read unaligned.
const HEADER: usize = 28;
const AT_LEN: usize = 0;
const AT_FRESH: usize = 4;
const AT_CREATED: usize = 12;
const AT_FILL: usize = 20;
const AT_TAGS_LEN: usize = 24;
/// The top bit of the fill word: the stored bytes are an lz4 frame.
const LZ4_BIT: u32 = 1 << 31;

/// One cached value, in ONE allocation: `header | tags | stored bytes`.
///
/// A 100-byte value with two tags is one 192-byte allocation (jemalloc's size class) where a struct with
/// a boxed value and a boxed tag list took three (64 + 112 + 48 bytes); without tags, one of 128 instead of
/// two of 64 and 112. Redis keeps a thin pointer to it ([`Entry::into_raw`]); the header holds the length,
/// so [`Entry::from_raw`] can view it again.
#[repr(transparent)]
#[derive(Debug, PartialEq, Eq)]
pub struct Entry([u8]);

/// The tag section of a new entry: a list already laid out (load, copy) or names to lay out.
#[derive(Clone, Copy)]
enum TagBytes<'a> {
    Laid(&'a Tags),
    Names(&'a Encoder<'a>),
}

#[inline]
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(src) = b.get(at..at + 4) {
        a.copy_from_slice(src);
    }
    u32::from_le_bytes(a)
}

#[inline]
fn get_i64(b: &[u8], at: usize) -> i64 {
    let mut a = [0u8; 8];
    if let Some(src) = b.get(at..at + 8) {
        a.copy_from_slice(src);
    }
    i64::from_le_bytes(a)
}

impl Entry {
    /// Builds an entry from a client's value and tag names (repeats dropped). A `Verbatim(Lz4)` value must
    /// be a frame that decodes (it is checked once here, so a GET can never find an unreadable entry).
    pub fn from_value(
        value: &[u8],
        storage: Storage,
        fresh_until: i64,
        created: i64,
        tags: &[&[u8]],
    ) -> Result<Box<Self>, FrameError> {
        let tags = Encoder::new(tags);
        let tags = TagBytes::Names(&tags);
        match storage {
            Storage::Auto { compress_min_size } => match lz4::compress_if_worth(value, compress_min_size) {
                Some(frame) => Self::build(&frame, Encoding::Lz4, fresh_until, created, tags),
                None => Self::build(value, Encoding::Raw, fresh_until, created, tags),
            },
            Storage::Verbatim(Encoding::Raw) => Self::build(value, Encoding::Raw, fresh_until, created, tags),
            Storage::Verbatim(Encoding::Lz4) => {
                lz4::decompress(value)?;
                Self::build(value, Encoding::Lz4, fresh_until, created, tags)
            }
        }
    }

    /// Assembles an entry from stored parts (RDB load), checking that they agree.
    pub fn from_parts(
        data: &[u8],
        encoding: Encoding,
        orig_len: usize,
        fresh_until: i64,
        created: i64,
        tags: &Tags,
    ) -> Result<Box<Self>, FrameError> {
        let ok = match encoding {
            Encoding::Raw => orig_len == data.len(),
            Encoding::Lz4 => lz4::original_len(data)? == orig_len,
        };
        if !ok || fresh_until < NO_DEADLINE {
            return Err(FrameError::BadHeader);
        }
        Self::build(data, encoding, fresh_until, created, TagBytes::Laid(tags))
    }

    fn build(
        data: &[u8],
        encoding: Encoding,
        fresh_until: i64,
        created: i64,
        tags: TagBytes<'_>,
    ) -> Result<Box<Self>, FrameError> {
        let tags_len = match tags {
            TagBytes::Laid(t) => t.as_bytes().len(),
            TagBytes::Names(e) => e.len(),
        };
        let total = HEADER.checked_add(tags_len).and_then(|n| n.checked_add(data.len())).ok_or(FrameError::TooLarge)?;
        let total32 = u32::try_from(total).map_err(|_| FrameError::TooLarge)?;
        let tags32 = u32::try_from(tags_len).map_err(|_| FrameError::TooLarge)?;
        // The header is laid out on the stack and copied in once (one capacity check, not five).
        let fill = if encoding == Encoding::Lz4 { LZ4_BIT } else { 0 };
        let mut header = [0u8; HEADER];
        header[AT_LEN..AT_LEN + 4].copy_from_slice(&total32.to_le_bytes());
        header[AT_FRESH..AT_FRESH + 8].copy_from_slice(&fresh_until.to_le_bytes());
        header[AT_CREATED..AT_CREATED + 8].copy_from_slice(&created.to_le_bytes());
        header[AT_FILL..AT_FILL + 4].copy_from_slice(&fill.to_le_bytes());
        header[AT_TAGS_LEN..AT_TAGS_LEN + 4].copy_from_slice(&tags32.to_le_bytes());
        let mut buf = Vec::with_capacity(total);
        buf.extend_from_slice(&header);
        match tags {
            TagBytes::Laid(t) => buf.extend_from_slice(t.as_bytes()),
            TagBytes::Names(e) => e.write(&mut buf),
        }
        buf.extend_from_slice(data);
        Ok(Self::from_boxed_bytes(buf.into_boxed_slice()))
    }

    #[inline]
    fn from_boxed_bytes(b: Box<[u8]>) -> Box<Self> {
        // SAFETY: Entry is a repr(transparent) wrapper of [u8]: same layout, same slice metadata, and the
        // allocation was made for a [u8] of this length, which is what dropping a Box<Entry> frees.
        unsafe { Box::from_raw(Box::into_raw(b) as *mut Entry) }
    }

    /// A copy in a new allocation (COPY, lease wake-ups).
    pub fn to_boxed(&self) -> Box<Self> {
        Self::from_boxed_bytes(Box::from(&self.0))
    }

    /// Gives up the allocation as a thin pointer (for Redis to hold). Take it back with
    /// [`Entry::box_from_raw`] exactly once.
    pub fn into_raw(this: Box<Self>) -> *mut u8 {
        Box::into_raw(this) as *mut u8
    }

    /// The length of the allocation behind a thin pointer, from its header.
    ///
    /// # Safety
    /// `p` must come from [`Entry::into_raw`] and not have been taken back.
    #[inline]
    unsafe fn raw_len(p: *const u8) -> usize {
        let mut a = [0u8; 4];
        // SAFETY: every entry starts with its 4-byte little-endian total length (see `build`), and the
        // caller guarantees `p` points at a live entry.
        unsafe { std::ptr::copy_nonoverlapping(p.add(AT_LEN), a.as_mut_ptr(), 4) };
        u32::from_le_bytes(a) as usize
    }

    /// Views the entry behind a thin pointer.
    ///
    /// # Safety
    /// `p` must come from [`Entry::into_raw`], not have been taken back, and not be mutated for `'a`.
    #[inline]
    pub unsafe fn from_raw<'a>(p: *const u8) -> &'a Self {
        // SAFETY: the caller guarantees a live entry; its header holds the allocation's exact length.
        unsafe { &*(std::ptr::slice_from_raw_parts(p, Self::raw_len(p)) as *const Entry) }
    }

    /// Views the entry behind a thin pointer, mutably.
    ///
    /// # Safety
    /// As [`Entry::from_raw`], and nothing else may reference the entry for `'a`.
    #[inline]
    pub unsafe fn from_raw_mut<'a>(p: *mut u8) -> &'a mut Self {
        // SAFETY: as in `from_raw`, with exclusivity guaranteed by the caller.
        unsafe { &mut *(std::ptr::slice_from_raw_parts_mut(p, Self::raw_len(p)) as *mut Entry) }
    }

    /// Takes back ownership of a thin pointer.
    ///
    /// # Safety
    /// `p` must come from [`Entry::into_raw`] and be taken back only once.
    pub unsafe fn box_from_raw(p: *mut u8) -> Box<Self> {
        // SAFETY: the pointer and length (from the header) are exactly those of the boxed slice that
        // `into_raw` gave up, so this rebuilds that Box.
        unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, Self::raw_len(p)) as *mut Entry) }
    }

    #[inline]
    fn tags_len(&self) -> usize {
        get_u32(&self.0, AT_TAGS_LEN) as usize
    }

    #[inline]
    fn fill_word(&self) -> u32 {
        get_u32(&self.0, AT_FILL)
    }

    /// Absolute fresh deadline in unix ms, or [`NO_DEADLINE`].
    #[inline]
    pub fn fresh_until(&self) -> i64 {
        get_i64(&self.0, AT_FRESH)
    }

    pub fn created(&self) -> i64 {
        get_i64(&self.0, AT_CREATED)
    }

    #[inline]
    pub fn encoding(&self) -> Encoding {
        if self.fill_word() & LZ4_BIT != 0 {
            Encoding::Lz4
        } else {
            Encoding::Raw
        }
    }

    #[inline]
    pub fn tags(&self) -> &Tags {
        let end = HEADER.saturating_add(self.tags_len()).min(self.0.len());
        Tags::from_bytes(self.0.get(HEADER..end).unwrap_or(&[]))
    }

    /// The tags, to record the epochs they are attached under (see `index`).
    pub fn tags_mut(&mut self) -> &mut Tags {
        let end = HEADER.saturating_add(self.tags_len()).min(self.0.len());
        Tags::from_bytes_mut(self.0.get_mut(HEADER..end).unwrap_or(&mut []))
    }

    /// Milliseconds the fill that wrote this entry took (0: unknown, e.g. not written through a lease).
    pub fn fill_ms(&self) -> u32 {
        self.fill_word() & !LZ4_BIT
    }

    pub fn set_fill_ms(&mut self, ms: i64) {
        let ms = u32::try_from(ms.max(0)).unwrap_or(u32::MAX).min(!LZ4_BIT);
        let word = (self.fill_word() & LZ4_BIT) | ms;
        if let Some(dst) = self.0.get_mut(AT_FILL..AT_FILL + 4) {
            dst.copy_from_slice(&word.to_le_bytes());
        }
    }

    /// XFetch (Vattani et al.): refresh early when `now - delta * beta * ln(rand) >= fresh_until`,
    /// with `delta` the last fill's duration and `rand` uniform in (0, 1]. Never for entries without a
    /// deadline or a known fill duration.
    pub fn refresh_early(&self, now_ms: i64, beta: f64, rand: f64) -> bool {
        let fresh_until = self.fresh_until();
        if fresh_until == NO_DEADLINE || self.fill_ms() == 0 || !(rand > 0.0 && rand <= 1.0) {
            return false;
        }
        let gap = -(self.fill_ms() as f64) * beta * rand.ln();
        now_ms as f64 + gap >= fresh_until as f64
    }

    /// The bytes as stored (an lz4 frame for [`Encoding::Lz4`]).
    #[inline]
    pub fn stored(&self) -> &[u8] {
        let at = HEADER.saturating_add(self.tags_len()).min(self.0.len());
        self.0.get(at..).unwrap_or(&[])
    }

    /// The value's original size in bytes (an lz4 frame's header says it; it was checked on the way in).
    pub fn size(&self) -> usize {
        match self.encoding() {
            Encoding::Raw => self.stored().len(),
            Encoding::Lz4 => lz4::original_len(self.stored()).unwrap_or(0),
        }
    }

    #[inline]
    pub fn is_fresh(&self, now_ms: i64) -> bool {
        let fresh_until = self.fresh_until();
        fresh_until == NO_DEADLINE || now_ms < fresh_until
    }

    /// Milliseconds of freshness left: [`NO_DEADLINE`] without a deadline, 0 once stale.
    pub fn fresh_ttl_ms(&self, now_ms: i64) -> i64 {
        let fresh_until = self.fresh_until();
        if fresh_until == NO_DEADLINE {
            NO_DEADLINE
        } else {
            fresh_until.saturating_sub(now_ms).max(0)
        }
    }

    /// The value itself: borrowed when raw, decoded when compressed.
    pub fn value(&self) -> Result<Cow<'_, [u8]>, FrameError> {
        match self.encoding() {
            Encoding::Raw => Ok(Cow::Borrowed(self.stored())),
            Encoding::Lz4 => lz4::decompress(self.stored()).map(Cow::Owned),
        }
    }

    /// Decodes the value into a reusable buffer, or returns the stored bytes when raw.
    #[inline]
    pub fn value_into<'a>(&'a self, scratch: &'a mut Vec<u8>) -> Result<&'a [u8], FrameError> {
        match self.encoding() {
            Encoding::Raw => Ok(self.stored()),
            Encoding::Lz4 => {
                lz4::decompress_into(self.stored(), scratch)?;
                Ok(scratch)
            }
        }
    }

    /// Heap bytes held by this entry (for MEMORY USAGE): its one allocation.
    pub fn mem_usage(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};

    #[test]
    fn one_allocation_round_trips_through_a_thin_pointer() {
        let big = b"abcdefgh".repeat(512);
        for (value, t) in [(&b"v"[..], &[][..]), (&big[..], &[&b"user:1"[..], b"org:\0"][..])] {
            let mut e = Entry::from_value(value, Storage::Auto { compress_min_size: 1024 }, 123, 45, t).unwrap();
            e.set_fill_ms(77);
            assert_eq!(e.mem_usage(), 28 + e.tags().as_bytes().len() + e.stored().len(), "header, tags, bytes");
            let copy = e.to_boxed();
            let p = Entry::into_raw(e);
            // SAFETY: `p` comes from into_raw and is taken back once, below.
            let view = unsafe { Entry::from_raw(p) };
            assert_eq!(view, &*copy);
            assert_eq!((view.fresh_until(), view.created(), view.fill_ms()), (123, 45, 77));
            assert_eq!(view.tags().iter().collect::<Vec<_>>(), t.to_vec());
            assert_eq!(&*view.value().unwrap(), value);
            // SAFETY: as above; nothing else holds `p`.
            unsafe { Entry::from_raw_mut(p) }.tags_mut().set_epochs(|_, _| 9);
            // SAFETY: taken back exactly once.
            let back = unsafe { Entry::box_from_raw(p) };
            assert!(back.tags().refs().all(|r| r.epoch == 9));
            assert_eq!(back.encoding(), copy.encoding(), "the fill time leaves the encoding bit alone");
        }
        let mut e = Entry::from_value(b"v", Storage::Verbatim(Encoding::Raw), 1, 0, &[]).unwrap();
        e.set_fill_ms(i64::MAX);
        assert_eq!((e.fill_ms(), e.encoding()), (u32::MAX >> 1, Encoding::Raw), "saturates below the encoding bit");
    }

    #[test]
    fn fresh_then_stale_on_a_moving_clock() {
        let clock = ManualClock::new(10_000);
        let e = Entry::from_value(b"v", Storage::Auto { compress_min_size: 1024 }, 10_100, clock.now_ms(), &[]).unwrap();
        assert!(e.is_fresh(clock.now_ms()));
        assert_eq!(e.fresh_ttl_ms(clock.now_ms()), 100);
        clock.advance(99);
        assert!(e.is_fresh(clock.now_ms()));
        clock.advance(1);
        assert!(!e.is_fresh(clock.now_ms()), "fresh_until itself is no longer fresh");
        assert_eq!(e.fresh_ttl_ms(clock.now_ms()), 0);
        let forever = Entry::from_value(b"v", Storage::Verbatim(Encoding::Raw), NO_DEADLINE, 0, &[]).unwrap();
        assert!(forever.is_fresh(i64::MAX));
        assert_eq!(forever.fresh_ttl_ms(5), NO_DEADLINE);
    }

    #[test]
    fn auto_compresses_large_compressible_values_only() {
        let big = b"abcdefgh".repeat(512);
        let e = Entry::from_value(&big, Storage::Auto { compress_min_size: 1024 }, NO_DEADLINE, 0, &[b"t"]).unwrap();
        assert_eq!(e.encoding(), Encoding::Lz4);
        assert_eq!(e.size(), big.len());
        assert!(e.stored().len() < big.len() / 4);
        assert_eq!(&*e.value().unwrap(), &big[..]);
        let mut scratch = Vec::new();
        assert_eq!(e.value_into(&mut scratch).unwrap(), &big[..]);

        let small = Entry::from_value(&big[..1000], Storage::Auto { compress_min_size: 1024 }, NO_DEADLINE, 0, &[]).unwrap();
        assert_eq!(small.encoding(), Encoding::Raw);
        let forced_raw = Entry::from_value(&big, Storage::Verbatim(Encoding::Raw), NO_DEADLINE, 0, &[]).unwrap();
        assert_eq!(forced_raw.encoding(), Encoding::Raw);
        assert_eq!(forced_raw.stored(), &big[..]);
    }

    #[test]
    fn verbatim_lz4_takes_a_client_frame_and_rejects_garbage() {
        let big = b"0123456789".repeat(300);
        let frame = lz4::compress(&big);
        let e = Entry::from_value(&frame, Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, &[]).unwrap();
        assert_eq!(e.stored(), &frame[..]);
        assert_eq!(e.size(), big.len());
        assert_eq!(&*e.value().unwrap(), &big[..]);
        assert!(Entry::from_value(b"xy", Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, &[]).is_err());
        let mut corrupt = frame.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        corrupt.truncate(last - 3);
        assert!(
            Entry::from_value(&corrupt, Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, &[]).is_err(),
            "a frame whose body does not decode"
        );
    }

    #[test]
    fn xfetch_refreshes_early_more_often_near_the_deadline() {
        let mut e = Entry::from_value(b"v", Storage::Verbatim(Encoding::Raw), 10_000, 0, &[]).unwrap();
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
        assert!(Entry::from_parts(b"abc", Encoding::Raw, 4, NO_DEADLINE, 0, &TagList::EMPTY).is_err());
        assert!(Entry::from_parts(b"abc", Encoding::Raw, 3, -5, 0, &TagList::EMPTY).is_err());
        assert!(Entry::from_parts(b"abc", Encoding::Raw, 3, NO_DEADLINE, 0, &TagList::EMPTY).is_ok());
    }
}
