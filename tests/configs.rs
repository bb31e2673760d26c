//! The module configs tiercache.compress-min-size, tiercache.max-tags and tiercache.max-value-size:
//! defaults, CONFIG SET within and out of bounds, as loadmodule arguments, on the command line, in
//! redis.conf, and bad loadmodule arguments refusing to start.

#[macro_use]
mod common;

use common::*;

const CMS: &str = "tiercache.compress-min-size";
const MT: &str = "tiercache.max-tags";
const MVS: &str = "tiercache.max-value-size";

proto_tests!(
    compress_min_size_config_set_changes_behaviour,
    max_tags_config_set_changes_behaviour,
    out_of_range_config_set_is_refused_and_value_kept,
    loadmodule_args_set_configs,
    command_line_sets_configs,
    max_value_size_config_set_changes_behaviour,
    max_value_size_as_loadmodule_arg_and_command_line,
);

fn encoding_of(c: &mut Conn, key: &str, value: &[u8]) -> String {
    c.ok(&cmd!("TIERCACHE.SET", key, value));
    assert_eq!(c.get(key).as_deref(), Some(value), "round trip of {key}");
    c.meta(key).unwrap().encoding
}

fn set_with_tags(c: &mut Conn, key: &str, n: usize) -> Result<redis::Value, String> {
    let mut cm = cmd!("TIERCACHE.SET", key, "v", "TAGS", n);
    for i in 0..n {
        cm.arg(format!("tag{i}"));
    }
    c.try_run(&cm)
}

fn too_many(max: usize) -> String {
    format!("ERR too many tags: at most {max} per entry (see tiercache.max-tags)")
}

#[test]
fn defaults() {
    let s = Server::start();
    let mut c = s.conn();
    assert_eq!(c.config_get(CMS), "1024");
    assert_eq!(c.config_get(MT), "32");
    assert_eq!(c.config_get(MVS), "67108864", "64 MiB");
    let v = c.run(&cmd!("CONFIG", "GET", "tiercache.*"));
    let names: Vec<String> = match &v {
        Value::Array(items) => items.chunks(2).filter_map(|kv| as_string(&kv[0])).collect(),
        other => panic!("CONFIG GET tiercache.*: {other:?}"),
    };
    assert!(names.contains(&CMS.to_string()) && names.contains(&MT.to_string()), "CONFIG GET tiercache.*: {names:?}");
    assert!(names.contains(&MVS.to_string()), "CONFIG GET tiercache.*: {names:?}");
    // Unprefixed names are not configs.
    let v = c.run(&cmd!("CONFIG", "GET", "max-tags"));
    assert_eq!(as_list(&v).map(|l| l.len()), Some(0), "CONFIG GET max-tags: {v:?}");
}

fn compress_min_size_config_set_changes_behaviour(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let v100 = compressible(100);
    assert_eq!(encoding_of(&mut c, "a", &v100), "raw", "100 bytes < 1024");
    c.ok(&cmd!("CONFIG", "SET", CMS, "64"));
    assert_eq!(c.config_get(CMS), "64");
    assert_eq!(encoding_of(&mut c, "b", &v100), "lz4", "100 bytes >= 64");
    let m = c.meta("b").unwrap();
    assert_eq!(m.size, 100);
    assert!(m.stored_size < 100);
    // Values that lz4 shrinks by far more than 10 %: only the size threshold decides.
    assert!(lz4_frame(&[b'a'; 63]).len() * 10 <= 63 * 9);
    assert_eq!(encoding_of(&mut c, "c", &[b'a'; 63]), "raw", "63 bytes < 64");
    assert_eq!(encoding_of(&mut c, "d", &[b'a'; 64]), "lz4", "64 bytes >= 64");
    // Existing entries keep their encoding.
    assert_eq!(c.meta("a").unwrap().encoding, "raw");

    c.ok(&cmd!("CONFIG", "SET", CMS, "0"));
    assert_eq!(c.config_get(CMS), "0");
    assert_eq!(encoding_of(&mut c, "e", &[b'a'; 40]), "lz4", "threshold 0");
    // NOCOMPRESS still wins.
    c.ok(&cmd!("TIERCACHE.SET", "f", &v100, "NOCOMPRESS"));
    assert_eq!(c.meta("f").unwrap().encoding, "raw");

    c.ok(&cmd!("CONFIG", "SET", CMS, "536870912"));
    assert_eq!(c.config_get(CMS), "536870912");
    assert_eq!(encoding_of(&mut c, "g", &compressible(5000)), "raw", "below a 512 MiB threshold");
    c.ok(&cmd!("CONFIG", "SET", CMS, "1024"));
    assert_eq!(encoding_of(&mut c, "h", &compressible(1024)), "lz4");
    assert_eq!(encoding_of(&mut c, "i", &v100), "raw");
}

fn max_tags_config_set_changes_behaviour(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    set_with_tags(&mut c, "five", 5).expect("5 tags under the default 32");
    assert_eq!(set_with_tags(&mut c, "t33", 33), Err(too_many(32)));
    c.ok(&cmd!("CONFIG", "SET", MT, "2"));
    assert_eq!(c.config_get(MT), "2");
    set_with_tags(&mut c, "two", 2).expect("2 tags with max-tags 2");
    assert_eq!(set_with_tags(&mut c, "three", 3), Err(too_many(2)));
    assert!(!c.exists("three"));
    // Repeated tags count once.
    c.ok(&cmd!("TIERCACHE.SET", "dups", "v", "TAGS", 2, "x", "x"));
    assert_eq!(c.meta("dups").unwrap().tags_str(), vec!["x"]);
    // Existing entries keep their tags.
    assert_eq!(c.meta("five").unwrap().tags.len(), 5);

    c.ok(&cmd!("CONFIG", "SET", MT, "0"));
    assert_eq!(set_with_tags(&mut c, "one", 1), Err(too_many(0)));
    set_with_tags(&mut c, "zero", 0).expect("TAGS 0 with max-tags 0");
    c.set("none", "v", &[]);

    c.ok(&cmd!("CONFIG", "SET", MT, "1024"));
    assert_eq!(c.config_get(MT), "1024");
    set_with_tags(&mut c, "many", 1024).expect("1024 tags with max-tags 1024");
    assert_eq!(c.meta("many").unwrap().tags.len(), 1024);
    assert_eq!(set_with_tags(&mut c, "toomany", 1025), Err(too_many(1024)));
}

fn out_of_range_config_set_is_refused_and_value_kept(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    // Non-default values first, so "unchanged" cannot be mistaken for a reset to the default.
    c.ok(&cmd!("CONFIG", "SET", CMS, "100"));
    c.ok(&cmd!("CONFIG", "SET", MT, "7"));
    for (name, bad, keep) in [
        (CMS, "-1", "100"),
        (CMS, "536870913", "100"),
        (CMS, "99999999999999999999", "100"),
        (CMS, "abc", "100"),
        (CMS, "1.5", "100"),
        (MT, "-1", "7"),
        (MT, "1025", "7"),
        (MT, "x", "7"),
    ] {
        let e = c.err(&cmd!("CONFIG", "SET", name, bad));
        assert!(e.starts_with("ERR"), "CONFIG SET {name} {bad}: {e}");
        assert_eq!(c.config_get(name), keep, "CONFIG SET {name} {bad} changed the value");
    }
    // Behaviour unchanged too.
    assert_eq!(set_with_tags(&mut c, "eight", 8), Err(too_many(7)));
    set_with_tags(&mut c, "seven", 7).unwrap();
    assert_eq!(encoding_of(&mut c, "v100", &compressible(100)), "lz4");
    assert_eq!(encoding_of(&mut c, "v99", &[b'q'; 99]), "raw");
    // Setting both in one CONFIG SET where one is bad changes neither.
    let e = c.err(&cmd!("CONFIG", "SET", CMS, "200", MT, "5000"));
    assert!(e.starts_with("ERR"), "{e}");
    assert_eq!(c.config_get(CMS), "100");
    assert_eq!(c.config_get(MT), "7");
}

fn loadmodule_args_set_configs(p: Proto) {
    let s = Server::builder().module_args(&["compress-min-size", "64"]).start();
    let mut c = s.conn_proto(p);
    assert_eq!(c.config_get(CMS), "64");
    assert_eq!(c.config_get(MT), "32");
    assert_eq!(encoding_of(&mut c, "k", &compressible(100)), "lz4");
    drop(c);

    let s = Server::builder().module_args(&["tiercache.max-tags", "3"]).start();
    let mut c = s.conn_proto(p);
    assert_eq!(c.config_get(MT), "3");
    assert_eq!(c.config_get(CMS), "1024");
    set_with_tags(&mut c, "ok", 3).unwrap();
    assert_eq!(set_with_tags(&mut c, "bad", 4), Err(too_many(3)));
    drop(c);

    let s = Server::builder().module_args(&["compress-min-size", "128", "tiercache.max-tags", "8"]).start();
    let mut c = s.conn_proto(p);
    assert_eq!(c.config_get(CMS), "128");
    assert_eq!(c.config_get(MT), "8");
    assert_eq!(encoding_of(&mut c, "a", &[b'z'; 127]), "raw");
    assert_eq!(encoding_of(&mut c, "b", &[b'z'; 128]), "lz4");
    assert_eq!(set_with_tags(&mut c, "bad", 9), Err(too_many(8)));
    // Bounds are accepted as module args.
    let s = Server::builder().module_args(&["compress-min-size", "0", "max-tags", "1024"]).start();
    let mut c = s.conn_proto(p);
    assert_eq!((c.config_get(CMS), c.config_get(MT)), ("0".to_string(), "1024".to_string()));
    let s = Server::builder().module_args(&["compress-min-size", "536870912", "max-tags", "0"]).start();
    let mut c = s.conn_proto(p);
    assert_eq!((c.config_get(CMS), c.config_get(MT)), ("536870912".to_string(), "0".to_string()));
}

fn command_line_sets_configs(p: Proto) {
    let s = Server::builder().args(&["--tiercache.max-tags", "3", "--tiercache.compress-min-size", "64"]).start();
    let mut c = s.conn_proto(p);
    assert_eq!(c.config_get(MT), "3");
    assert_eq!(c.config_get(CMS), "64");
    set_with_tags(&mut c, "ok", 3).unwrap();
    assert_eq!(set_with_tags(&mut c, "bad", 4), Err(too_many(3)));
    assert_eq!(encoding_of(&mut c, "k", &compressible(100)), "lz4");
}

#[test]
fn redis_conf_file_sets_configs() {
    let s = Server::builder()
        .conf_lines(&["tiercache.compress-min-size 64", "tiercache.max-tags 5", "tiercache.max-value-size 2048"])
        .start();
    let mut c = s.conn();
    assert_eq!(c.config_get(CMS), "64");
    assert_eq!(c.config_get(MT), "5");
    assert_eq!(c.config_get(MVS), "2048");
    assert_eq!(c.try_run(&cmd!("TIERCACHE.SET", "big", vec![b'x'; 2049])), Err(too_large(2049, 2048)));
    assert_eq!(set_with_tags(&mut c, "bad", 6), Err(too_many(5)));
    assert_eq!(encoding_of(&mut c, "k", &compressible(100)), "lz4");
}

#[test]
fn invalid_loadmodule_args_fail_to_start() {
    for args in [
        &["bogus", "1"][..],
        &["tiercache.bogus", "1"],
        &["max-tags", "5000"],
        &["max-tags", "-1"],
        &["tiercache.max-tags", "1025"],
        &["compress-min-size", "-1"],
        &["compress-min-size", "536870913"],
        &["compress-min-size", "abc"],
        &["max-value-size", "1023"],
        &["tiercache.max-value-size", "536870913"],
        &["max-value-size", "64MiB"],
    ] {
        match Server::builder().module_args(args).try_start() {
            Ok(mut s) => {
                let running = s.is_running();
                panic!("redis-server started with --loadmodule ... {} (running: {running})", args.join(" "));
            }
            Err(log) => {
                assert!(log.contains("exited"), "loadmodule {}: expected redis-server to exit, got: {log}", args.join(" "))
            }
        }
    }
    // And a valid pair still starts (the harness is not failing for another reason).
    let s = Server::builder().module_args(&["max-tags", "1024"]).start();
    assert_eq!(s.conn().config_get(MT), "1024");
}

fn too_large(n: usize, max: usize) -> String {
    format!("ERR value too large: {n} bytes decoded, more than tiercache.max-value-size ({max})")
}

/// A 2 MiB lz4 frame announcing 512 MiB (a decompression bomb) is refused by its header, before it is
/// decoded; so is any value whose decoded size exceeds tiercache.max-value-size, however it is sent.
/// A refused SET leaves the key as it was.
fn max_value_size_config_set_changes_behaviour(p: Proto) {
    let s = Server::start();
    let mut c = s.conn_proto(p);
    let bomb = lz4_frame(&vec![0u8; 512 << 20]);
    assert!(bomb.len() < 3 << 20, "{} bytes", bomb.len());
    c.set("k", "old", &[]);
    let r = c.try_run(&cmd!("TIERCACHE.SET", "k", &bomb, "ENCODING", "lz4"));
    assert_eq!(r, Err(too_large(512 << 20, 64 << 20)));
    assert_eq!(c.get("k").as_deref(), Some(&b"old"[..]), "a refused SET wrote");
    let r = c.try_run(&cmd!("TIERCACHE.SET", "k", lz4_frame(&vec![0u8; (64 << 20) + 1]), "ENCODING", "lz4"));
    assert_eq!(r, Err(too_large((64 << 20) + 1, 64 << 20)));
    c.ok(&cmd!("TIERCACHE.SET", "k64", lz4_frame(&vec![0u8; 64 << 20]), "ENCODING", "lz4"));
    assert_eq!(c.meta("k64").unwrap().size, 64 << 20);

    c.ok(&cmd!("CONFIG", "SET", MVS, "1024"));
    assert_eq!(c.config_get(MVS), "1024");
    c.ok(&cmd!("TIERCACHE.SET", "raw", vec![b'r'; 1024], "NOCOMPRESS"));
    c.ok(&cmd!("TIERCACHE.SET", "lz", lz4_frame(&[b'l'; 1024]), "ENCODING", "lz4"));
    for (what, value, opts) in [
        ("raw, compressed here", compressible(1025), &[][..]),
        ("NOCOMPRESS", vec![b'r'; 1025], &["NOCOMPRESS"][..]),
        ("ENCODING raw", vec![b'r'; 1025], &["ENCODING", "raw"][..]),
        ("ENCODING lz4", lz4_frame(&[b'l'; 1025]), &["ENCODING", "lz4"][..]),
    ] {
        let mut cm = cmd!("TIERCACHE.SET", "k", &value);
        for o in opts {
            cm.arg(*o);
        }
        assert_eq!(c.try_run(&cm), Err(too_large(1025, 1024)), "{what}");
        assert_eq!(c.get("k").as_deref(), Some(&b"old"[..]), "{what}: a refused SET wrote");
    }
    // Existing entries larger than the new setting stay readable.
    assert_eq!(c.meta("k64").unwrap().size, 64 << 20);
    // A bad frame header is still reported as such.
    assert_eq!(c.try_run(&cmd!("TIERCACHE.SET", "k", "xy", "ENCODING", "lz4")), Err("ERR invalid lz4 frame header".into()));

    for bad in ["1023", "0", "-1", "536870913", "1k"] {
        let e = c.err(&cmd!("CONFIG", "SET", MVS, bad));
        assert!(e.starts_with("ERR"), "CONFIG SET {MVS} {bad}: {e}");
        assert_eq!(c.config_get(MVS), "1024", "CONFIG SET {MVS} {bad} changed the value");
    }
    c.ok(&cmd!("CONFIG", "SET", MVS, "536870912"));
    assert_eq!(c.config_get(MVS), "536870912");
    c.ok(&cmd!("TIERCACHE.SET", "k", compressible(1025)));
}

fn max_value_size_as_loadmodule_arg_and_command_line(p: Proto) {
    for s in [
        Server::builder().module_args(&["max-value-size", "2048"]).start(),
        Server::builder().module_args(&["tiercache.max-value-size", "2048"]).start(),
        Server::builder().args(&["--tiercache.max-value-size", "2048"]).start(),
    ] {
        let mut c = s.conn_proto(p);
        assert_eq!(c.config_get(MVS), "2048");
        c.ok(&cmd!("TIERCACHE.SET", "ok", vec![b'x'; 2048]));
        assert_eq!(c.try_run(&cmd!("TIERCACHE.SET", "big", vec![b'x'; 2049])), Err(too_large(2049, 2048)));
        assert!(!c.exists("big"));
    }
    let s = Server::builder().module_args(&["max-value-size", "1024"]).start();
    assert_eq!(s.conn_proto(p).config_get(MVS), "1024");
}

/// Like max-tags, the local max-value-size is not applied to what was already accepted elsewhere: a
/// replica with a lower setting takes the master's SET, and an AOF or RDB restart with a lower setting
/// brings the entry back.
#[test]
fn max_value_size_does_not_apply_to_replicated_or_loaded_entries() {
    let mut m = Server::builder().args(&["--appendonly", "yes", "--aof-use-rdb-preamble", "no"]).start();
    m.wait_no_background_job();
    let r = m.start_replica(Server::builder().args(&["--tiercache.max-value-size", "1024"]));
    let mut mc = m.conn();
    let big = compressible(5000);
    mc.ok(&cmd!("TIERCACHE.SET", "big", &big, "TAGS", 1, "t"));
    mc.ok(&cmd!("TIERCACHE.SET", "frame", lz4_frame(&[7u8; 3000]), "ENCODING", "lz4"));
    mc.int(&cmd!("WAIT", 1, 5000));
    let mut rc = r.conn();
    assert_eq!(rc.get("big"), Some(big.clone()), "the replica refused the master's SET");
    assert_eq!(rc.get("frame"), Some(vec![7u8; 3000]));
    drop(mc);
    // AOF replay (no preamble: the entries come back as TIERCACHE.SET) with a lower setting.
    m.restart_with_args(&["--tiercache.max-value-size", "1024"]);
    let mut mc = m.conn();
    assert_eq!(mc.config_get(MVS), "1024");
    assert_eq!(mc.get("big"), Some(big.clone()), "AOF replay refused the entry");
    assert_eq!(mc.get("frame"), Some(vec![7u8; 3000]));
    // RDB load with a lower setting.
    mc.ok(&cmd!("DEBUG", "RELOAD"));
    assert_eq!(mc.get("big"), Some(big));
    assert_eq!(mc.try_run(&cmd!("TIERCACHE.SET", "new", compressible(5000))), Err(too_large(5000, 1024)));
}
