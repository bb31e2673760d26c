//! The RDB entry layout (`persist::load`) over a byte source built from the fuzz input, and the round
//! trip: whatever loads must save and load back to the same entry, and save to the same bytes again.
//!
//! Input: one byte, the encoding version (as i8), then the fields. The byte source stands in for
//! Redis's typed `RedisModule_Load*` primitives: an unsigned is one byte below 0xFD, else 0xFD/0xFE/0xFF
//! followed by a u16/u32/u64 LE; a signed is one byte `b` below 0xFF meaning `b - 1` (so 0 is -1), else
//! 0xFF and an i64 LE; a string is an unsigned length and that many bytes. Reading past the end is the
//! I/O error a truncated RDB gives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tiercache_core::entry::Entry;
use tiercache_core::lz4;
use tiercache_core::persist::{load, save, Field, LoadError, Sink, Source, ENCODING_VERSION};
use tiercache_core::tags::{DEAD, PENDING};
use tiercache_core::{Encoding, NO_DEADLINE};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], LoadError> {
        if n > self.0.len() {
            return Err(LoadError::Io);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn le(&mut self, n: usize) -> Result<u64, LoadError> {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(self.take(n)?);
        Ok(u64::from_le_bytes(b))
    }
}

impl Source for Bytes<'_> {
    fn get_unsigned(&mut self) -> Result<u64, LoadError> {
        match self.take(1)?[0] {
            0xFD => self.le(2),
            0xFE => self.le(4),
            0xFF => self.le(8),
            b => Ok(u64::from(b)),
        }
    }
    fn get_signed(&mut self) -> Result<i64, LoadError> {
        match self.take(1)?[0] {
            0xFF => Ok(self.le(8)? as i64),
            b => Ok(i64::from(b) - 1),
        }
    }
    fn get_bytes(&mut self) -> Result<Vec<u8>, LoadError> {
        let n = self.get_unsigned()?;
        let n = usize::try_from(n).map_err(|_| LoadError::Io)?;
        Ok(self.take(n)?.to_vec())
    }
}

/// Writes the same format, in its shortest form.
#[derive(Default)]
struct Out(Vec<u8>);

impl Sink for Out {
    fn put_unsigned(&mut self, v: u64) {
        if v < 0xFD {
            self.0.push(v as u8);
        } else if v <= u64::from(u16::MAX) {
            self.0.push(0xFD);
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= u64::from(u32::MAX) {
            self.0.push(0xFE);
            self.0.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            self.0.push(0xFF);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn put_signed(&mut self, v: i64) {
        if (-1..0xFE).contains(&v) {
            self.0.push((v + 1) as u8);
        } else {
            self.0.push(0xFF);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn put_bytes(&mut self, v: &[u8]) {
        self.put_unsigned(v.len() as u64);
        self.0.extend_from_slice(v);
    }
}

/// What a loaded entry must satisfy whatever the payload was.
fn check_invariants(e: &Entry) -> bool {
    assert!(e.fresh_until() >= NO_DEADLINE);
    match e.encoding() {
        Encoding::Raw => assert_eq!(e.stored().len(), e.size()),
        Encoding::Lz4 => assert_eq!(lz4::original_len(e.stored()), Ok(e.size())),
    }
    // The header is checked at load; the block itself may still be corrupt (GET then answers
    // "stored value is unreadable"), but decoding must never panic or return another length.
    if let Ok(v) = e.value() {
        assert_eq!(v.len(), e.size());
    }
    let names: Vec<&[u8]> = e.tags().iter().collect();
    for (i, t) in names.iter().enumerate() {
        assert!(!t.is_empty(), "empty tag loaded");
        assert!(!names[..i].contains(t), "repeated tag kept");
    }
    let epochs: Vec<u64> = e.tags().with_epochs().map(|(ep, _)| ep).collect();
    let dead = epochs.iter().all(|&ep| ep == DEAD) && !epochs.is_empty();
    assert!(dead || epochs.iter().all(|&ep| ep == PENDING), "mixed epochs {epochs:?}");
    dead
}

fuzz_target!(|data: &[u8]| {
    let Some((&v, rest)) = data.split_first() else {
        return;
    };
    let version = i32::from(v as i8);
    let Ok(entry) = load(&mut Bytes(rest), version) else {
        return;
    };
    let invalidated = check_invariants(&entry);

    // Round trip through the byte form, twice: the second save must give the same bytes.
    let mut out = Out::default();
    save(&entry, invalidated, &mut out);
    let back = load(&mut Bytes(&out.0), ENCODING_VERSION).expect("a saved entry must load");
    assert_eq!(back, entry, "load(save(entry)) differs");
    let mut again = Out::default();
    save(&back, invalidated, &mut again);
    assert_eq!(again.0, out.0, "save is not stable");

    // And through the typed field stream the unit tests use.
    let mut fields: Vec<Field> = Vec::new();
    save(&entry, invalidated, &mut fields);
    let back = load(&mut fields.into_iter(), ENCODING_VERSION).expect("a saved entry must load from fields");
    assert_eq!(back, entry);
});
