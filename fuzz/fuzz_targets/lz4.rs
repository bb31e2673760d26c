//! The tiercache lz4 frame: header checks and decoding of arbitrary bytes, and the round trip of
//! arbitrary values.
//!
//! Decoding must never panic, must return exactly the announced length when it succeeds, and must never
//! allocate more than the frame's bounded size: the announced length, which the header check limits to
//! 255 times the payload and to 512 MiB. A counting allocator records the largest single allocation
//! made while a frame is decoded.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use libfuzzer_sys::fuzz_target;
use tiercache_core::entry::{Entry, Storage};
use tiercache_core::lz4::{self, FrameError, HEADER_LEN, MAX_ORIGINAL_LEN};
use tiercache_core::{Encoding, NO_DEADLINE};

struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(|l| l.get()))
}

/// The header rule of COMMANDS.md ("What SET ENCODING lz4 checks"), written independently.
fn reference_header(frame: &[u8]) -> Result<usize, FrameError> {
    if frame.len() < HEADER_LEN {
        return Err(FrameError::BadHeader);
    }
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as u64;
    if len > MAX_ORIGINAL_LEN as u64 {
        return Err(FrameError::TooLarge);
    }
    let payload = (frame.len() - HEADER_LEN) as u64;
    let plausible = if len == 0 { payload == 1 } else { payload > 0 && payload * 255 >= len };
    if plausible {
        Ok(len as usize)
    } else {
        Err(FrameError::BadHeader)
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The input as a frame.
    let header = lz4::original_len(data);
    assert_eq!(header, reference_header(data), "header check");
    let (decoded, largest) = largest_alloc(|| lz4::decompress(data));
    match (&header, &decoded) {
        (Ok(n), Ok(v)) => assert_eq!(v.len(), *n),
        (Err(e), Err(d)) => assert_eq!(e, d, "a header error is returned as is"),
        (Err(_), Ok(_)) => panic!("decoded a frame whose header was refused"),
        (Ok(_), Err(d)) => assert_eq!(*d, FrameError::Corrupt),
    }
    let bound = header.unwrap_or(0);
    assert!(largest <= bound.max(64), "decoding allocated {largest} bytes, the frame bounds it to {bound}");

    // Decoding into a reused buffer gives the same answer and leaves it empty on errors.
    let mut scratch = b"previous contents".to_vec();
    match lz4::decompress_into(data, &mut scratch) {
        Ok(()) => assert_eq!(Ok(&scratch), decoded.as_ref()),
        Err(e) => {
            assert_eq!(Err(e), decoded);
            assert!(scratch.is_empty() || header.is_err(), "a failed decode left {} bytes", scratch.len());
        }
    }

    // SET ... ENCODING lz4 accepts exactly the frames that decode.
    let entry = Entry::from_value(data, Storage::Verbatim(Encoding::Lz4), NO_DEADLINE, 0, &[]);
    assert_eq!(entry.is_ok(), decoded.is_ok());
    if let Ok(e) = entry {
        assert_eq!(&*e.value().unwrap(), &decoded.unwrap()[..]);
    }

    // 2. The input as a value: compress, check, decode back.
    let frame = lz4::compress(data);
    assert_eq!(lz4::original_len(&frame), Ok(data.len()));
    assert_eq!(lz4::decompress(&frame).as_deref(), Ok(data));
    for min in [0, 1, 64, 1024] {
        match lz4::compress_if_worth(data, min) {
            Some(f) => {
                assert!(data.len() >= min && !data.is_empty());
                assert!(f.len() * 10 <= data.len() * 9);
                assert_eq!(lz4::decompress(&f).as_deref(), Ok(data));
            }
            None => {
                assert!(data.len() < min || data.is_empty() || frame.len() * 10 > data.len() * 9)
            }
        }
    }
});
