//! The tiercache lz4 frame: a 4-byte little-endian original length followed by one lz4 block
//! (lz4_flex's "size prepended" block format). The module stores compressed entries in this frame, and
//! clients may send (`TIERCACHE.SET ... ENCODING lz4`) and read back (`TIERCACHE.GET key ENCODED`)
//! the same frame so that Redis never decompresses for them.

use std::fmt;

/// Bytes of the length header.
pub const HEADER_LEN: usize = 4;
/// Largest original size a frame may announce: Redis's default `proto-max-bulk-len` (512 MiB). A larger
/// claim is refused before anything is allocated (Redis aborts on allocation failure).
pub const MAX_ORIGINAL_LEN: usize = 512 * 1024 * 1024;
/// lz4 cannot expand data by more than about 255:1; a header claiming more is corrupt.
const MAX_RATIO: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than the header, or the header disagrees with the payload.
    BadHeader,
    /// The announced size exceeds [`MAX_ORIGINAL_LEN`].
    TooLarge,
    /// The lz4 block does not decode to the announced size.
    Corrupt,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameError::BadHeader => "invalid lz4 frame header",
            FrameError::TooLarge => "lz4 frame announces more than 512 MiB",
            FrameError::Corrupt => "corrupt lz4 frame",
        })
    }
}

impl std::error::Error for FrameError {}

/// Compresses `src` into a frame.
pub fn compress(src: &[u8]) -> Vec<u8> {
    lz4_flex::block::compress_prepend_size(src)
}

/// Compresses `src` when it is at least `min_len` bytes and the frame saves at least 10 %.
pub fn compress_if_worth(src: &[u8], min_len: usize) -> Option<Vec<u8>> {
    if src.len() < min_len || src.is_empty() || src.len() > MAX_ORIGINAL_LEN {
        return None;
    }
    let frame = compress(src);
    // frame <= 90 % of src, in integers.
    (frame.len() * 10 <= src.len() * 9).then_some(frame)
}

/// Checks a frame's header without decoding it and returns the original length it announces.
pub fn original_len(frame: &[u8]) -> Result<usize, FrameError> {
    let header: [u8; HEADER_LEN] = frame.get(..HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(FrameError::BadHeader)?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_ORIGINAL_LEN {
        return Err(FrameError::TooLarge);
    }
    let payload = frame.len() - HEADER_LEN;
    // An empty original is one token byte; anything else needs a payload that could expand to len.
    if (len == 0 && payload != 1) || (len > 0 && (payload == 0 || payload.saturating_mul(MAX_RATIO) < len)) {
        return Err(FrameError::BadHeader);
    }
    Ok(len)
}

/// Decodes a frame into `out` (cleared first).
pub fn decompress_into(frame: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let len = original_len(frame)?;
    out.clear();
    out.resize(len, 0);
    match lz4_flex::block::decompress_into(&frame[HEADER_LEN..], out) {
        Ok(n) if n == len => Ok(()),
        _ => {
            out.clear();
            Err(FrameError::Corrupt)
        }
    }
}

/// Checks that a frame decodes to exactly the size it announces (no more than [`MAX_ORIGINAL_LEN`]),
/// and returns that size. Decodes into a temporary buffer of the announced size, freed before returning:
/// this is what an RDB load pays so that a read can never find an unreadable entry.
pub fn check(frame: &[u8]) -> Result<usize, FrameError> {
    decompress(frame).map(|v| v.len())
}

/// Decodes a frame into a new vector.
pub fn decompress(frame: &[u8]) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::new();
    decompress_into(frame, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_row(n: usize) -> Vec<u8> {
        let mut s = String::new();
        let mut i = 0;
        while s.len() < n {
            s.push_str(&format!(r#"{{"id":{i},"name":"user {i}","email":"u{i}@example.com","active":true}},"#));
            i += 1;
        }
        s.truncate(n);
        s.into_bytes()
    }

    #[test]
    fn round_trip() {
        for n in [0usize, 1, 100, 4096, 65536] {
            let src = json_row(n);
            let frame = compress(&src);
            assert_eq!(original_len(&frame), Ok(n));
            assert_eq!(decompress(&frame).unwrap(), src);
        }
    }

    #[test]
    fn compresses_only_when_worth_it() {
        assert!(compress_if_worth(&json_row(4096), 1024).is_some());
        assert!(compress_if_worth(&json_row(512), 1024).is_none(), "below min size");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        assert!(compress_if_worth(&noise, 16).is_none(), "incompressible");
    }

    #[test]
    fn rejects_bad_frames_without_panicking() {
        assert_eq!(original_len(b""), Err(FrameError::BadHeader));
        assert_eq!(original_len(b"\x01\x00"), Err(FrameError::BadHeader));
        assert_eq!(original_len(b"\xff\xff\xff\xff\x00"), Err(FrameError::TooLarge));
        assert_eq!(original_len(b"\x00\x10\x00\x00\x00"), Err(FrameError::BadHeader), "4 KiB from 1 byte");
        assert_eq!(original_len(b"\x00\x00\x00\x00"), Err(FrameError::BadHeader), "empty needs its token byte");
        assert_eq!(decompress(&compress(b"")), Ok(Vec::new()));
        let mut frame = compress(&json_row(4096));
        let last = frame.len() - 1;
        frame.truncate(last);
        assert_eq!(decompress(&frame), Err(FrameError::Corrupt));
        let mut frame = compress(&json_row(4096));
        for b in frame.iter_mut().skip(HEADER_LEN).step_by(3) {
            *b ^= 0x5a;
        }
        assert!(decompress(&frame).is_err());
        assert!(check(&frame).is_err());
    }

    #[test]
    fn check_decodes_the_whole_frame() {
        let src = json_row(4096);
        let frame = compress(&src);
        assert_eq!(check(&frame), Ok(4096));
        // A valid header over a body that stops short: the header check alone passes, the decode does not.
        let short = &frame[..frame.len() - 3];
        assert_eq!(original_len(short), Ok(4096));
        assert_eq!(check(short), Err(FrameError::Corrupt));
    }

    #[test]
    fn decoding_never_writes_more_than_announced() {
        // A frame announcing fewer bytes than its block produces: refused, not decoded past the size.
        let src = json_row(4096);
        let mut frame = compress(&src);
        frame[..HEADER_LEN].copy_from_slice(&100u32.to_le_bytes());
        let mut out = Vec::new();
        assert_eq!(decompress_into(&frame, &mut out), Err(FrameError::Corrupt));
        assert!(out.capacity() <= 100, "grew to {} for a 100-byte announcement", out.capacity());
    }
}
