//! Multi-tenant ACL on tags: a tag is subject to the caller's ACL key patterns, as if it were a key.
//! Two tenants, `alice` (`~tenantA:*`) and `bob` (`~tenantB:*`), over RESP2 and RESP3: neither can list,
//! count or invalidate the other's tags, nor attach an entry to them; TAGKEYS lists only readable keys;
//! read-only and write-only patterns; MULTI and Lua; replication, AOF replay and the default user
//! keep working.

#[macro_use]
mod common;

use common::*;

/// Redis 7.0's own error for a denied key.
const NOPERM: &str = "NOPERM this user has no permissions to access one of the keys used as arguments";

const TENANT_CMDS: [&str; 7] = [
    "+tiercache.set",
    "+tiercache.get",
    "+tiercache.meta",
    "+tiercache.invalidate",
    "+tiercache.tagcount",
    "+tiercache.tagkeys",
    "+@all",
];

proto_tests!(
    tenants_cannot_reach_each_others_tags,
    tagkeys_lists_only_readable_keys,
    read_only_and_write_only_patterns,
    multi_and_lua_are_checked_too,
);

fn add_user(admin: &mut Conn, name: &str, patterns: &[&str]) {
    let mut c = cmd!("ACL", "SETUSER", name, "on", ">pw", "resetkeys");
    for p in patterns {
        c.arg(*p);
    }
    for p in TENANT_CMDS {
        c.arg(p);
    }
    admin.ok(&c);
}

fn login(s: &Server, p: Proto, user: &str) -> Conn {
    let mut c = s.conn_proto(p);
    c.ok(&cmd!("AUTH", user, "pw"));
    c
}

fn keys_of(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = as_list(v).unwrap_or_else(|| panic!("TAGKEYS: {v:?}")).iter().filter_map(as_string).collect();
    k.sort();
    k
}

/// Two tenants with two entries each, under their own tags.
fn tenants(s: &Server, p: Proto) -> (Conn, Conn, Conn) {
    let mut admin = s.conn_proto(p);
    add_user(&mut admin, "alice", &["~tenantA:*"]);
    add_user(&mut admin, "bob", &["~tenantB:*"]);
    let mut a = login(s, p, "alice");
    let mut b = login(s, p, "bob");
    for i in 0..2 {
        a.set(format!("tenantA:k{i}"), "a", &["TAGS", "1", "tenantA:org:7"]);
        b.set(format!("tenantB:k{i}"), "b", &["TAGS", "2", "tenantB:org:9", "tenantB:all"]);
    }
    (admin, a, b)
}

fn tenants_cannot_reach_each_others_tags(p: Proto) {
    let s = Server::start();
    let (mut admin, mut a, mut b) = tenants(&s, p);
    // Each tenant sees its own tags.
    assert_eq!(a.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7")), 2);
    assert_eq!(keys_of(&a.run(&cmd!("TIERCACHE.TAGKEYS", "tenantA:org:7"))), ["tenantA:k0", "tenantA:k1"]);
    // And nothing of the other's: listing, counting, invalidating, attaching.
    a.expect_err(&cmd!("TIERCACHE.TAGKEYS", "tenantB:org:9"), NOPERM);
    a.expect_err(&cmd!("TIERCACHE.TAGKEYS", "tenantB:org:9", "COUNT", 10), NOPERM);
    a.expect_err(&cmd!("TIERCACHE.TAGCOUNT", "tenantB:org:9"), NOPERM);
    a.expect_err(&cmd!("TIERCACHE.INVALIDATE", "tenantB:org:9"), NOPERM);
    // One denied tag refuses the whole INVALIDATE: the allowed one is not invalidated either.
    a.expect_err(&cmd!("TIERCACHE.INVALIDATE", "tenantA:org:7", "tenantB:org:9"), NOPERM);
    assert_eq!(a.get("tenantA:k0").as_deref(), Some(&b"a"[..]));
    a.expect_err(&cmd!("TIERCACHE.SET", "tenantA:x", "v", "TAGS", 2, "tenantA:org:7", "tenantB:org:9"), NOPERM);
    assert!(!admin.exists("tenantA:x"), "a refused SET wrote");
    b.expect_err(&cmd!("TIERCACHE.INVALIDATE", "tenantA:org:7"), NOPERM);
    b.expect_err(&cmd!("TIERCACHE.TAGKEYS", "tenantA:org:7"), NOPERM);
    // Unprefixed tags are outside every tenant's patterns.
    a.expect_err(&cmd!("TIERCACHE.INVALIDATE", "org:9"), NOPERM);
    a.expect_err(&cmd!("TIERCACHE.SET", "tenantA:y", "v", "TAGS", 1, "org:9"), NOPERM);
    // Nothing of B's changed.
    assert_eq!(admin.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantB:org:9")), 2);
    assert_eq!(b.get("tenantB:k0").as_deref(), Some(&b"b"[..]));
    assert_eq!(admin.stats().get("invalidations"), 0);
    // The denials are in ACL LOG, as Redis records denied keys.
    let log = admin.run(&cmd!("ACL", "LOG"));
    let text = format!("{log:?}");
    assert!(text.contains("tenantB:org:9") && text.contains("alice"), "ACL LOG: {text}");
    // A tenant invalidates its own tag.
    assert_eq!(b.int(&cmd!("TIERCACHE.INVALIDATE", "tenantB:all")), 2);
    assert_eq!(b.get("tenantB:k0"), None);
    assert_eq!(a.get("tenantA:k0").as_deref(), Some(&b"a"[..]));
    // The default user (~*) keeps every tag command.
    assert_eq!(admin.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7")), 2);
    assert_eq!(admin.int(&cmd!("TIERCACHE.INVALIDATE", "tenantA:org:7")), 2);
    admin.set("plain", "v", &["TAGS", "1", "org:9"]);
}

/// Entries of both tenants under one tag (attached by a user allowed everything): each tenant's
/// TAGKEYS lists only the keys it may read, up to COUNT of them.
fn tagkeys_lists_only_readable_keys(p: Proto) {
    let s = Server::start();
    let mut admin = s.conn_proto(p);
    add_user(&mut admin, "alice", &["~tenantA:*", "~shared:*"]);
    for i in 0..5 {
        admin.set(format!("tenantB:k{i}"), "b", &["TAGS", "1", "shared:tag"]);
    }
    for i in 0..3 {
        admin.set(format!("tenantA:k{i}"), "a", &["TAGS", "1", "shared:tag"]);
    }
    let mut a = login(&s, p, "alice");
    assert_eq!(keys_of(&a.run(&cmd!("TIERCACHE.TAGKEYS", "shared:tag"))), ["tenantA:k0", "tenantA:k1", "tenantA:k2"]);
    let two = keys_of(&a.run(&cmd!("TIERCACHE.TAGKEYS", "shared:tag", "COUNT", 2)));
    assert_eq!(two.len(), 2, "COUNT counts readable keys: {two:?}");
    assert!(two.iter().all(|k| k.starts_with("tenantA:")), "{two:?}");
    assert_eq!(keys_of(&admin.run(&cmd!("TIERCACHE.TAGKEYS", "shared:tag"))).len(), 8);
    // A user who may read every key sees them all; a broad pattern that is not all-keys still filters.
    add_user(&mut admin, "all_reader", &["%R~*"]);
    add_user(&mut admin, "broad", &["~*:*", "~*A*"]);
    assert_eq!(keys_of(&login(&s, p, "all_reader").run(&cmd!("TIERCACHE.TAGKEYS", "shared:tag"))).len(), 8);
    admin.set("shared:b", "b", &["TAGS", "1", "shared:tag"]);
    admin.set("nocolon", "b", &["TAGS", "1", "shared:tag"]);
    admin.set("nocolonA", "b", &["TAGS", "1", "shared:tag"]);
    let broad = keys_of(&login(&s, p, "broad").run(&cmd!("TIERCACHE.TAGKEYS", "shared:tag")));
    assert_eq!(broad.len(), 10, "{broad:?}");
    assert!(!broad.contains(&"nocolon".to_string()), "{broad:?}");
    // TAGCOUNT counts every entry under a tag the user may read (documented).
    assert_eq!(a.int(&cmd!("TIERCACHE.TAGCOUNT", "shared:tag")), 11);
}

fn read_only_and_write_only_patterns(p: Proto) {
    let s = Server::start();
    let (mut admin, mut a, _b) = tenants(&s, p);
    add_user(&mut admin, "reader", &["%R~tenantA:*"]);
    add_user(&mut admin, "writer", &["%W~tenantA:*"]);
    let mut r = login(&s, p, "reader");
    let mut w = login(&s, p, "writer");
    // Reading a tag needs read permission, invalidating or attaching needs write permission.
    assert_eq!(r.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7")), 2);
    assert_eq!(keys_of(&r.run(&cmd!("TIERCACHE.TAGKEYS", "tenantA:org:7"))).len(), 2);
    r.expect_err(&cmd!("TIERCACHE.INVALIDATE", "tenantA:org:7"), NOPERM);
    w.expect_err(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7"), NOPERM);
    w.expect_err(&cmd!("TIERCACHE.TAGKEYS", "tenantA:org:7"), NOPERM);
    w.ok(&cmd!("TIERCACHE.SET", "tenantA:w", "v", "TAGS", 1, "tenantA:org:7"));
    assert_eq!(a.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7")), 3);
    assert_eq!(w.int(&cmd!("TIERCACHE.INVALIDATE", "tenantA:org:7")), 3);
    assert_eq!(a.get("tenantA:k0"), None);
}

fn multi_and_lua_are_checked_too(p: Proto) {
    let s = Server::start();
    let (mut admin, mut a, _b) = tenants(&s, p);
    let r = a.pipeline(&[
        cmd!("MULTI"),
        cmd!("TIERCACHE.INVALIDATE", "tenantB:org:9"),
        cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7"),
        cmd!("EXEC"),
    ]);
    let exec = as_list(&r[3]).unwrap_or_else(|| panic!("EXEC: {r:?}"));
    match &exec[0] {
        Value::ServerError(e) => assert_eq!(error_text(e), NOPERM),
        other => panic!("INVALIDATE inside MULTI: {other:?}"),
    }
    assert_eq!(as_int(&exec[1]), Some(2));
    let e = a.err(&cmd!("EVAL", "return redis.call('TIERCACHE.INVALIDATE', ARGV[1])", 0, "tenantB:org:9"));
    assert!(e.starts_with(NOPERM), "Lua: {e}");
    let e = a.err(&cmd!("EVAL", "return redis.call('TIERCACHE.TAGKEYS', ARGV[1])", 0, "tenantB:org:9"));
    assert!(e.starts_with(NOPERM), "Lua: {e}");
    assert_eq!(a.int(&cmd!("EVAL", "return redis.call('TIERCACHE.TAGCOUNT', ARGV[1])", 0, "tenantA:org:7")), 2);
    assert_eq!(admin.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantB:org:9")), 2);
}

/// Commands without a client user are not checked: a replica applies a tenant's INVALIDATE from the
/// master's stream, and an AOF replay brings back the tenant's SETs and INVALIDATE.
#[test]
fn replication_and_aof_replay_apply_tenant_writes() {
    let mut m = Server::builder().args(&["--appendonly", "yes"]).start();
    m.wait_no_background_job();
    let replica = m.start_replica(Server::builder());
    let (mut admin, mut a, mut b) = tenants(&m, Proto::Resp2);
    assert_eq!(b.int(&cmd!("TIERCACHE.INVALIDATE", "tenantB:all")), 2);
    a.set("tenantA:later", "v", &["TAGS", "1", "tenantA:org:7"]);
    admin.int(&cmd!("WAIT", 1, 5000));
    let mut rc = replica.conn();
    assert!(wait_until(ms(5000), || rc.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7")) == 3));
    assert_eq!(rc.get("tenantB:k0"), None, "the replica did not apply the tenant's INVALIDATE");
    drop((admin, a, b, rc));
    // The ACL users are not persisted (no aclfile), so the replay runs with no user at all.
    m.restart();
    let mut c = m.conn();
    assert_eq!(c.int(&cmd!("TIERCACHE.TAGCOUNT", "tenantA:org:7")), 3);
    assert_eq!(c.get("tenantA:later").as_deref(), Some(&b"v"[..]));
    assert_eq!(c.get("tenantB:k0"), None);
}
