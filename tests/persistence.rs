//! Entries survive DEBUG RELOAD, RDB restarts and AOF restarts (with and without the RDB preamble,
//! after a rewrite and by replaying the logged commands) with identical values, tags, deadlines,
//! creation times and encodings; DEBUG DIGEST is stable; corrupt RESTORE payloads are refused.

#[macro_use]
mod common;

use std::thread::sleep;

use common::*;

proto_tests!(
    debug_reload_keeps_entries,
    rdb_restart_keeps_entries,
    aof_preamble_yes_rewrite_then_restart,
    aof_preamble_no_rewrite_then_restart,
    aof_preamble_yes_replay_without_rewrite,
    aof_preamble_no_replay_without_rewrite,
    crafted_restore_payloads_outside_set_limits_are_refused,
    restore_accepted_entries_survive_aof_without_preamble,
);

fn debug_reload_keeps_entries(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    populate(&mut c);
    let before = snapshot(&mut c);
    check_fixture(&before);
    let stats = aggregate_stats(&mut c);
    c.ok(&cmd!("DEBUG", "RELOAD"));
    check_against(&mut c, &before, &stats);
}

fn rdb_restart_keeps_entries(p: Proto) {
    let mut s = Server::start();
    let mut c = s.conn_proto(p);
    populate(&mut c);
    let before = snapshot(&mut c);
    check_fixture(&before);
    let stats = aggregate_stats(&mut c);
    c.ok(&cmd!("SAVE"));
    drop(c);
    s.restart();
    assert!(s.log().contains("DB loaded from disk"), "restart did not load the RDB:\n{}", s.log());
    let mut c = s.conn_proto(p);
    check_against(&mut c, &before, &stats);
}

fn aof_base_suffix(s: &Server) -> String {
    let dir = s.dir().join("appendonlydir");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.contains(".base.") {
            found.push(name);
        }
    }
    assert_eq!(found.len(), 1, "one base file in {found:?}");
    found[0].rsplit('.').next().unwrap().to_string()
}

fn aof_rewrite_then_restart(p: Proto, preamble: &str) {
    let mut s = Server::builder().args(&["--appendonly", "yes", "--aof-use-rdb-preamble", preamble]).start();
    s.wait_no_background_job();
    let mut c = s.conn_proto(p);
    populate(&mut c);
    let stats_pre = aggregate_stats(&mut c);
    let snap_pre = snapshot(&mut c);
    c.run(&cmd!("BGREWRITEAOF"));
    s.wait_no_background_job();
    let base = aof_base_suffix(&s);
    assert_eq!(base, if preamble == "yes" { "rdb" } else { "aof" }, "AOF base file format");
    // The rewrite itself must not change anything.
    check_against(&mut c, &snap_pre, &stats_pre);
    // More writes after the rewrite go to the incremental file.
    c.set("after", "written after the rewrite", &["PX", "70000", "STALE", "3", "TAGS", "1", "post"]);
    assert_eq!(c.int(&cmd!("PEXPIRE", "plain", 400_000)), 1);
    let after_meta = c.meta("after").unwrap().stable();
    let plain_meta = c.meta("plain").unwrap().stable();
    let before = snapshot(&mut c);
    let stats = aggregate_stats(&mut c);
    sleep(ms(150));
    drop(c);
    s.restart();
    let mut c = s.conn_proto(p);
    check_against(&mut c, &before, &stats);
    assert_eq!(c.meta("after").unwrap().stable(), after_meta);
    assert_eq!(c.meta("plain").unwrap().stable(), plain_meta);
    assert_eq!(c.get("after").as_deref(), Some(&b"written after the rewrite"[..]));
}

fn aof_preamble_yes_rewrite_then_restart(p: Proto) {
    aof_rewrite_then_restart(p, "yes");
}

fn aof_preamble_no_rewrite_then_restart(p: Proto) {
    aof_rewrite_then_restart(p, "no");
}

/// Restart from the commands logged as they were executed (no rewrite after the writes): relative
/// TTLs must have been logged as absolute times, or the deadlines would move.
fn aof_replay_without_rewrite(p: Proto, preamble: &str) {
    let mut s = Server::builder().args(&["--appendonly", "yes", "--aof-use-rdb-preamble", preamble]).start();
    s.wait_no_background_job();
    let mut c = s.conn_proto(p);
    populate(&mut c);
    let before = snapshot(&mut c);
    check_fixture(&before);
    let stats = aggregate_stats(&mut c);
    // Time passes between the writes and the replay.
    sleep(ms(250));
    drop(c);
    s.restart();
    let mut c = s.conn_proto(p);
    check_against(&mut c, &before, &stats);
}

fn aof_preamble_yes_replay_without_rewrite(p: Proto) {
    aof_replay_without_rewrite(p, "yes");
}

fn aof_preamble_no_replay_without_rewrite(p: Proto) {
    aof_replay_without_rewrite(p, "no");
}

#[test]
fn aof_restart_twice_after_rewrite_with_and_without_preamble() {
    // Rewrite with one setting, restart, rewrite again with the other, restart again.
    let mut s = Server::builder().args(&["--appendonly", "yes", "--aof-use-rdb-preamble", "no"]).start();
    s.wait_no_background_job();
    let mut c = s.conn();
    populate(&mut c);
    let before = snapshot(&mut c);
    let stats = aggregate_stats(&mut c);
    c.run(&cmd!("BGREWRITEAOF"));
    s.wait_no_background_job();
    drop(c);
    s.restart();
    let mut c = s.conn();
    check_against(&mut c, &before, &stats);
    c.ok(&cmd!("CONFIG", "SET", "aof-use-rdb-preamble", "yes"));
    c.run(&cmd!("BGREWRITEAOF"));
    s.wait_no_background_job();
    assert_eq!(aof_base_suffix(&s), "rdb");
    drop(c);
    s.restart_with_args(&["--aof-use-rdb-preamble", "yes"]);
    let mut c = s.conn();
    check_against(&mut c, &before, &stats);
}

/// The logged commands replay to the same entries even when the restarted server has other configs
/// (encoding and tags are what was stored, not re-derived from the new server's settings).
#[test]
fn aof_replay_is_independent_of_configs_at_restart() {
    let mut s = Server::builder().args(&["--appendonly", "yes"]).start();
    s.wait_no_background_job();
    let mut c = s.conn();
    c.ok(&cmd!("TIERCACHE.SET", "raw200", compressible(200), "PX", 100000));
    c.ok(&cmd!("TIERCACHE.SET", "lz2000", compressible(2000), "TAGS", 1, "t"));
    c.set("tags5", "v", &["TAGS", "5", "t1", "t2", "t3", "t4", "t5", "STALE", "9", "EX", "100"]);
    let keys = ["raw200", "lz2000", "tags5"];
    let before: Vec<Option<StableMeta>> = keys.iter().map(|k| c.meta(*k).map(|m| m.stable())).collect();
    assert_eq!(before[0].as_ref().unwrap().encoding, "raw");
    assert_eq!(before[1].as_ref().unwrap().encoding, "lz4");
    drop(c);
    s.restart_with_args(&["--tiercache.compress-min-size", "64", "--tiercache.max-tags", "2"]);
    let mut c = s.conn();
    assert_eq!(c.config_get("tiercache.max-tags"), "2");
    let after: Vec<Option<StableMeta>> = keys.iter().map(|k| c.meta(*k).map(|m| m.stable())).collect();
    let mut problems = Vec::new();
    for ((k, b), a) in keys.iter().zip(&before).zip(&after) {
        if a != b {
            problems.push(format!("{k}: before {b:?}\n   after AOF replay {a:?}"));
        }
    }
    assert!(problems.is_empty(), "entries changed by replaying the AOF under other configs:\n{}", problems.join("\n"));
}

#[test]
fn debug_digest_unchanged_across_reload() {
    let s = Server::start();
    let mut c = s.conn();
    populate(&mut c);
    let keys: Vec<Vec<u8>> = fixture_keys().into_iter().filter(|(db, _)| *db == 0).map(|(_, k)| k).collect();
    let digest_values = |c: &mut Conn| -> Vec<String> {
        let mut cm = cmd!("DEBUG", "DIGEST-VALUE");
        for k in &keys {
            cm.arg(&k[..]);
        }
        let v = c.run(&cm);
        as_list(&v).unwrap().iter().map(|d| as_string(d).unwrap()).collect()
    };
    let d_before = c.string(&cmd!("DEBUG", "DIGEST")).unwrap();
    let dv_before = digest_values(&mut c);
    assert_ne!(d_before, "0".repeat(40), "dataset digest of a non-empty dataset");
    c.ok(&cmd!("DEBUG", "RELOAD"));
    assert_eq!(c.string(&cmd!("DEBUG", "DIGEST")).unwrap(), d_before, "DEBUG DIGEST changed across DEBUG RELOAD");
    assert_eq!(digest_values(&mut c), dv_before, "DEBUG DIGEST-VALUE changed across DEBUG RELOAD");
}

#[test]
fn debug_digest_value_depends_on_the_entry() {
    let s = Server::start();
    let mut c = s.conn();
    // Same CREATED so that "a" and "c" are the same entry.
    c.set("a", "value one", &["CREATED", "1"]);
    c.set("b", "value two", &["CREATED", "1"]);
    c.set("c", "value one", &["CREATED", "1"]);
    let dv = |c: &mut Conn, k: &str| -> String {
        let v = c.run(&cmd!("DEBUG", "DIGEST-VALUE", k));
        as_string(&as_list(&v).unwrap()[0]).unwrap()
    };
    let a = dv(&mut c, "a");
    assert_ne!(a, dv(&mut c, "b"), "different values, same digest");
    assert_eq!(a, dv(&mut c, "c"), "same entry content, different digest");
    let d1 = c.string(&cmd!("DEBUG", "DIGEST")).unwrap();
    c.set("a", "value changed", &["CREATED", "1"]);
    assert_ne!(dv(&mut c, "a"), a, "overwrite did not change DIGEST-VALUE");
    assert_ne!(c.string(&cmd!("DEBUG", "DIGEST")).unwrap(), d1, "overwrite did not change DEBUG DIGEST");
}

/// Redis's CRC-64 (Jones polynomial, reflected, init 0), as used in the DUMP footer.
fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0x95AC_9329_AC4B_C9B5;
    let mut crc: u64 = 0;
    for &b in data {
        crc ^= b as u64;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
        }
    }
    crc
}

/// Re-seals a DUMP body (type byte + value + 2-byte RDB version) with a valid CRC.
fn seal(body_and_version: &[u8]) -> Vec<u8> {
    let mut out = body_and_version.to_vec();
    out.extend_from_slice(&crc64(body_and_version).to_le_bytes());
    out
}

/// Reads an RDB length; returns (value, is_special_encoding), `None` past the end.
fn read_len(b: &[u8], i: &mut usize) -> Option<(u64, bool)> {
    let t = *b.get(*i)?;
    *i += 1;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(*i..*i + n)?;
        *i += n;
        Some(s)
    };
    Some(match t >> 6 {
        0 => ((t & 0x3f) as u64, false),
        1 => ((((t & 0x3f) as u64) << 8) | take(1)?[0] as u64, false),
        2 if t == 0x80 => (u32::from_be_bytes(take(4)?.try_into().unwrap()) as u64, false),
        2 if t == 0x81 => (u64::from_be_bytes(take(8)?.try_into().unwrap()), false),
        3 => ((t & 0x3f) as u64, true),
        _ => return None,
    })
}

#[derive(Debug)]
struct Field {
    opcode: u64,
    /// Byte range of the field's value (after the opcode).
    start: usize,
    end: usize,
}

/// Splits a DUMP payload of a module value into its module fields (opcode + value): type byte 7
/// (module, v2), 64-bit module id, fields, EOF opcode, 2-byte version, 8-byte CRC. `None` when the
/// payload is not structurally complete.
fn try_module_fields(payload: &[u8]) -> Option<Vec<Field>> {
    if *payload.first()? != 7 {
        return None;
    }
    let mut i = 1;
    read_len(payload, &mut i)?; // module id
    let mut fields = Vec::new();
    loop {
        let (opcode, _) = read_len(payload, &mut i)?;
        if opcode == 0 {
            break;
        }
        let start = i;
        match opcode {
            1 | 2 => {
                read_len(payload, &mut i)?;
            }
            3 => i += 4,
            4 => i += 8,
            5 => {
                let (n, enc) = read_len(payload, &mut i)?;
                if enc {
                    match n {
                        0 => i += 1,
                        1 => i += 2,
                        2 => i += 4,
                        3 => {
                            let (clen, _) = read_len(payload, &mut i)?;
                            read_len(payload, &mut i)?;
                            i += clen as usize;
                        }
                        _ => return None,
                    }
                } else {
                    i += n as usize;
                }
            }
            _ => return None,
        }
        if i > payload.len() {
            return None;
        }
        fields.push(Field { opcode, start, end: i });
    }
    // Redis parses the value out of the whole buffer, footer included.
    (i <= payload.len()).then_some(fields)
}

fn module_fields(payload: &[u8]) -> Vec<Field> {
    let f = try_module_fields(payload).unwrap_or_else(|| panic!("cannot parse DUMP payload {payload:02x?}"));
    let end = f.last().map(|x| x.end).unwrap_or(0);
    assert_eq!(end + 1 + 2 + 8, payload.len(), "EOF, then 2-byte version and 8-byte CRC");
    f
}

/// Replaces the value bytes of field `f` with `new` and re-seals the payload.
fn with_field(payload: &[u8], f: &Field, new: &[u8]) -> Vec<u8> {
    let body = &payload[..payload.len() - 8];
    let mut out = body[..f.start].to_vec();
    out.extend_from_slice(new);
    out.extend_from_slice(&body[f.end..]);
    seal(&out)
}

#[test]
fn corrupt_or_truncated_restore_payload_is_refused() {
    assert_eq!(crc64(b"123456789"), 0xe9c6_d914_c4b8_d9ca, "crc64 self-check");
    let s = Server::start();
    let mut c = s.conn();
    c.set("k", "hello", &["TAGS", "2", "a", "bb", "CREATED", "1700000000000", "PX", "100000"]);
    let payload = c.bytes(&cmd!("DUMP", "k")).unwrap();
    let n = payload.len();
    assert_eq!(seal(&payload[..n - 8]), payload, "re-sealing an intact payload reproduces it");
    c.ok(&cmd!("RESTORE", "intact", 0, &payload));
    assert_eq!(c.get("intact").as_deref(), Some(&b"hello"[..]));

    let refuse = |c: &mut Conn, what: &str, bad: &[u8]| {
        let r = c.try_run(&cmd!("RESTORE", "bad", 0, bad));
        assert!(r.is_err(), "{what}: RESTORE accepted a corrupt payload: {r:?}");
        assert_eq!(c.string(&cmd!("PING")).as_deref(), Some("PONG"), "{what}: server down");
        assert!(!c.exists("bad"), "{what}: key created");
    };

    // Flipped bytes without fixing the CRC (Redis's own check).
    for pos in [0, 12, n / 2, n - 12, n - 1] {
        let mut bad = payload.clone();
        bad[pos] ^= 0x5a;
        refuse(&mut c, &format!("flip at {pos}"), &bad);
    }
    // Truncated payloads with a valid footer: every cut inside the module value.
    let nfields = module_fields(&payload).len();
    let mut refused = 0;
    for cut in 1..n - 10 {
        let mut body = payload[..cut].to_vec();
        body.extend_from_slice(&payload[n - 10..n - 8]);
        let sealed = seal(&body);
        // A cut inside the last string can leave a payload that still parses (the version bytes
        // complete the string and supply an EOF marker): that one is a valid, different entry.
        if try_module_fields(&sealed).is_some_and(|f| f.len() == nfields) {
            let _ = c.try_run(&cmd!("RESTORE", "coincidence", 0, &sealed, "REPLACE"));
            assert_eq!(c.string(&cmd!("PING")).as_deref(), Some("PONG"));
            c.int(&cmd!("DEL", "coincidence"));
            continue;
        }
        refuse(&mut c, &format!("truncated to {cut} bytes"), &sealed);
        refused += 1;
    }
    assert!(refused >= n - 14, "only {refused} truncations exercised");
    // Raw truncation (no valid footer).
    for cut in [0, 1, 5, n / 2, n - 1] {
        refuse(&mut c, &format!("raw cut {cut}"), &payload[..cut]);
    }
    // Field-level corruption with a valid CRC: the module must refuse the value.
    let fields = module_fields(&payload);
    assert!(fields.len() >= 6, "module fields: {fields:?}");
    assert!(fields.iter().any(|f| f.opcode == 5), "a string field: {fields:?}");
    // Only small unsigned fields are rewritten; their position is taken from the stream.
    let small_uint = |f: &Field| f.opcode == 2 && f.end - f.start == 1;
    let first = &fields[0];
    assert!(small_uint(first), "first field is a small unsigned: {first:?}");
    refuse(&mut c, "unknown encoding code", &with_field(&payload, first, &[9]));
    // Another field count than written: the value is not followed by the EOF marker, or fields run out.
    let last_uint = fields.iter().rfind(|f| small_uint(f) && payload[f.start] == 2);
    if let Some(tag_count) = last_uint {
        refuse(&mut c, "tag count larger than the tags", &with_field(&payload, tag_count, &[40]));
        refuse(&mut c, "tag count smaller than the tags", &with_field(&payload, tag_count, &[0]));
    } else {
        panic!("no tag-count field holding 2 in {fields:?}");
    }
    // Original size that disagrees with the raw bytes (5).
    let size = fields.iter().find(|f| small_uint(f) && payload[f.start] == 5).expect("size field holding 5");
    refuse(&mut c, "size disagreeing with the stored bytes", &with_field(&payload, size, &[6]));
    // A field of the wrong kind: a string where an unsigned is expected.
    let mut bad = payload[..first.start - 1].to_vec();
    bad.extend_from_slice(&[5, 1, b'x']);
    bad.extend_from_slice(&payload[first.end..n - 8]);
    refuse(&mut c, "string instead of unsigned", &seal(&bad));

    // The intact copy and the original are untouched; the server is fine.
    assert_eq!(c.get("k").as_deref(), Some(&b"hello"[..]));
    assert_eq!(c.get("intact").as_deref(), Some(&b"hello"[..]));
    assert_eq!(c.stats().get("entries"), 2);
}

#[test]
fn restore_of_compressed_entry_into_fresh_server_and_bad_frame_refused() {
    // A DUMP taken on one server restores on another with identical META.
    // rdbcompression off so the stored bytes appear verbatim in the DUMP payload.
    let a = Server::builder().args(&["--rdbcompression", "no"]).start();
    let b = Server::start();
    let mut ca = a.conn();
    let mut cb = b.conn();
    ca.ok(&cmd!("TIERCACHE.SET", "k", compressible(6000), "PX", 100000, "STALE", 20, "TAGS", 1, "t", "CREATED", 77));
    let meta = ca.meta("k").unwrap().stable();
    let payload = ca.bytes(&cmd!("DUMP", "k")).unwrap();
    cb.ok(&cmd!("RESTORE", "k", meta.expire_at_ms, &payload, "ABSTTL"));
    assert_eq!(cb.meta("k").unwrap().stable(), meta);
    assert_eq!(cb.get("k"), Some(compressible(6000)));

    // Corrupting the lz4 frame header inside the stored bytes (valid CRC) is refused.
    let fields = module_fields(&payload);
    let data = fields.iter().find(|f| f.opcode == 5).expect("stored bytes field");
    let mut i = data.start;
    let (len, enc) = read_len(&payload, &mut i).unwrap();
    assert!(!enc, "stored bytes saved as a plain string");
    let frame = &payload[i..i + len as usize];
    let mut bad_frame = frame.to_vec();
    bad_frame[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut field = payload[data.start..i].to_vec();
    field.extend_from_slice(&bad_frame);
    let bad = with_field(&payload, data, &field);
    let r = cb.try_run(&cmd!("RESTORE", "bad", 0, &bad));
    assert!(r.is_err(), "RESTORE accepted an entry whose lz4 header is corrupt: {r:?}");
    assert_eq!(cb.string(&cmd!("PING")).as_deref(), Some("PONG"));
    assert!(!cb.exists("bad"));
}

/// One module field of a crafted DUMP payload.
#[derive(Clone, Debug)]
enum F {
    U(u64),
    S(i64),
    B(Vec<u8>),
}

/// An RDB length (the encoding `read_len` reads back).
fn rdb_len(out: &mut Vec<u8>, v: u64) {
    if v < 64 {
        out.push(v as u8);
    } else if v < 16384 {
        out.extend_from_slice(&[0x40 | (v >> 8) as u8, v as u8]);
    } else if v <= u32::MAX as u64 {
        out.push(0x80);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0x81);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// The fields of a tiercache entry in encoding version 2 (see core/src/persist.rs).
fn entry_fields(encoding: u64, fresh_until: i64, created: i64, size: u64, data: &[u8], tags: &[Vec<u8>]) -> Vec<F> {
    let mut f = vec![F::U(encoding), F::S(fresh_until), F::S(created), F::U(size), F::B(data.to_vec()), F::U(tags.len() as u64)];
    f.extend(tags.iter().map(|t| F::B(t.clone())));
    f.push(F::U(0));
    f
}

/// A DUMP payload with the module header (type byte and module id) of a real `dump`, the given fields,
/// the EOF marker, the real dump's RDB version and a valid CRC.
fn craft(dump: &[u8], fields: &[F]) -> Vec<u8> {
    let first = &module_fields(dump)[0];
    let n = dump.len();
    // The first field's opcode (2, unsigned) is one byte just before its value.
    let mut out = dump[..first.start - 1].to_vec();
    for f in fields {
        match f {
            F::U(v) => {
                out.push(2);
                rdb_len(&mut out, *v);
            }
            // RedisModule_SaveSigned writes the two's-complement bits as an unsigned field.
            F::S(v) => {
                out.push(2);
                rdb_len(&mut out, *v as u64);
            }
            F::B(b) => {
                out.push(5);
                rdb_len(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
        }
    }
    out.push(0);
    out.extend_from_slice(&dump[n - 10..n - 8]);
    seal(&out)
}

fn distinct_tags(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("tag:{i}").into_bytes()).collect()
}

const BAD_FORMAT: &str = "ERR Bad data format";

/// A real DUMP of a small entry, used for its module header and RDB version.
fn template(c: &mut Conn) -> Vec<u8> {
    c.set("template", "v", &["TAGS", "1", "t"]);
    c.bytes(&cmd!("DUMP", "template")).unwrap()
}

/// Crafted entries that `TIERCACHE.SET` would refuse (so an AOF replay would drop them).
fn refused_cases() -> Vec<(&'static str, Vec<F>)> {
    let value = compressible(6000);
    let frame = lz4_frame(&value);
    let mut corrupt_body = frame.clone();
    corrupt_body.truncate(frame.len() - 3);
    let mut corrupt_header = frame.clone();
    corrupt_header[..4].copy_from_slice(&(600u32 << 20).to_le_bytes());
    // A plausible header (within lz4's ratio for the body's length) over a body that cannot produce it.
    let mut bomb_header = vec![0u8; 4];
    bomb_header[..4].copy_from_slice(&(512u32 << 20).to_le_bytes());
    bomb_header.extend(std::iter::repeat_n(0x11u8, (512 << 20) / 255 + 1));
    let one = vec![b"t".to_vec()];
    let far = 4_102_444_800_000; // 2100-01-01
    vec![
        ("65,536 tags", entry_fields(0, -1, 1, 1, b"v", &distinct_tags(65_536))),
        ("1,025 tags (above the hard maximum of tiercache.max-tags)", entry_fields(0, -1, 1, 1, b"v", &distinct_tags(1025))),
        ("negative creation time", entry_fields(0, -1, -1, 1, b"v", &one)),
        ("fresh deadline 0", entry_fields(0, 0, 1, 1, b"v", &one)),
        ("fresh deadline -2", entry_fields(0, -2, 1, 1, b"v", &one)),
        ("unknown encoding", entry_fields(7, far, 1, 1, b"v", &one)),
        ("lz4 body that does not decode", entry_fields(1, far, 1, value.len() as u64, &corrupt_body, &one)),
        ("lz4 header announcing 600 MiB", entry_fields(1, far, 1, 600 << 20, &corrupt_header, &one)),
        ("lz4 header announcing 512 MiB over 2 MiB of garbage", entry_fields(1, far, 1, 512 << 20, &bomb_header, &one)),
        ("declared size longer than the lz4 frame's", entry_fields(1, far, 1, value.len() as u64 + 1, &frame, &one)),
        ("declared size longer than the raw bytes", entry_fields(0, far, 1, 2, b"v", &one)),
        ("empty tag", entry_fields(0, far, 1, 1, b"v", &[b"t".to_vec(), Vec::new()])),
    ]
}

/// Payloads that `TIERCACHE.SET` (and so AOF replay) would refuse must be refused by RESTORE too,
/// cleanly: an error, no key, the server up. Before: RESTORE accepted most of them, and an AOF restart
/// without the RDB preamble silently dropped them.
fn crafted_restore_payloads_outside_set_limits_are_refused(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let dump = template(&mut c);
    let value = compressible(6000);
    let frame = lz4_frame(&value);
    let one = vec![b"t".to_vec()];
    let far = 4_102_444_800_000;
    for (what, fields) in &refused_cases() {
        let payload = craft(&dump, fields);
        let t = std::time::Instant::now();
        let r = c.try_run(&cmd!("RESTORE", "bad", 0, &payload));
        eprintln!("RESTORE {what}: {:.3} s", t.elapsed().as_secs_f64());
        assert_eq!(r, Err(BAD_FORMAT.to_string()), "{what}");
        assert_eq!(c.string(&cmd!("PING")).as_deref(), Some("PONG"), "{what}: server down");
        assert!(!c.exists("bad"), "{what}: key created");
        // A lease read finds nothing to serve: it is asked to fill (before, a corrupt lz4 entry answered
        // HIT with a nil value).
        let v = c.run(&cmd!("TIERCACHE.GET", "bad", "LEASE", 1000));
        assert_eq!(as_string(&as_list(&v).unwrap()[0]).as_deref(), Some("FILL"), "{what}");
        c.int(&cmd!("TIERCACHE.RELEASE", "bad", as_string(&as_list(&v).unwrap()[2]).unwrap()));
    }
    // The same crafting with sane fields is accepted (the refusals above are about the fields).
    c.ok(&cmd!("RESTORE", "good", 0, craft(&dump, &entry_fields(1, far, 1, value.len() as u64, &frame, &one))));
    assert_eq!(c.get("good"), Some(value));
    assert_eq!(c.stats().get("entries"), 2);
}

/// A corrupt entry in an RDB file (a valid file checksum over a negative creation time) makes the
/// server refuse to start, with the module's reason in the log: it is not loaded half-valid, and Redis
/// is not brought down by a signal.
#[test]
fn corrupt_rdb_entry_fails_the_load_cleanly() {
    let mut s = Server::builder().args(&["--rdbcompression", "no"]).start();
    let mut c = s.conn();
    // A creation time whose RDB encoding (0x81 + 8 big-endian bytes) is easy to find in the file.
    c.set("k", "v", &["TAGS", "1", "t", "CREATED", "72623859790382856"]);
    c.ok(&cmd!("SAVE"));
    drop(c);
    s.stop();
    let path = s.dir().join("dump.rdb");
    let mut rdb = std::fs::read(&path).unwrap();
    let needle = [0x81, 1, 2, 3, 4, 5, 6, 7, 8];
    let at = rdb.windows(needle.len()).position(|w| w == needle).expect("creation time in dump.rdb");
    rdb[at + 1..at + 9].copy_from_slice(&(-1i64).to_be_bytes());
    let n = rdb.len();
    let crc = crc64(&rdb[..n - 8]);
    rdb[n - 8..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &rdb).unwrap();
    let dir = s.dir().display().to_string();
    let err = match Server::builder().args(&["--dir", &dir]).try_start() {
        Ok(_) => panic!("the server started from an RDB holding a corrupt entry"),
        Err(e) => e,
    };
    // Redis stops the load and exits (after running its own RDB check, whose status it exits with):
    // an exit, not a signal, and no crash report.
    assert!(err.contains("exited with exit status"), "not an exit: {err}");
    assert!(!err.contains("crashed by signal") && !err.contains("BUG REPORT"), "crashed: {err}");
    assert!(err.contains("Internal error in RDB reading"), "load not stopped: {err}");
    assert!(err.contains("cannot load entry: invalid entry: creation time"), "no reason logged: {err}");
}

/// Whatever RESTORE accepts, an AOF restart without the RDB preamble (a rewrite into TIERCACHE.SET
/// commands, then their replay) brings back identically: no entry may vanish because the replayed
/// SET is stricter than the load.
fn restore_accepted_entries_survive_aof_without_preamble(p: Proto) {
    let mut s = Server::builder().args(&["--appendonly", "yes", "--aof-use-rdb-preamble", "no"]).start();
    s.wait_no_background_job();
    let mut c = s.conn_proto(p);
    let dump = template(&mut c);
    c.int(&cmd!("DEL", "template"));
    let value = compressible(6000);
    let frame = lz4_frame(&value);
    let mut repeated = distinct_tags(1000);
    repeated.extend(distinct_tags(24));
    let cases: Vec<(&str, Vec<F>)> = vec![
        ("1,024 tags", entry_fields(0, -1, 1, 1, b"v", &distinct_tags(1024))),
        ("1,024 tags, 1,000 distinct", entry_fields(0, -1, 1, 1, b"v", &repeated)),
        ("created 0", entry_fields(0, -1, 0, 1, b"v", &[b"t".to_vec()])),
        ("fresh deadline 1 (long stale)", entry_fields(0, 1, 5, 1, b"v", &[])),
        ("fresh deadline far away", entry_fields(0, i64::MAX, 5, 1, b"v", &[])),
        ("lz4 frame", entry_fields(1, 4_102_444_800_000, 7, value.len() as u64, &frame, &[b"a".to_vec(), b"\0b".to_vec()])),
        ("empty lz4 frame", entry_fields(1, -1, 7, 0, &lz4_frame(b""), &[])),
        ("empty raw value", entry_fields(0, -1, 7, 0, b"", &[b"e".to_vec()])),
    ];
    let mut before = Vec::new();
    for (i, (what, fields)) in cases.iter().enumerate() {
        let key = format!("k{i}");
        c.ok(&cmd!("RESTORE", &key, 0, craft(&dump, fields)));
        let meta = c.meta(&key).unwrap_or_else(|| panic!("{what}: no META")).stable();
        before.push((what.to_string(), key.clone(), meta, c.get_encoded(&key)));
    }
    // Whatever else RESTORE accepts must survive too (the 65,536-tag payload is left out: before the
    // load was fixed, its RESTORE alone outlasted the client's timeout).
    let mut accepted = 0;
    for (i, (what, fields)) in refused_cases().into_iter().enumerate().filter(|(_, (w, _))| !w.starts_with("65,536")) {
        let key = format!("crafted{i}");
        if c.try_run(&cmd!("RESTORE", &key, 0, craft(&dump, &fields))).is_ok() {
            accepted += 1;
            let meta = c.meta(&key).map(|m| m.stable());
            let encoded = c.try_run(&cmd!("TIERCACHE.GET", &key, "ENCODED")).ok().and_then(|_| c.get_encoded(&key));
            before.push((format!("crafted: {what}"), key, meta.unwrap_or_else(|| panic!("{what}: no META")), encoded));
        }
    }
    c.run(&cmd!("BGREWRITEAOF"));
    s.wait_no_background_job();
    assert_eq!(aof_base_suffix(&s), "aof");
    drop(c);
    s.restart();
    let mut c = s.conn_proto(p);
    for (what, key, meta, encoded) in &before {
        let back = c.meta(key).unwrap_or_else(|| panic!("{what}: {key} vanished on the AOF restart"));
        assert_eq!(&back.stable(), meta, "{what}");
        assert_eq!(&c.get_encoded(key), encoded, "{what}");
    }
    assert_eq!(c.stats().get("entries"), (cases.len() + accepted) as i64);
}
