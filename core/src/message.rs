//! The invalidation message `TIERCACHE.INVALIDATE` publishes for L1 caches (channel
//! `tiercache.invalidation-channel`, default `tiercache:invalidations`).
//!
//! A MessagePack map with five fields, so Rust and Python subscribers decode it alike:
//! `{"v": 1, "run_id": str, "seq": uint, "db": uint, "tags": [bin, ...]}`. `seq` counts this server's
//! messages from 1 since it started (`run_id` changes on restart): a subscriber that sees a gap, or a new
//! run id, has missed invalidations and must drop what it caches.
//!
//! A *reset* message, `{"v": 1, "run_id": str, "seq": uint, "reset": true, "tags": []}`, says that the
//! dataset changed wholesale without per-tag messages (FLUSHDB/FLUSHALL, or a replica's full resync, which
//! may carry invalidations it never published): drop everything cached from this server.

/// The fields every message starts with: a 5-entry map, then `v`, `run_id` and `seq`.
/// (Writing into a Vec cannot fail, so the encoder's results are ignored here and below.)
fn header(capacity: usize, run_id: &[u8], seq: u64) -> Vec<u8> {
    use rmp::encode::*;
    let mut m = Vec::with_capacity(48 + run_id.len() + capacity);
    let _ = write_map_len(&mut m, 5);
    let _ = write_str(&mut m, "v");
    let _ = write_uint(&mut m, 1);
    let _ = write_str(&mut m, "run_id");
    let _ = write_str(&mut m, &String::from_utf8_lossy(run_id));
    let _ = write_str(&mut m, "seq");
    let _ = write_uint(&mut m, seq);
    m
}

/// Encodes one invalidation message.
pub fn invalidation(run_id: &[u8], seq: u64, db: u64, tags: &[&[u8]]) -> Vec<u8> {
    use rmp::encode::*;
    let mut m = header(tags.iter().map(|t| t.len() + 5).sum::<usize>(), run_id, seq);
    let _ = write_str(&mut m, "db");
    let _ = write_uint(&mut m, db);
    let _ = write_str(&mut m, "tags");
    let _ = write_array_len(&mut m, tags.len() as u32);
    for t in tags {
        let _ = write_bin(&mut m, t);
    }
    m
}

/// Encodes a reset message (see the module docs).
pub fn reset(run_id: &[u8], seq: u64) -> Vec<u8> {
    use rmp::encode::*;
    let mut m = header(0, run_id, seq);
    let _ = write_str(&mut m, "reset");
    let _ = write_bool(&mut m, true);
    let _ = write_str(&mut m, "tags");
    let _ = write_array_len(&mut m, 0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmp::decode::*;

    #[test]
    fn decodes_field_by_field() {
        let m = invalidation(b"abc123", 42, 3, &[b"user:1", b"\0\xff"]);
        let mut r = &m[..];
        assert_eq!(read_map_len(&mut r).unwrap(), 5);
        let mut buf = [0u8; 64];
        assert_eq!(read_str(&mut r, &mut buf).unwrap(), "v");
        assert_eq!(read_int::<u64, _>(&mut r).unwrap(), 1);
        assert_eq!(read_str(&mut r, &mut buf).unwrap(), "run_id");
        assert_eq!(read_str(&mut r, &mut buf).unwrap(), "abc123");
        assert_eq!(read_str(&mut r, &mut buf).unwrap(), "seq");
        assert_eq!(read_int::<u64, _>(&mut r).unwrap(), 42);
        assert_eq!(read_str(&mut r, &mut buf).unwrap(), "db");
        assert_eq!(read_int::<u64, _>(&mut r).unwrap(), 3);
        assert_eq!(read_str(&mut r, &mut buf).unwrap(), "tags");
        assert_eq!(read_array_len(&mut r).unwrap(), 2);
        for want in [&b"user:1"[..], b"\0\xff"] {
            let len = read_bin_len(&mut r).unwrap() as usize;
            assert_eq!(&r[..len], want);
            r = &r[len..];
        }
        assert!(r.is_empty());
    }

    #[test]
    fn reset_message() {
        let m = reset(b"id", 9);
        let mut r = &m[..];
        let mut buf = [0u8; 16];
        assert_eq!(read_map_len(&mut r).unwrap(), 5);
        for (k, check) in [("v", 0), ("run_id", 1), ("seq", 2), ("reset", 3), ("tags", 4)] {
            assert_eq!(read_str(&mut r, &mut buf).unwrap(), k);
            match check {
                0 => assert_eq!(read_int::<u64, _>(&mut r).unwrap(), 1),
                1 => assert_eq!(read_str(&mut r, &mut buf).unwrap(), "id"),
                2 => assert_eq!(read_int::<u64, _>(&mut r).unwrap(), 9),
                3 => assert!(read_bool(&mut r).unwrap()),
                _ => assert_eq!(read_array_len(&mut r).unwrap(), 0),
            }
        }
        assert!(r.is_empty());
    }
}
