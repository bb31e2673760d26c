//! TIERCACHE.SET / GET / META / STATS semantics, errors, native commands on entries, command metadata,
//! ACL and RESP3 client tracking. Every test starts its own redis-server with the module loaded.

#[macro_use]
mod common;

use std::sync::mpsc;
use std::thread::sleep;

use common::*;

proto_tests!(
    set_get_meta_basic,
    get_and_meta_of_missing_key,
    fresh_stale_gone,
    fresh_period_without_stale_deletes_key,
    ttl_is_fresh_plus_stale,
    expire_option_forms,
    keepttl,
    overwrite_replaces_everything,
    compression_default_threshold,
    nocompress_and_incompressible_stay_raw,
    encoding_lz4_round_trip,
    encoding_raw_is_verbatim,
    bad_lz4_frame_header,
    binary_keys_values_tags,
    empty_value_and_empty_key,
    tags_dedup_order_and_limits,
    options_any_order_and_case,
    created_option,
    wrongtype_on_native_keys,
    set_errors_exact_text_and_nothing_written,
    get_option_errors,
    meta_reply_shape,
    stats_counters,
    stats_equal_info_section,
    stats_cover_all_dbs_and_flush,
    native_del_unlink_exists_type,
    native_expire_persist,
    persisted_entry_turns_stale_and_stays,
    native_rename,
    native_copy,
    native_move,
    native_dump_restore,
    native_memory_usage,
    command_info_and_docs,
    ok_reply_with_and_without_select,
);

/// TIERCACHE.SET's `+OK` is a call reply the module keeps from load (made with `SELECT 0`, see
/// src/reply.rs): a simple string in RESP2 and RESP3, also inside MULTI and from Lua; with SELECT
/// renamed away the module still loads and answers the plain `+OK`. The raw bytes are checked too, so
/// a bulk "OK" would not pass.
fn ok_reply_with_and_without_select(p: Proto) {
    for builder in [Server::builder(), Server::builder().args(&["--rename-command", "SELECT", ""])] {
        let s = builder.start();
        let mut c = s.conn_proto(p);
        c.ok(&cmd!("TIERCACHE.SET", "k", "v"));
        assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]));
        c.ok(&cmd!("MULTI"));
        c.run(&cmd!("TIERCACHE.SET", "k2", "v2"));
        let exec = c.run(&cmd!("EXEC"));
        assert!(matches!(&exec, redis::Value::Array(v) if v.len() == 1 && is_ok(&v[0])), "EXEC: {exec:?}");
        let lua = c.run(&cmd!("EVAL", "return redis.call('TIERCACHE.SET', KEYS[1], 'v3')", "1", "k3"));
        assert!(is_ok(&lua), "from Lua: {lua:?}");
        let hello = if p == Proto::Resp3 { &b"HELLO 3\r\n"[..] } else { &b""[..] };
        let raw = s.raw_exchange(&[hello, &b"TIERCACHE.SET k4 v4\r\nPING\r\n"[..]].concat(), b"+PONG\r\n");
        assert!(raw.ends_with(b"+OK\r\n+PONG\r\n"), "raw reply: {:?}", String::from_utf8_lossy(&raw));
    }
}

fn set_get_meta_basic(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let t0 = now_ms();
    c.ok(&cmd!("TIERCACHE.SET", "k", "hello"));
    let t1 = now_ms();
    assert_eq!(c.get("k").as_deref(), Some(&b"hello"[..]));
    let m = c.meta("k").expect("meta");
    assert_eq!(m.state, "fresh");
    assert_eq!(m.fresh_ttl_ms, -1);
    assert_eq!(m.stale_ttl_ms, -1);
    assert_eq!(m.fresh_until_ms, -1);
    assert_eq!(m.expire_at_ms, -1);
    assert!(m.tags.is_empty());
    assert_eq!(m.encoding, "raw");
    assert_eq!(m.size, 5);
    assert_eq!(m.stored_size, 5);
    assert!(m.created_ms >= t0 - 1 && m.created_ms <= t1 + 1, "created_ms {} not in [{t0},{t1}]", m.created_ms);
    assert_eq!(c.pttl("k"), -1);
    assert_eq!(c.string(&cmd!("TYPE", "k")).as_deref(), Some("tiercache"));
    // GET ENCODED of a raw entry.
    assert_eq!(c.get_encoded("k"), Some(("raw".to_string(), b"hello".to_vec())));
}

fn get_and_meta_of_missing_key(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    assert_eq!(c.get("nope"), None);
    assert_eq!(c.get_encoded("nope"), None);
    assert_eq!(c.meta("nope"), None);
    assert_eq!(c.raw(&cmd!("TIERCACHE.META", "nope")), Value::Nil);
}

fn fresh_stale_gone(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let t0 = now_ms();
    c.set("k", "v", &["PX", "300", "STALE", "1"]);
    let t1 = now_ms();
    assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]));
    let m = c.meta("k").unwrap();
    assert_eq!(m.state, "fresh");
    assert!(m.fresh_ttl_ms > 0 && m.fresh_ttl_ms <= 300, "fresh_ttl_ms {}", m.fresh_ttl_ms);
    assert!(m.stale_ttl_ms > 1000 && m.stale_ttl_ms <= 1300, "stale_ttl_ms {}", m.stale_ttl_ms);
    assert!(m.fresh_until_ms >= t0 + 300 && m.fresh_until_ms <= t1 + 300, "fresh_until_ms {}", m.fresh_until_ms);
    assert_eq!(m.expire_at_ms, m.fresh_until_ms + 1000, "expire_at = fresh_until + stale");

    // Past the fresh period: stale (a miss for GET, but still there).
    sleep(ms(400));
    assert_eq!(c.get("k"), None, "stale entry must read as a miss");
    assert_eq!(c.get_encoded("k"), None, "stale entry must read as a miss with ENCODED too");
    let m2 = c.meta("k").expect("stale entry still has META");
    assert_eq!(m2.state, "stale");
    assert_eq!(m2.fresh_ttl_ms, 0);
    assert!(m2.stale_ttl_ms > 0 && m2.stale_ttl_ms <= 1000, "stale_ttl_ms {}", m2.stale_ttl_ms);
    assert_eq!(m2.stable(), StableMeta { state: "stale".into(), ..m.stable() });
    assert!(c.exists("k"));
    let pttl = c.pttl("k");
    assert!(pttl > 0 && pttl <= 1000, "PTTL {pttl}");

    // Past the stale window: gone.
    assert!(wait_until(ms(2000), || c.meta("k").is_none()), "entry not gone after its stale window");
    assert!(now_ms() >= m.expire_at_ms - 5, "gone before its expire_at_ms");
    assert!(!c.exists("k"));
    assert_eq!(c.get("k"), None);
}

fn fresh_period_without_stale_deletes_key(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &["PX", "300"]);
    let m = c.meta("k").unwrap();
    assert_eq!(m.expire_at_ms, m.fresh_until_ms, "no STALE: key expires with the fresh period");
    assert!(c.pttl("k") > 0);
    sleep(ms(400));
    assert_eq!(c.get("k"), None);
    assert_eq!(c.meta("k"), None);
    assert!(!c.exists("k"));
}

fn ttl_is_fresh_plus_stale(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("a", "v", &["PX", "1000", "STALE", "10"]);
    let pttl = c.pttl("a");
    assert!((10_800..=11_000).contains(&pttl), "PTTL after PX 1000 STALE 10: {pttl}");
    assert_eq!(c.int(&cmd!("TTL", "a")), 11);
    let m = c.meta("a").unwrap();
    assert_near(m.stale_ttl_ms, c.pttl("a"), 50, "stale_ttl_ms vs PTTL");
    assert_eq!(m.expire_at_ms - m.fresh_until_ms, 10_000);
    assert_near(m.expire_at_ms, now_ms() + c.pttl("a"), 50, "expire_at_ms vs now + PTTL");

    c.set("b", "v", &["EX", "100", "STALE", "20"]);
    let ttl = c.int(&cmd!("TTL", "b"));
    assert!(ttl == 120 || ttl == 119, "TTL after EX 100 STALE 20: {ttl}");

    c.set("c", "v", &["EX", "100"]);
    let ttl = c.int(&cmd!("TTL", "c"));
    assert!(ttl == 100 || ttl == 99, "TTL after EX 100: {ttl}");
    let m = c.meta("c").unwrap();
    assert_eq!(m.expire_at_ms, m.fresh_until_ms);

    // STALE 0 explicitly is the default.
    c.set("d", "v", &["PX", "5000", "STALE", "0"]);
    let m = c.meta("d").unwrap();
    assert_eq!(m.expire_at_ms, m.fresh_until_ms);
    // STALE 0 without a fresh period is fine (no stale window asked for).
    c.set("e", "v", &["STALE", "0"]);
    assert_eq!(c.pttl("e"), -1);
}

fn expire_option_forms(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let t0 = now_ms();
    c.set("ex", "v", &["EX", "100"]);
    c.set("px", "v", &["PX", "5000"]);
    let t1 = now_ms();
    let m = c.meta("ex").unwrap();
    assert!(m.fresh_until_ms >= t0 + 100_000 && m.fresh_until_ms <= t1 + 100_000, "EX 100: {}", m.fresh_until_ms);
    assert!(m.fresh_ttl_ms > 99_000 && m.fresh_ttl_ms <= 100_000, "EX 100 fresh_ttl_ms {}", m.fresh_ttl_ms);
    let m = c.meta("px").unwrap();
    assert!(m.fresh_until_ms >= t0 + 5000 && m.fresh_until_ms <= t1 + 5000, "PX 5000: {}", m.fresh_until_ms);

    let exat = now_ms() / 1000 + 100;
    c.set("exat", "v", &["EXAT", &exat.to_string()]);
    let m = c.meta("exat").unwrap();
    assert_eq!(m.fresh_until_ms, exat * 1000);
    assert_eq!(m.expire_at_ms, exat * 1000);
    assert_eq!(m.state, "fresh");

    let pxat = now_ms() + 12_345;
    c.set("pxat", "v", &["PXAT", &pxat.to_string()]);
    let m = c.meta("pxat").unwrap();
    assert_eq!(m.fresh_until_ms, pxat);
    assert_eq!(m.expire_at_ms, pxat);
    assert_near(c.pttl("pxat"), pxat - now_ms(), 50, "PTTL after PXAT");

    c.set("pxat_stale", "v", &["PXAT", &pxat.to_string(), "STALE", "5"]);
    let m = c.meta("pxat_stale").unwrap();
    assert_eq!(m.fresh_until_ms, pxat);
    assert_eq!(m.expire_at_ms, pxat + 5000);

    c.set("exat_stale", "v", &["STALE", "7", "EXAT", &exat.to_string()]);
    let m = c.meta("exat_stale").unwrap();
    assert_eq!(m.fresh_until_ms, exat * 1000);
    assert_eq!(m.expire_at_ms, exat * 1000 + 7000);
}

fn keepttl(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    // Existing TTL kept; new fresh deadline from PX.
    c.set("k", "v1", &["PX", "100000", "STALE", "100"]);
    let before = c.meta("k").unwrap();
    let t0 = now_ms();
    c.set("k", "v2", &["PX", "5000", "KEEPTTL"]);
    let t1 = now_ms();
    let after = c.meta("k").unwrap();
    assert_eq!(c.get("k").as_deref(), Some(&b"v2"[..]));
    assert_eq!(after.expire_at_ms, before.expire_at_ms, "KEEPTTL must keep the key's expiry");
    assert!(after.fresh_until_ms >= t0 + 5000 && after.fresh_until_ms <= t1 + 5000, "fresh_until {}", after.fresh_until_ms);
    assert_near(c.pttl("k"), before.expire_at_ms - now_ms(), 50, "PTTL after KEEPTTL");

    // KEEPTTL alone: fresh forever, key TTL kept.
    c.set("k", "v3", &["KEEPTTL"]);
    let m = c.meta("k").unwrap();
    assert_eq!(m.fresh_until_ms, -1);
    assert_eq!(m.fresh_ttl_ms, -1);
    assert_eq!(m.expire_at_ms, before.expire_at_ms);

    // New key: no TTL.
    c.set("new", "v", &["KEEPTTL"]);
    assert_eq!(c.pttl("new"), -1);
    let m = c.meta("new").unwrap();
    assert_eq!((m.fresh_until_ms, m.expire_at_ms), (-1, -1));

    // Existing key without TTL stays without TTL.
    c.set("nottl", "v", &[]);
    c.set("nottl", "v2", &["PX", "5000", "KEEPTTL"]);
    assert_eq!(c.pttl("nottl"), -1);
    let m = c.meta("nottl").unwrap();
    assert!(m.fresh_until_ms > now_ms());
    assert_eq!(m.expire_at_ms, -1);
    assert_eq!(m.stale_ttl_ms, -1);

    // A TTL set natively is kept too.
    c.set("nat", "v", &[]);
    assert_eq!(c.int(&cmd!("EXPIRE", "nat", 300)), 1);
    c.set("nat", "v2", &["KEEPTTL", "EX", "10"]);
    let ttl = c.int(&cmd!("TTL", "nat"));
    assert!(ttl == 300 || ttl == 299, "TTL after KEEPTTL over EXPIRE 300: {ttl}");
}

fn overwrite_replaces_everything(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(5000);
    c.ok(&cmd!("TIERCACHE.SET", "k", &big, "PX", 100000, "STALE", 100, "TAGS", 2, "a", "b", "CREATED", 1000));
    let m = c.meta("k").unwrap();
    assert_eq!(m.encoding, "lz4");
    assert_eq!(m.created_ms, 1000);
    let t0 = now_ms();
    c.set("k", "small", &[]);
    let m = c.meta("k").unwrap();
    assert_eq!(c.get("k").as_deref(), Some(&b"small"[..]));
    assert_eq!(c.pttl("k"), -1, "overwrite without KEEPTTL drops the old TTL");
    assert_eq!((m.fresh_until_ms, m.expire_at_ms, m.fresh_ttl_ms, m.stale_ttl_ms), (-1, -1, -1, -1));
    assert!(m.tags.is_empty(), "tags replaced: {:?}", m.tags_str());
    assert_eq!(m.encoding, "raw");
    assert_eq!((m.size, m.stored_size), (5, 5));
    assert!(m.created_ms >= t0 - 1, "created_ms reset to now: {}", m.created_ms);
    let st = c.stats();
    assert_eq!(st.get("entries"), 1);
    assert_eq!(st.get("compressed_entries"), 0);
    assert_eq!(st.get("bytes_original"), 5);
    assert_eq!(st.get("bytes_stored"), 5);

    // Overwrite with a new TTL replaces the old TTL.
    c.set("k", "x", &["PX", "100000", "STALE", "100"]);
    c.set("k", "y", &["EX", "10"]);
    let ttl = c.int(&cmd!("TTL", "k"));
    assert!(ttl == 10 || ttl == 9, "TTL {ttl}");
}

fn compression_default_threshold(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(4096);
    c.ok(&cmd!("TIERCACHE.SET", "big", &big));
    let m = c.meta("big").unwrap();
    assert_eq!(m.encoding, "lz4");
    assert_eq!(m.size, 4096);
    assert!(m.stored_size * 10 <= m.size * 9, "lz4 must save >= 10%: stored {}", m.stored_size);
    assert_eq!(c.get("big"), Some(big.clone()));
    let (enc, frame) = c.get_encoded("big").unwrap();
    assert_eq!(enc, "lz4");
    assert_eq!(frame.len() as i64, m.stored_size);
    assert_eq!(&frame[..4], &4096u32.to_le_bytes(), "frame header = LE original length");
    assert_eq!(lz4_unframe(&frame), big);

    // Boundary: value >= 1024 bytes compresses, 1023 does not.
    let v1024 = compressible(1024);
    c.ok(&cmd!("TIERCACHE.SET", "b1024", &v1024));
    let m = c.meta("b1024").unwrap();
    assert_eq!(m.encoding, "lz4", "1024-byte compressible value");
    assert!(m.stored_size < 1024);
    assert_eq!(c.get("b1024"), Some(v1024));
    let v1023 = compressible(1023);
    c.ok(&cmd!("TIERCACHE.SET", "b1023", &v1023));
    let m = c.meta("b1023").unwrap();
    assert_eq!(m.encoding, "raw", "1023-byte value is below tiercache.compress-min-size");
    assert_eq!((m.size, m.stored_size), (1023, 1023));
    assert_eq!(c.get_encoded("b1023"), Some(("raw".to_string(), v1023)));

    // Small values stay raw.
    c.set("small", "hello hello hello hello", &[]);
    assert_eq!(c.meta("small").unwrap().encoding, "raw");
}

fn nocompress_and_incompressible_stay_raw(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(4096);
    c.ok(&cmd!("TIERCACHE.SET", "nc", &big, "NOCOMPRESS"));
    let m = c.meta("nc").unwrap();
    assert_eq!(m.encoding, "raw");
    assert_eq!((m.size, m.stored_size), (4096, 4096));
    assert_eq!(c.get("nc"), Some(big.clone()));
    assert_eq!(c.get_encoded("nc"), Some(("raw".to_string(), big)));

    let noise = incompressible(4096, 42);
    c.ok(&cmd!("TIERCACHE.SET", "noise", &noise));
    let m = c.meta("noise").unwrap();
    assert_eq!(m.encoding, "raw", "incompressible data must stay raw (saves < 10%)");
    assert_eq!((m.size, m.stored_size), (4096, 4096));
    assert_eq!(c.get("noise"), Some(noise));
}

fn encoding_lz4_round_trip(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let value = compressible(3000);
    let frame = lz4_frame(&value);
    c.ok(&cmd!("TIERCACHE.SET", "k", &frame, "ENCODING", "lz4", "TAGS", 1, "t"));
    let m = c.meta("k").unwrap();
    assert_eq!(m.encoding, "lz4");
    assert_eq!(m.size, 3000);
    assert_eq!(m.stored_size, frame.len() as i64);
    assert_eq!(c.get("k"), Some(value.clone()), "GET decompresses a client-sent frame");
    assert_eq!(c.get_encoded("k"), Some(("lz4".to_string(), frame.clone())), "stored verbatim");

    // Even a small value is stored as sent (below the compression threshold).
    let tiny = b"tiny value".to_vec();
    let tframe = lz4_frame(&tiny);
    c.ok(&cmd!("TIERCACHE.SET", "t", &tframe, "encoding", "lz4"));
    let m = c.meta("t").unwrap();
    assert_eq!(m.encoding, "lz4");
    assert_eq!(m.size, tiny.len() as i64);
    assert_eq!(m.stored_size, tframe.len() as i64);
    assert_eq!(c.get("t"), Some(tiny));
    assert_eq!(c.get_encoded("t"), Some(("lz4".to_string(), tframe)));

    // A frame of binary data with NULs.
    let zeros = vec![0u8; 5000];
    let zframe = lz4_frame(&zeros);
    c.ok(&cmd!("TIERCACHE.SET", "z", &zframe, "ENCODING", "lz4"));
    assert_eq!(c.get("z"), Some(zeros));
}

fn encoding_raw_is_verbatim(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(4096);
    c.ok(&cmd!("TIERCACHE.SET", "k", &big, "ENCODING", "raw"));
    let m = c.meta("k").unwrap();
    assert_eq!(m.encoding, "raw");
    assert_eq!((m.size, m.stored_size), (4096, 4096));
    assert_eq!(c.get_encoded("k"), Some(("raw".to_string(), big)));
}

fn bad_lz4_frame_header(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    for bad in [&b"ab"[..], &b""[..], &b"\x01\x00"[..]] {
        c.expect_err(&cmd!("TIERCACHE.SET", "k", bad, "ENCODING", "lz4"), "ERR invalid lz4 frame header");
        assert!(!c.exists("k"), "nothing written after a bad frame");
    }
    // Over an existing entry: unchanged.
    c.set("k", "orig", &["TAGS", "1", "x"]);
    let before = c.meta("k").unwrap().stable();
    c.expect_err(&cmd!("TIERCACHE.SET", "k", "ab", "ENCODING", "lz4"), "ERR invalid lz4 frame header");
    assert_eq!(c.meta("k").unwrap().stable(), before);
    assert_eq!(c.get("k").as_deref(), Some(&b"orig"[..]));
}

fn binary_keys_values_tags(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let key: &[u8] = b"k\0e\xffy";
    let val: &[u8] = b"\0\x01\x02\0\xff\r\n";
    let t1: &[u8] = b"t\0a";
    let t2: &[u8] = b"\xff\xfe";
    c.ok(&cmd!("TIERCACHE.SET", key, val, "TAGS", 3, t1, t2, "plain"));
    assert_eq!(c.get(key).as_deref(), Some(val));
    let m = c.meta(key).unwrap();
    assert_eq!(m.tags, vec![t1.to_vec(), t2.to_vec(), b"plain".to_vec()]);
    assert_eq!(m.size, val.len() as i64);
    // The key with its NUL is distinct from its prefix.
    assert_eq!(c.get(&b"k"[..]), None);
    assert_eq!(c.string(&cmd!("TYPE", key)).as_deref(), Some("tiercache"));
    // Large binary value that compresses.
    let mut bin = Vec::new();
    for i in 0..4000u32 {
        bin.extend_from_slice(&[0, (i % 7) as u8, 0xff, 0]);
    }
    c.ok(&cmd!("TIERCACHE.SET", key, &bin));
    assert_eq!(c.meta(key).unwrap().encoding, "lz4");
    assert_eq!(c.get(key), Some(bin));
}

fn empty_value_and_empty_key(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.ok(&cmd!("TIERCACHE.SET", "e", ""));
    assert_eq!(c.get("e"), Some(Vec::new()), "empty value is an empty bulk string, not nil");
    let m = c.meta("e").unwrap();
    assert_eq!((m.size, m.stored_size, m.encoding.as_str()), (0, 0, "raw"));
    assert_eq!(c.get_encoded("e"), Some(("raw".to_string(), Vec::new())));

    c.ok(&cmd!("TIERCACHE.SET", "", "under the empty key"));
    assert_eq!(c.get("").as_deref(), Some(&b"under the empty key"[..]));
    assert!(c.meta("").is_some());
    assert_eq!(c.int(&cmd!("EXISTS", "")), 1);
}

fn tags_dedup_order_and_limits(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &["TAGS", "4", "b", "a", "b", "c"]);
    assert_eq!(c.meta("k").unwrap().tags_str(), vec!["b", "a", "c"], "repeats dropped, order kept");
    c.set("k", "v", &["TAGS", "3", "z", "z", "z"]);
    assert_eq!(c.meta("k").unwrap().tags_str(), vec!["z"]);
    c.set("k0", "v", &["TAGS", "0"]);
    assert!(c.meta("k0").unwrap().tags.is_empty());
    // Exactly the maximum (32) is allowed.
    let tags: Vec<String> = (0..32).map(|i| format!("tag{i}")).collect();
    let mut cm = cmd!("TIERCACHE.SET", "max", "v", "TAGS", 32);
    for t in &tags {
        cm.arg(t);
    }
    c.ok(&cm);
    assert_eq!(c.meta("max").unwrap().tags_str(), tags);
    // Tags given before other options.
    c.set("k2", "v", &["TAGS", "2", "x", "y", "PX", "5000"]);
    let m = c.meta("k2").unwrap();
    assert_eq!(m.tags_str(), vec!["x", "y"]);
    assert!(m.fresh_until_ms > 0);
}

fn options_any_order_and_case(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let pxat = (now_ms() + 60_000).to_string();
    c.set("a", "value", &["PXAT", &pxat, "STALE", "5", "TAGS", "2", "t1", "t2", "NOCOMPRESS", "CREATED", "42"]);
    c.set("b", "value", &["created", "42", "nocompress", "tags", "2", "t1", "t2", "stale", "5", "pxat", &pxat]);
    c.set("c", "value", &["Tags", "2", "t1", "t2", "NoCompress", "Stale", "5", "PxAt", &pxat, "Created", "42"]);
    let a = c.meta("a").unwrap().stable();
    assert_eq!(a.created_ms, 42);
    assert_eq!(a.tags, vec![b"t1".to_vec(), b"t2".to_vec()]);
    assert_eq!(a.expire_at_ms, pxat.parse::<i64>().unwrap() + 5000);
    assert_eq!(c.meta("b").unwrap().stable(), a);
    assert_eq!(c.meta("c").unwrap().stable(), a);
    c.set("d", "v", &["ex", "100", "keepttl"]);
    assert_eq!(c.pttl("d"), -1);
    c.set("e", "v", &["px", "100000"]);
    assert!(c.pttl("e") > 90_000);
}

fn created_option(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &["CREATED", "1700000000123"]);
    assert_eq!(c.meta("k").unwrap().created_ms, 1_700_000_000_123);
    c.set("z", "v", &["CREATED", "0"]);
    assert_eq!(c.meta("z").unwrap().created_ms, 0);
    c.set("f", "v", &["CREATED", "4102444800000", "PX", "1000"]);
    assert_eq!(c.meta("f").unwrap().created_ms, 4_102_444_800_000);
}

fn wrongtype_on_native_keys(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.ok(&cmd!("SET", "s", "native"));
    c.int(&cmd!("LPUSH", "l", "x"));
    for key in ["s", "l"] {
        c.expect_err(&cmd!("TIERCACHE.SET", key, "v"), WRONGTYPE);
        c.expect_err(&cmd!("TIERCACHE.SET", key, "v", "PX", 100, "TAGS", 1, "t"), WRONGTYPE);
        c.expect_err(&cmd!("TIERCACHE.GET", key), WRONGTYPE);
        c.expect_err(&cmd!("TIERCACHE.GET", key, "ENCODED"), WRONGTYPE);
        c.expect_err(&cmd!("TIERCACHE.META", key), WRONGTYPE);
    }
    assert_eq!(c.string(&cmd!("GET", "s")).as_deref(), Some("native"), "native key unchanged");
    assert_eq!(c.pttl("s"), -1);
    assert_eq!(c.string(&cmd!("TYPE", "l")).as_deref(), Some("list"));
    let st = c.stats();
    assert_eq!(st.get("entries"), 0);
    assert_eq!(st.get("sets"), 0);
    // And the other way round: native GET on an entry.
    c.set("t", "v", &[]);
    c.expect_err(&cmd!("GET", "t"), WRONGTYPE);
}

fn set_error_cases() -> Vec<(Vec<String>, String)> {
    let syntax = "ERR syntax error";
    let notint = "ERR value is not an integer or out of range";
    let expire = "ERR invalid expire time in 'tiercache.set' command";
    let stale = "ERR invalid stale time in 'tiercache.set' command";
    let max = "9223372036854775807";
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["FOO"], syntax),
        (vec!["EX", "10", "PX", "100"], syntax),
        (vec!["PX", "100", "EXAT", "9999999999"], syntax),
        (vec!["EXAT", "9999999999", "PXAT", "9999999999000"], syntax),
        (vec!["EX", "10", "EX", "10"], syntax),
        (vec!["NOCOMPRESS", "ENCODING", "raw"], syntax),
        (vec!["ENCODING", "raw", "NOCOMPRESS"], syntax),
        (vec!["KEEPTTL", "STALE", "10", "EX", "10"], syntax),
        (vec!["EX", "10", "STALE", "10", "KEEPTTL"], syntax),
        (vec!["TAGS", "1", "a", "TAGS", "1", "b"], syntax),
        (vec!["TAGS", "1", "a", "b"], syntax),
        (vec!["TAGS", "1", "a", "EX"], syntax),
        (vec!["EX"], syntax),
        (vec!["PX", "100", "STALE"], syntax),
        (vec!["ENCODING"], syntax),
        (vec!["CREATED"], syntax),
        (vec!["TAGS"], syntax),
        (vec!["NOCOMPRESS", "NOCOMPRESS"], syntax),
        (vec!["KEEPTTL", "KEEPTTL"], syntax),
        (vec!["EX", "10", "STALE", "1", "STALE", "1"], syntax),
        (vec!["CREATED", "1", "CREATED", "2"], syntax),
        (vec!["ENCODING", "raw", "ENCODING", "raw"], syntax),
        (vec!["EX", "abc"], notint),
        (vec!["PX", "1.5"], notint),
        (vec!["EXAT", ""], notint),
        (vec!["PXAT", "12abc"], notint),
        (vec!["EX", "99999999999999999999"], notint),
        (vec!["PX", "100", "STALE", "x"], notint),
        (vec!["TAGS", "x", "a"], notint),
        (vec!["CREATED", "x"], notint),
        (vec!["EX", "0"], expire),
        (vec!["EX", "-1"], expire),
        (vec!["PX", "0"], expire),
        (vec!["PX", "-100"], expire),
        (vec!["EXAT", "0"], expire),
        (vec!["PXAT", "-1"], expire),
        (vec!["EX", max], expire),
        (vec!["PX", max], expire),
        (vec!["EXAT", max], expire),
        (vec!["EX", "10", "STALE", "-1"], stale),
        (vec!["EX", "10", "STALE", max], stale),
        (vec!["STALE", "10"], "ERR STALE needs a fresh period: add EX, PX, EXAT or PXAT"),
        (vec!["TAGS", "-1"], "ERR numtags must be a non-negative integer"),
        (vec!["TAGS", "3", "a", "b"], "ERR numtags is larger than the number of tags given"),
        (vec!["TAGS", "2", "a", ""], "ERR tags must not be empty strings"),
        (vec!["TAGS", "1", ""], "ERR tags must not be empty strings"),
        (vec!["ENCODING", "zstd"], "ERR unknown encoding: expected raw or lz4"),
        (vec!["CREATED", "-1"], "ERR invalid CREATED time"),
    ];
    let many: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let mut too_many = vec!["TAGS".to_string(), "33".to_string()];
    too_many.extend(many);
    let mut out: Vec<(Vec<String>, String)> =
        cases.drain(..).map(|(a, e)| (a.into_iter().map(String::from).collect(), e.to_string())).collect();
    out.push((too_many, "ERR too many tags: at most 32 per entry (see tiercache.max-tags)".to_string()));
    out
}

fn set_errors_exact_text_and_nothing_written(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let arity = "ERR wrong number of arguments for 'tiercache.set' command";
    c.expect_err(&cmd!("TIERCACHE.SET"), arity);
    c.expect_err(&cmd!("TIERCACHE.SET", "k"), arity);
    assert!(!c.exists("k"));

    c.set("existing", "orig", &["PX", "100000", "STALE", "10", "TAGS", "1", "keep"]);
    let before = c.meta("existing").unwrap().stable();
    let stats_before = c.stats();
    let mut failures = Vec::new();
    for (opts, expected) in set_error_cases() {
        for key in ["fresh-key", "existing"] {
            let mut cm = cmd!("TIERCACHE.SET", key, "value");
            for o in &opts {
                cm.arg(o.as_str());
            }
            match c.try_run(&cm) {
                Err(got) if got == expected => {}
                other => failures.push(format!("SET {key} value {}: expected {expected:?}, got {other:?}", opts.join(" "))),
            }
        }
        if c.exists("fresh-key") {
            failures.push(format!("SET fresh-key value {} wrote the key", opts.join(" ")));
            c.int(&cmd!("DEL", "fresh-key"));
        }
        let now = c.meta("existing").unwrap().stable();
        if now != before {
            failures.push(format!("SET existing value {} changed the entry: {now:?}", opts.join(" ")));
        }
    }
    assert_eq!(c.get("existing").as_deref(), Some(&b"orig"[..]));
    let after = c.stats();
    for f in ["entries", "compressed_entries", "bytes_original", "bytes_stored", "sets"] {
        if after.get(f) != stats_before.get(f) {
            failures.push(format!("STATS {f} changed by failed SETs: {} -> {}", stats_before.get(f), after.get(f)));
        }
    }
    assert!(failures.is_empty(), "{} problems:\n{}", failures.len(), failures.join("\n"));
}

fn get_option_errors(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &[]);
    c.expect_err(&cmd!("TIERCACHE.GET", "k", "FOO"), "ERR syntax error");
    c.expect_err(&cmd!("TIERCACHE.GET", "missing", "FOO"), "ERR syntax error");
    let e = c.err(&cmd!("TIERCACHE.GET"));
    assert!(e.starts_with("ERR"), "GET without key: {e}");
    let e = c.err(&cmd!("TIERCACHE.META"));
    assert!(e.starts_with("ERR"), "META without key: {e}");
}

fn meta_reply_shape(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &["PX", "5000", "STALE", "1", "TAGS", "2", "a", "b"]);
    let v = c.run(&cmd!("TIERCACHE.META", "k"));
    match (p, &v) {
        (Proto::Resp2, Value::Array(items)) => {
            assert_eq!(items.len(), 20, "RESP2 META is a flat array of 10 name/value pairs");
            assert!(matches!(&items[11], Value::Array(t) if t.len() == 2), "tags value is an array: {:?}", items[11]);
        }
        (Proto::Resp3, Value::Map(kv)) => {
            assert_eq!(kv.len(), 10, "RESP3 META is a map of 10 fields");
            assert!(matches!(&kv[5].1, Value::Array(t) if t.len() == 2), "tags value is an array: {:?}", kv[5].1);
        }
        _ => panic!("{p:?} META shape: {v:?}"),
    }
    // Field names and order are checked by the parser.
    let m = c.meta("k").unwrap();
    assert_eq!(m.tags_str(), vec!["a", "b"]);
    // Numbers are RESP integers.
    let nums: Vec<Value> = match v {
        Value::Array(items) => items.chunks(2).map(|kv| kv[1].clone()).collect(),
        Value::Map(kv) => kv.into_iter().map(|(_, v)| v).collect(),
        _ => unreachable!(),
    };
    for i in [1usize, 2, 3, 4, 7, 8, 9] {
        assert!(matches!(nums[i], Value::Int(_)), "META {} should be an integer reply: {:?}", META_FIELDS[i], nums[i]);
    }
}

fn stats_counters(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let zero = c.stats();
    for f in STATS_FIELDS {
        assert_eq!(zero.get(f), 0, "fresh server: {f}");
    }
    c.set("a", "hello", &[]);
    let big = compressible(4096);
    c.ok(&cmd!("TIERCACHE.SET", "b", &big));
    let bstored = c.meta("b").unwrap().stored_size;
    let st = c.stats();
    assert_eq!(st.get("entries"), 2);
    assert_eq!(st.get("compressed_entries"), 1);
    assert_eq!(st.get("bytes_original"), 5 + 4096);
    assert_eq!(st.get("bytes_stored"), 5 + bstored);
    assert_eq!(st.get("sets"), 2);
    assert_eq!((st.get("hits"), st.get("misses")), (0, 0));

    assert!(c.get("a").is_some());
    assert!(c.get("b").is_some());
    assert!(c.get("missing").is_none());
    let st = c.stats();
    assert_eq!((st.get("hits"), st.get("misses")), (2, 1));

    // A stale read is a miss.
    c.set("s", "v", &["PX", "50", "STALE", "10"]);
    sleep(ms(100));
    assert!(c.get("s").is_none());
    let st = c.stats();
    assert_eq!((st.get("hits"), st.get("misses"), st.get("sets")), (2, 2, 3));
    assert_eq!(st.get("entries"), 3, "stale entries are still entries");

    // META, native commands and failed SETs do not count.
    c.meta("a");
    c.meta("missing");
    c.err(&cmd!("TIERCACHE.SET", "x", "v", "EX", 0));
    c.int(&cmd!("EXISTS", "a"));
    let st2 = c.stats();
    assert_eq!((st2.get("hits"), st2.get("misses"), st2.get("sets")), (2, 2, 3));

    // Overwrite adjusts bytes; DEL removes.
    c.set("a", "0123456789", &[]);
    let st = c.stats();
    assert_eq!(st.get("entries"), 3);
    assert_eq!(st.get("bytes_original"), 10 + 4096 + 1);
    assert_eq!(st.get("bytes_stored"), 10 + bstored + 1);
    assert_eq!(st.get("sets"), 4);
    // An overwrite that changes the encoding moves the compressed count both ways.
    c.set("b", "xy", &[]);
    let st = c.stats();
    assert_eq!((st.get("entries"), st.get("compressed_entries")), (3, 0));
    assert_eq!((st.get("bytes_original"), st.get("bytes_stored")), (10 + 2 + 1, 10 + 2 + 1));
    c.ok(&cmd!("TIERCACHE.SET", "b", &big));
    let st = c.stats();
    assert_eq!((st.get("entries"), st.get("compressed_entries")), (3, 1));
    assert_eq!((st.get("bytes_original"), st.get("bytes_stored")), (10 + 4096 + 1, 10 + bstored + 1));
    c.int(&cmd!("DEL", "b"));
    let st = c.stats();
    assert_eq!(st.get("entries"), 2);
    assert_eq!(st.get("compressed_entries"), 0);
    assert_eq!(st.get("bytes_original"), 11);
    assert_eq!(st.get("bytes_stored"), 11);

    // Expired entries leave the counts.
    c.set("gone", "12345", &["PX", "300"]);
    assert_eq!(c.stats().get("entries"), 3);
    sleep(ms(400));
    assert!(c.get("gone").is_none());
    let st = c.stats();
    assert_eq!(st.get("entries"), 2);
    assert_eq!(st.get("bytes_original"), 11);
}

fn stats_equal_info_section(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("a", "hello", &[]);
    let big = compressible(2048);
    c.ok(&cmd!("TIERCACHE.SET", "b", &big));
    c.get("a");
    c.get("nope");
    let st = c.stats();
    let info = c.info("tiercache");
    let fields = info_section_fields(&info, "tiercache_stats")
        .unwrap_or_else(|| panic!("INFO tiercache has no '# tiercache_stats' section:\n{info}"));
    let names: Vec<String> = fields.iter().map(|(k, _)| k.strip_prefix("tiercache_").unwrap_or(k).to_string()).collect();
    assert_eq!(names, STATS_FIELDS.to_vec(), "INFO tiercache_stats fields (module-name prefix stripped):\n{info}");
    for ((name, v), (_, iv)) in st.0.iter().zip(fields.iter()) {
        assert_eq!(iv.parse::<i64>().ok(), Some(*v), "INFO vs STATS for {name}");
    }
    assert_eq!(st.get("entries"), 2);
    assert_eq!(st.get("hits"), 1);
    assert_eq!(st.get("misses"), 1);
    // Also part of INFO everything.
    let all = c.info("everything");
    assert!(all.contains("# tiercache_stats"), "INFO everything lacks tiercache_stats");
}

fn stats_cover_all_dbs_and_flush(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("a", "12345", &[]);
    c.select(1);
    c.set("a", "1234567", &[]);
    c.select(5);
    c.ok(&cmd!("TIERCACHE.SET", "big", compressible(3000)));
    let st = c.stats();
    assert_eq!(st.get("entries"), 3);
    assert_eq!(st.get("compressed_entries"), 1);
    assert_eq!(st.get("bytes_original"), 5 + 7 + 3000);
    c.ok(&cmd!("FLUSHDB"));
    let st = c.stats();
    assert_eq!(st.get("entries"), 2);
    assert_eq!(st.get("compressed_entries"), 0);
    assert_eq!(st.get("bytes_original"), 12);
    assert_eq!(st.get("bytes_stored"), 12);
    c.ok(&cmd!("FLUSHALL"));
    let st = c.stats();
    assert_eq!((st.get("entries"), st.get("compressed_entries"), st.get("bytes_original"), st.get("bytes_stored")), (0, 0, 0, 0));
    // SWAPDB moves entries between DBs without changing the totals.
    c.select(0);
    c.set("x", "1", &[]);
    c.ok(&cmd!("SWAPDB", 0, 3));
    assert_eq!(c.get("x"), None);
    c.select(3);
    assert_eq!(c.get("x").as_deref(), Some(&b"1"[..]));
    assert_eq!(c.stats().get("entries"), 1);
}

fn native_del_unlink_exists_type(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("a", "1", &[]);
    c.set("b", "2", &["PX", "100000", "TAGS", "1", "t"]);
    c.set("u", "3", &[]);
    assert_eq!(c.int(&cmd!("EXISTS", "a", "b", "u", "nope")), 3);
    for k in ["a", "b", "u"] {
        assert_eq!(c.string(&cmd!("TYPE", k)).as_deref(), Some("tiercache"));
    }
    assert_eq!(c.int(&cmd!("DEL", "a", "b")), 2);
    assert_eq!(c.int(&cmd!("UNLINK", "u")), 1);
    assert_eq!(c.int(&cmd!("EXISTS", "a", "b", "u")), 0);
    assert_eq!(c.meta("a"), None);
    assert_eq!(c.get("b"), None);
    assert_eq!(c.stats().get("entries"), 0);
    // Keys are listed by SCAN TYPE.
    c.set("x", "1", &[]);
    c.ok(&cmd!("SET", "native", "1"));
    let v = c.run(&cmd!("SCAN", 0, "TYPE", "tiercache", "COUNT", 100));
    let keys: Vec<String> = as_list(&as_list(&v).unwrap()[1]).unwrap().iter().filter_map(as_string).collect();
    assert_eq!(keys, vec!["x"]);
}

fn native_expire_persist(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &["PX", "100000", "STALE", "100"]);
    let m0 = c.meta("k").unwrap();
    assert_eq!(c.int(&cmd!("EXPIRE", "k", 500)), 1);
    let ttl = c.int(&cmd!("TTL", "k"));
    assert!(ttl == 500 || ttl == 499, "TTL {ttl}");
    let m = c.meta("k").unwrap();
    assert_eq!(m.fresh_until_ms, m0.fresh_until_ms, "EXPIRE does not move the fresh deadline");
    assert_near(m.expire_at_ms, now_ms() + 500_000, 100, "expire_at_ms after EXPIRE");
    assert_near(m.stale_ttl_ms, 500_000, 100, "stale_ttl_ms after EXPIRE");

    assert_eq!(c.int(&cmd!("PERSIST", "k")), 1);
    assert_eq!(c.pttl("k"), -1);
    let m = c.meta("k").unwrap();
    assert_eq!(m.expire_at_ms, -1);
    assert_eq!(m.stale_ttl_ms, -1);
    assert_eq!(m.fresh_until_ms, m0.fresh_until_ms);
    assert_eq!(m.state, "fresh");
    assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]));

    // PEXPIREAT, and expiry through a native TTL.
    let at = now_ms() + 300;
    assert_eq!(c.int(&cmd!("PEXPIREAT", "k", at)), 1);
    assert_eq!(c.meta("k").unwrap().expire_at_ms, at);
    sleep(ms(400));
    assert_eq!(c.get("k"), None);
    assert!(!c.exists("k"));
    assert_eq!(c.stats().get("entries"), 0);
}

/// A fresh period with no key TTL (PERSIST after SET PX): the entry turns stale and stays, with
/// fresh_ttl_ms 0 and stale_ttl_ms -1.
fn persisted_entry_turns_stale_and_stays(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "v", &["PX", "300", "STALE", "1", "TAGS", "1", "t"]);
    assert_eq!(c.int(&cmd!("PERSIST", "k")), 1);
    let m0 = c.meta("k").unwrap();
    assert_eq!((m0.state.as_str(), m0.stale_ttl_ms, m0.expire_at_ms), ("fresh", -1, -1));
    sleep(ms(400));
    assert_eq!(c.get("k"), None, "past its fresh period");
    let m = c.meta("k").expect("no key TTL: the entry stays");
    assert_eq!(m.state, "stale");
    assert_eq!(m.fresh_ttl_ms, 0);
    assert_eq!(m.stale_ttl_ms, -1);
    assert_eq!(m.expire_at_ms, -1);
    assert_eq!(m.fresh_until_ms, m0.fresh_until_ms);
    assert_eq!(c.pttl("k"), -1);
    // Overwriting makes it fresh again.
    c.set("k", "v2", &[]);
    assert_eq!(c.get("k").as_deref(), Some(&b"v2"[..]));
}

fn native_rename(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(3000);
    c.ok(&cmd!("TIERCACHE.SET", "k", &big, "PX", 100000, "STALE", 10, "TAGS", 2, "a", "b", "CREATED", 77));
    let before = c.meta("k").unwrap().stable();
    c.ok(&cmd!("RENAME", "k", "k2"));
    assert!(!c.exists("k"));
    assert_eq!(c.meta("k2").unwrap().stable(), before);
    assert_eq!(c.get("k2"), Some(big.clone()));
    // RENAME over an existing entry.
    c.set("k3", "old", &[]);
    c.ok(&cmd!("RENAME", "k2", "k3"));
    assert_eq!(c.get("k3"), Some(big));
    assert_eq!(c.meta("k3").unwrap().stable(), before);
    let st = c.stats();
    assert_eq!(st.get("entries"), 1);
    assert_eq!(st.get("bytes_original"), 3000);
}

fn native_copy(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(3000);
    c.ok(&cmd!("TIERCACHE.SET", "k", &big, "PX", 100000, "STALE", 10, "TAGS", 1, "t", "CREATED", 5));
    let before = c.meta("k").unwrap().stable();
    assert_eq!(c.int(&cmd!("COPY", "k", "k2")), 1);
    assert_eq!(c.meta("k2").unwrap().stable(), before);
    assert_eq!(c.get("k2"), Some(big.clone()));
    // The copy is independent of the original.
    c.set("k", "changed", &[]);
    assert_eq!(c.get("k2"), Some(big.clone()));
    assert_eq!(c.meta("k2").unwrap().stable(), before);
    // COPY to another DB.
    assert_eq!(c.int(&cmd!("COPY", "k2", "k3", "DB", 2)), 1);
    c.select(2);
    assert_eq!(c.get("k3"), Some(big));
    assert_eq!(c.meta("k3").unwrap().stable(), before);
    assert_eq!(c.stats().get("entries"), 3);
}

fn native_move(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    c.set("k", "moving", &["PX", "100000", "STALE", "10", "TAGS", "1", "t"]);
    let before = c.meta("k").unwrap().stable();
    assert_eq!(c.int(&cmd!("MOVE", "k", 1)), 1);
    assert!(!c.exists("k"));
    c.select(1);
    assert_eq!(c.get("k").as_deref(), Some(&b"moving"[..]));
    assert_eq!(c.meta("k").unwrap().stable(), before);
    assert_eq!(c.stats().get("entries"), 1);
}

fn native_dump_restore(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let big = compressible(3000);
    c.ok(&cmd!("TIERCACHE.SET", "k", &big, "PX", 100000, "STALE", 10, "TAGS", 2, "x", "y", "CREATED", 99));
    c.set("small", "v\0v", &["TAGS", "1", "t"]);
    let before = c.meta("k").unwrap().stable();
    let payload = c.bytes(&cmd!("DUMP", "k")).expect("DUMP payload");
    c.ok(&cmd!("RESTORE", "r", before.expire_at_ms, &payload, "ABSTTL"));
    assert_eq!(c.meta("r").unwrap().stable(), before);
    assert_eq!(c.get("r"), Some(big.clone()));
    assert_eq!(c.get_encoded("r"), c.get_encoded("k"));
    // TTL 0: no key TTL, everything else identical.
    c.ok(&cmd!("RESTORE", "r0", 0, &payload));
    let m = c.meta("r0").unwrap().stable();
    assert_eq!(m, StableMeta { expire_at_ms: -1, ..before.clone() });
    assert_eq!(c.pttl("r0"), -1);
    // BUSYKEY / REPLACE over an entry.
    let small = c.bytes(&cmd!("DUMP", "small")).unwrap();
    let e = c.err(&cmd!("RESTORE", "r0", 0, &small));
    assert!(e.starts_with("BUSYKEY"), "{e}");
    c.ok(&cmd!("RESTORE", "r0", 0, &small, "REPLACE"));
    assert_eq!(c.get("r0").as_deref(), Some(&b"v\0v"[..]));
    assert_eq!(c.meta("r0").unwrap().tags_str(), vec!["t"]);
    let st = c.stats();
    assert_eq!(st.get("entries"), 4);
    assert_eq!(st.get("bytes_original"), 3000 * 2 + 3 * 2);
}

fn native_memory_usage(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let noise = incompressible(5000, 7);
    c.ok(&cmd!("TIERCACHE.SET", "raw", &noise));
    let u = c.int(&cmd!("MEMORY", "USAGE", "raw"));
    assert!(u >= 5000, "MEMORY USAGE of a 5000-byte raw entry: {u}");
    assert!(u < 5000 * 3, "MEMORY USAGE of a 5000-byte raw entry is implausibly large: {u}");
    c.ok(&cmd!("TIERCACHE.SET", "lz", compressible(20000)));
    let stored = c.meta("lz").unwrap().stored_size;
    let u2 = c.int(&cmd!("MEMORY", "USAGE", "lz"));
    assert!(u2 >= stored, "MEMORY USAGE {u2} < stored_size {stored}");
    // Tags count too.
    c.ok(&cmd!("TIERCACHE.SET", "tagged", &noise, "TAGS", 3, "a".repeat(300), "b".repeat(300), "c".repeat(300)));
    let u3 = c.int(&cmd!("MEMORY", "USAGE", "tagged"));
    assert!(u3 >= u + 900, "tags not counted: {u3} vs {u}");
    assert_eq!(c.raw(&cmd!("MEMORY", "USAGE", "nope")), Value::Nil);
}

/// Looks a name up in a flat array (RESP2) or map (RESP3) reply.
fn lookup<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    match v {
        Value::Map(kv) => kv.iter().find(|(k, _)| as_string(k).as_deref() == Some(name)).map(|(_, v)| v),
        Value::Array(items) => {
            items.chunks(2).find(|kv| kv.len() == 2 && as_string(&kv[0]).as_deref() == Some(name)).map(|kv| &kv[1])
        }
        _ => None,
    }
}

fn strings(v: &Value) -> Vec<String> {
    as_list(v).unwrap_or_else(|| panic!("not a list: {v:?}")).iter().filter_map(as_string).collect()
}

fn command_info_and_docs(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let v = c.run(&cmd!("COMMAND", "INFO", "tiercache.get", "tiercache.set", "tiercache.meta"));
    let cmds = as_list(&v).unwrap();
    assert_eq!(cmds.len(), 3);
    let get = as_list(&cmds[0]).unwrap_or_else(|| panic!("COMMAND INFO tiercache.get: {v:?}"));
    assert_eq!(as_string(&get[0]).as_deref(), Some("tiercache.get"));
    let flags = strings(&get[2]);
    assert!(flags.iter().any(|f| f == "readonly"), "tiercache.get flags {flags:?} lack readonly");
    assert!(!flags.iter().any(|f| f == "write"), "tiercache.get must not be write: {flags:?}");
    assert_eq!(as_int(&get[3]), Some(1), "first key");
    assert_eq!(as_int(&get[4]), Some(1), "last key");
    assert_eq!(as_int(&get[5]), Some(1), "key step");
    let specs = as_list(&get[8]).unwrap_or_else(|| panic!("no key specs: {get:?}"));
    assert_eq!(specs.len(), 1, "one key spec: {specs:?}");
    let kflags: Vec<String> = strings(lookup(&specs[0], "flags").expect("key spec flags"));
    let up: Vec<String> = kflags.iter().map(|f| f.to_ascii_uppercase()).collect();
    assert!(up.contains(&"RO".to_string()), "key spec flags {kflags:?} lack RO");
    assert!(up.contains(&"ACCESS".to_string()), "key spec flags {kflags:?} lack ACCESS");
    assert!(!up.contains(&"RW".to_string()), "key spec of a read must not be RW: {kflags:?}");

    let set = as_list(&cmds[1]).unwrap();
    let sflags = strings(&set[2]);
    assert!(sflags.iter().any(|f| f == "write"), "tiercache.set flags {sflags:?} lack write");
    assert!(!sflags.iter().any(|f| f == "readonly"), "tiercache.set flags {sflags:?}");

    // COMMAND DOCS knows the command and that it comes from the module.
    let v = c.run(&cmd!("COMMAND", "DOCS", "tiercache.get"));
    let doc = lookup(&v, "tiercache.get").unwrap_or_else(|| panic!("COMMAND DOCS tiercache.get: {v:?}"));
    assert_eq!(lookup(doc, "group").and_then(as_string).as_deref(), Some("module"), "docs: {doc:?}");
    let modname = lookup(doc, "module").and_then(as_string).unwrap_or_else(|| panic!("docs lack module: {doc:?}"));
    let list = c.run(&cmd!("MODULE", "LIST"));
    let names: Vec<String> = as_list(&list).unwrap().iter().filter_map(|m| lookup(m, "name").and_then(as_string)).collect();
    assert!(names.contains(&modname), "COMMAND DOCS module {modname:?} not in MODULE LIST {names:?}");
    assert!(names.iter().any(|n| n == "tiercache"), "MODULE LIST {names:?}");
}

#[test]
fn acl_read_only_key_user_may_get_but_not_set() {
    let s = Server::start();
    let mut admin = s.conn();
    admin.set("k", "value", &["TAGS", "1", "t"]);
    admin.ok(&cmd!("ACL", "SETUSER", "reader", "on", ">pw", "resetkeys", "%R~*", "+tiercache.get", "+tiercache.meta"));
    admin.ok(&cmd!("ACL", "SETUSER", "rkeys", "on", ">pw", "resetkeys", "%R~*", "+tiercache.get", "+tiercache.set"));

    let mut r = s.conn();
    r.ok(&cmd!("AUTH", "reader", "pw"));
    assert_eq!(r.get("k").as_deref(), Some(&b"value"[..]), "GET allowed with %R~*");
    assert_eq!(r.get_encoded("k"), Some(("raw".to_string(), b"value".to_vec())));
    let e = r.err(&cmd!("TIERCACHE.SET", "k", "evil"));
    assert!(e.starts_with("NOPERM"), "SET must be denied: {e}");
    let e = r.err(&cmd!("TIERCACHE.SET", "other", "evil"));
    assert!(e.starts_with("NOPERM"), "SET must be denied: {e}");

    // Granted the command but only read access to keys: SET is denied by its key spec.
    let mut w = s.conn();
    w.ok(&cmd!("AUTH", "rkeys", "pw"));
    assert_eq!(w.get("k").as_deref(), Some(&b"value"[..]));
    let e = w.err(&cmd!("TIERCACHE.SET", "k", "evil"));
    assert!(e.starts_with("NOPERM"), "SET with read-only key access must be denied: {e}");
    assert_eq!(admin.get("k").as_deref(), Some(&b"value"[..]));
    assert!(!admin.exists("other"));
}

fn invalidations(rx: &mpsc::Receiver<redis::PushInfo>) -> Vec<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Ok(push) = rx.try_recv() {
        if push.kind == redis::PushKind::Invalidate {
            let keys = match push.data.first() {
                Some(Value::Array(keys)) => keys.iter().filter_map(as_bytes).collect(),
                Some(Value::Nil) | None => Vec::new(),
                Some(other) => panic!("invalidate push payload {other:?}"),
            };
            out.push(keys);
        }
    }
    out
}

#[test]
fn resp3_tracking_invalidates_after_set() {
    let s = Server::start();
    let mut writer = s.conn();
    writer.set("k", "v1", &[]);

    let mut t = s.conn3();
    let (tx, rx) = mpsc::channel();
    t.con.set_push_sender(tx);
    t.ok(&cmd!("CLIENT", "TRACKING", "ON"));
    assert_eq!(t.get("k").as_deref(), Some(&b"v1"[..]));
    assert!(t.get("miss").is_none());
    // Nothing changed yet: no invalidation.
    t.run(&cmd!("PING"));
    assert!(invalidations(&rx).is_empty());

    writer.set("k", "v2", &[]);
    // The push arrives before the PING's reply on the tracking connection.
    t.run(&cmd!("PING"));
    let inv = invalidations(&rx);
    assert_eq!(inv, vec![vec![b"k".to_vec()]], "one invalidation for k");

    // A tracked miss is invalidated by the fill.
    writer.set("miss", "filled", &[]);
    t.run(&cmd!("PING"));
    assert_eq!(invalidations(&rx), vec![vec![b"miss".to_vec()]]);

    // Re-read, then a native DEL invalidates as well.
    assert_eq!(t.get("k").as_deref(), Some(&b"v2"[..]));
    writer.int(&cmd!("DEL", "k"));
    t.run(&cmd!("PING"));
    assert_eq!(invalidations(&rx), vec![vec![b"k".to_vec()]]);
}

/// A panic inside the module is caught at the command's FFI entry, written to the Redis log with its
/// place and message, and answered with an error; Redis keeps serving. `TIERCACHE.DEBUG PANIC` raises
/// one on purpose, only where DEBUG is allowed.
#[test]
fn a_caught_panic_is_logged_and_answered() {
    let s = Server::start();
    let mut c = s.conn();
    c.set("k", "v", &[]);
    c.expect_err(&cmd!("TIERCACHE.DEBUG", "PANIC"), "ERR tiercache internal error; the command was not applied");
    let log = s.log();
    assert!(
        log.contains("<tiercache> tiercache: panic at src/commands/debug.rs") && log.contains("TIERCACHE.DEBUG PANIC was called"),
        "the panic is not in the Redis log:\n{log}"
    );
    assert_eq!(c.get("k").as_deref(), Some(&b"v"[..]), "the server keeps serving");
    c.expect_err(&cmd!("TIERCACHE.DEBUG", "NOPE"), "ERR unknown subcommand for TIERCACHE.DEBUG (PANIC is the only one)");

    let s = Server::builder().args(&["--enable-debug-command", "no"]).start();
    let mut c = s.conn();
    c.expect_err(
        &cmd!("TIERCACHE.DEBUG", "PANIC"),
        "ERR TIERCACHE.DEBUG is not allowed: set enable-debug-command to yes or local",
    );
    assert!(!s.log().contains("panic at"), "no panic where DEBUG is not allowed");
}
