//! Decoding of the invalidation and reset messages that `tiercache_core::message` encodes (format in
//! COMMANDS.md, "Invalidation messages"), and gap detection over `(run_id, seq)`.
//!
//! Fields are read by name, in any order; unknown fields are skipped. Anything that is not a well-formed
//! version-1 message decodes to an error, which the purger treats like a gap (a full purge).

use rmp::decode::{self, RmpRead};
use rmp::Marker;

/// One message from the invalidation channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub run_id: String,
    pub seq: u64,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// `TIERCACHE.INVALIDATE` of these tags in database `db`.
    Invalidation { db: u64, tags: Vec<Vec<u8>> },
    /// The dataset changed wholesale (flush, a replica's full resync): drop everything.
    Reset,
}

/// Why a payload is not a message this decoder accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "undecodable invalidation message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn err<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> DecodeError + '_ {
    move |e| DecodeError(format!("{what}: {e:?}"))
}

fn read_bytes<'a>(r: &mut &'a [u8], len: usize, what: &str) -> Result<&'a [u8], DecodeError> {
    if r.len() < len {
        return Err(DecodeError(format!("{what}: truncated")));
    }
    let (head, tail) = r.split_at(len);
    *r = tail;
    Ok(head)
}

fn read_string(r: &mut &[u8], what: &str) -> Result<String, DecodeError> {
    let len = decode::read_str_len(r).map_err(err(what))? as usize;
    let b = read_bytes(r, len, what)?;
    String::from_utf8(b.to_vec()).map_err(err(what))
}

/// A tag: bin as the module writes it, str accepted too.
fn read_tag(r: &mut &[u8]) -> Result<Vec<u8>, DecodeError> {
    let marker = decode::read_marker(r).map_err(err("tag"))?;
    let len = match marker {
        Marker::Bin8 => usize::from(r.read_data_u8().map_err(err("tag"))?),
        Marker::Bin16 | Marker::Str16 => usize::from(r.read_data_u16().map_err(err("tag"))?),
        Marker::Bin32 | Marker::Str32 => r.read_data_u32().map_err(err("tag"))? as usize,
        Marker::Str8 => usize::from(r.read_data_u8().map_err(err("tag"))?),
        Marker::FixStr(n) => usize::from(n),
        m => return Err(DecodeError(format!("tag: unexpected {m:?}"))),
    };
    Ok(read_bytes(r, len, "tag")?.to_vec())
}

/// Skips one value of any type (an unknown field).
fn skip_value(r: &mut &[u8], depth: u32) -> Result<(), DecodeError> {
    if depth > 16 {
        return Err(DecodeError("nested too deep".into()));
    }
    let marker = decode::read_marker(r).map_err(err("value"))?;
    let (skip, items) = match marker {
        Marker::Null | Marker::True | Marker::False | Marker::FixPos(_) | Marker::FixNeg(_) => (0, 0),
        Marker::U8 | Marker::I8 => (1, 0),
        Marker::U16 | Marker::I16 => (2, 0),
        Marker::U32 | Marker::I32 | Marker::F32 => (4, 0),
        Marker::U64 | Marker::I64 | Marker::F64 => (8, 0),
        Marker::FixStr(n) => (usize::from(n), 0),
        Marker::Str8 | Marker::Bin8 => (usize::from(r.read_data_u8().map_err(err("value"))?), 0),
        Marker::Str16 | Marker::Bin16 => (usize::from(r.read_data_u16().map_err(err("value"))?), 0),
        Marker::Str32 | Marker::Bin32 => (r.read_data_u32().map_err(err("value"))? as usize, 0),
        Marker::FixArray(n) => (0, usize::from(n)),
        Marker::Array16 => (0, usize::from(r.read_data_u16().map_err(err("value"))?)),
        Marker::Array32 => (0, r.read_data_u32().map_err(err("value"))? as usize),
        Marker::FixMap(n) => (0, 2 * usize::from(n)),
        Marker::Map16 => (0, 2 * usize::from(r.read_data_u16().map_err(err("value"))?)),
        Marker::Map32 => (0, 2 * r.read_data_u32().map_err(err("value"))? as usize),
        m => return Err(DecodeError(format!("unsupported {m:?}"))),
    };
    read_bytes(r, skip, "value")?;
    for _ in 0..items {
        skip_value(r, depth + 1)?;
    }
    Ok(())
}

/// Decodes one payload.
pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
    let mut r = payload;
    let n = decode::read_map_len(&mut r).map_err(err("map"))?;
    let (mut v, mut run_id, mut seq, mut db, mut tags, mut reset) = (None, None, None, None, None, false);
    for _ in 0..n {
        let key = read_string(&mut r, "field name")?;
        match key.as_str() {
            "v" => v = Some(decode::read_int::<u64, _>(&mut r).map_err(err("v"))?),
            "run_id" => run_id = Some(read_string(&mut r, "run_id")?),
            "seq" => seq = Some(decode::read_int::<u64, _>(&mut r).map_err(err("seq"))?),
            "db" => db = Some(decode::read_int::<u64, _>(&mut r).map_err(err("db"))?),
            "reset" => reset = decode::read_bool(&mut r).map_err(err("reset"))?,
            "tags" => {
                let len = decode::read_array_len(&mut r).map_err(err("tags"))?;
                let mut t = Vec::with_capacity((len as usize).min(r.len()));
                for _ in 0..len {
                    t.push(read_tag(&mut r)?);
                }
                tags = Some(t);
            }
            _ => skip_value(&mut r, 0)?,
        }
    }
    match v {
        Some(1) => {}
        other => return Err(DecodeError(format!("version {other:?}, expected 1"))),
    }
    let run_id = run_id.ok_or_else(|| DecodeError("no run_id".into()))?;
    let seq = seq.ok_or_else(|| DecodeError("no seq".into()))?;
    let body = if reset {
        Body::Reset
    } else {
        Body::Invalidation {
            db: db.ok_or_else(|| DecodeError("no db".into()))?,
            tags: tags.ok_or_else(|| DecodeError("no tags".into()))?,
        }
    };
    Ok(Message { run_id, seq, body })
}

/// Remembers the last `(run_id, seq)` to notice missed messages.
#[derive(Debug, Default)]
pub struct Follower {
    last: Option<(String, u64)>,
}

impl Follower {
    /// False when messages were missed since the previous one (another run id, or a seq other than the
    /// last plus one). The first message after [`Follower::forget`] (or of a new follower) is in order:
    /// the subscription was made before it, so nothing published since was missed.
    pub fn in_order(&mut self, m: &Message) -> bool {
        let ok = match &self.last {
            None => true,
            Some((id, seq)) => *id == m.run_id && m.seq == seq.wrapping_add(1),
        };
        self.last = Some((m.run_id.clone(), m.seq));
        ok
    }

    /// Starts over (after a full purge made on resubscribing).
    pub fn forget(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tiercache_core::message;

    #[test]
    fn decodes_what_core_encodes() {
        let m = decode(&message::invalidation(b"run1", 7, 3, &[b"user:1", b"\0\xff"])).unwrap();
        assert_eq!(
            m,
            Message {
                run_id: "run1".into(),
                seq: 7,
                body: Body::Invalidation { db: 3, tags: vec![b"user:1".to_vec(), b"\0\xff".to_vec()] }
            }
        );
        let r = decode(&message::reset(b"run1", 8)).unwrap();
        assert_eq!(r, Message { run_id: "run1".into(), seq: 8, body: Body::Reset });
        let long: Vec<u8> = vec![b'x'; 70_000];
        let m = decode(&message::invalidation(b"r", u64::MAX, 0, &[&long])).unwrap();
        assert_eq!(m.seq, u64::MAX);
        assert_eq!(m.body, Body::Invalidation { db: 0, tags: vec![long] });
    }

    #[test]
    fn by_name_in_any_order_with_unknown_fields() {
        use rmp::encode::*;
        let mut b = Vec::new();
        write_map_len(&mut b, 7).unwrap();
        write_str(&mut b, "tags").unwrap();
        write_array_len(&mut b, 1).unwrap();
        write_str(&mut b, "as-str").unwrap();
        write_str(&mut b, "extra").unwrap();
        write_map_len(&mut b, 1).unwrap();
        write_str(&mut b, "k").unwrap();
        write_array_len(&mut b, 2).unwrap();
        write_f64(&mut b, 1.5).unwrap();
        write_nil(&mut b).unwrap();
        write_str(&mut b, "db").unwrap();
        write_uint(&mut b, 2).unwrap();
        write_str(&mut b, "seq").unwrap();
        write_uint(&mut b, 300).unwrap();
        write_str(&mut b, "run_id").unwrap();
        write_str(&mut b, "x").unwrap();
        write_str(&mut b, "reset").unwrap();
        write_bool(&mut b, false).unwrap();
        write_str(&mut b, "v").unwrap();
        write_uint(&mut b, 1).unwrap();
        let m = decode(&b).unwrap();
        assert_eq!(m.seq, 300);
        assert_eq!(m.body, Body::Invalidation { db: 2, tags: vec![b"as-str".to_vec()] });
    }

    #[test]
    fn malformed_payloads_are_errors() {
        let good = message::invalidation(b"run1", 7, 3, &[b"user:1"]);
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(b"").is_err());
        assert!(decode(b"\x90").is_err());
        assert!(decode(b"\xc1").is_err());
        // Version 2 is not understood.
        let mut v2 = good.clone();
        assert_eq!(&v2[1..4], b"\xa1v\x01");
        v2[3] = 2;
        assert!(decode(&v2).unwrap_err().0.contains("version"));
        // A tag array claiming 2^32-1 elements must not allocate them.
        use rmp::encode::*;
        let mut b = Vec::new();
        write_map_len(&mut b, 1).unwrap();
        write_str(&mut b, "tags").unwrap();
        write_array_len(&mut b, u32::MAX).unwrap();
        assert!(decode(&b).is_err());
    }

    #[test]
    fn follower_spots_gaps_and_new_runs() {
        let msg = |run: &str, seq| Message { run_id: run.into(), seq, body: Body::Reset };
        let mut f = Follower::default();
        assert!(f.in_order(&msg("a", 5)));
        assert!(f.in_order(&msg("a", 6)));
        assert!(!f.in_order(&msg("a", 8)));
        assert!(f.in_order(&msg("a", 9)));
        assert!(!f.in_order(&msg("b", 10)));
        assert!(!f.in_order(&msg("b", 10)), "a repeat is out of order too");
        f.forget();
        assert!(f.in_order(&msg("c", 1)));
    }
}
