"""Native Redis commands on tiercache keys: DEL/UNLINK/EXISTS/TYPE/TTL/PTTL/EXPIRE/PERSIST/RENAME/COPY/MOVE/
DUMP/RESTORE/MEMORY USAGE, DEBUG DIGEST-VALUE, DEBUG RELOAD, ACL and client tracking."""

import time
import uuid

import pytest
import redis

from helpers import (
    capture,
    populate,
    compressible,
    get_encoded,
    incompressible,
    meta,
    now_ms,
    stable,
    stats,
    tc_get,
    tc_set,
    wait_for,
)


def pexpiretime(r, key):
    return r.execute_command("PEXPIRETIME", key)


# ---- basic native commands --------------------------------------------------------------------------


def test_type_exists_del_unlink(r):
    tc_set(r, b"a", b"1")
    tc_set(r, b"b", b"2")
    tc_set(r, b"c", b"3")
    assert r.type(b"a") == b"tiercache"
    assert r.exists(b"a", b"b", b"c", b"zz") == 3
    assert r.delete(b"a") == 1
    assert tc_get(r, b"a") is None
    assert r.unlink(b"b") == 1
    assert r.exists(b"a", b"b", b"c") == 1
    assert stats(r)["entries"] == 1
    assert r.keys(b"*") == [b"c"]
    assert r.scan(0, _type="tiercache")[1] == [b"c"]


def test_expire_and_ttl_on_entry(r):
    tc_set(r, b"k", b"v")
    assert r.ttl(b"k") == -1
    assert r.expire(b"k", 100)
    assert r.ttl(b"k") in (99, 100)
    m = meta(r, b"k")
    assert m["expire_at_ms"] == pexpiretime(r, b"k")
    assert 99_000 < m["stale_ttl_ms"] <= 100_000
    assert m["fresh_until_ms"] == -1
    assert m["state"] == b"fresh"
    assert tc_get(r, b"k") == b"v"


def test_pexpire_shortens_the_stale_window(r):
    tc_set(r, b"k", b"v", "PX", 100, "STALE", 100)
    time.sleep(0.2)
    assert meta(r, b"k")["state"] == b"stale"
    r.pexpire(b"k", 100)
    wait_for(lambda: r.exists(b"k") == 0, timeout=2, what="expiry after PEXPIRE")
    assert r.execute_command("TIERCACHE.META", b"k") is None


def test_persist_removes_key_ttl_but_not_fresh_deadline(r):
    tc_set(r, b"k", b"v", "PX", 300, "STALE", 10)
    fresh_until = meta(r, b"k")["fresh_until_ms"]
    assert r.persist(b"k")
    assert r.pttl(b"k") == -1
    m = meta(r, b"k")
    assert m["expire_at_ms"] == -1 and m["stale_ttl_ms"] == -1
    assert m["fresh_until_ms"] == fresh_until
    time.sleep(0.45)
    m = meta(r, b"k")
    assert m["state"] == b"stale"
    assert m["fresh_ttl_ms"] == 0
    assert m["stale_ttl_ms"] == -1
    assert tc_get(r, b"k") is None
    assert r.exists(b"k") == 1


def test_rename(r):
    tc_set(r, b"src", compressible(4000), "EX", 100, "STALE", 5, "TAGS", 2, b"x", b"y", "CREATED", 99)
    before = stable(meta(r, b"src"))
    r.rename(b"src", b"dst")
    assert r.exists(b"src") == 0
    assert stable(meta(r, b"dst")) == before
    assert tc_get(r, b"dst") == compressible(4000)
    assert pexpiretime(r, b"dst") == before["expire_at_ms"]
    assert stats(r)["entries"] == 1


def test_rename_over_existing_entry(r):
    tc_set(r, b"a", b"A", "TAGS", 1, b"ta")
    tc_set(r, b"b", compressible(3000), "TAGS", 1, b"tb")
    r.rename(b"a", b"b")
    assert tc_get(r, b"b") == b"A"
    assert meta(r, b"b")["tags"] == [b"ta"]
    s = stats(r)
    assert s["entries"] == 1
    assert s["compressed_entries"] == 0
    assert s["bytes_original"] == 1


def test_copy_is_independent(r):
    tc_set(r, b"src", compressible(4000), "EX", 100, "TAGS", 1, b"t", "CREATED", 5)
    assert r.copy(b"src", b"dst")
    src_meta = stable(meta(r, b"src"))
    assert stable(meta(r, b"dst")) == src_meta
    assert pexpiretime(r, b"dst") == pexpiretime(r, b"src")
    assert get_encoded(r, b"dst") == get_encoded(r, b"src")
    s = stats(r)
    assert s["entries"] == 2 and s["compressed_entries"] == 2
    assert s["bytes_original"] == 8000
    # changing one does not change the other
    tc_set(r, b"src", b"changed")
    assert tc_get(r, b"dst") == compressible(4000)
    assert meta(r, b"dst")["tags"] == [b"t"]
    r.delete(b"dst")
    assert tc_get(r, b"src") == b"changed"
    # COPY without REPLACE onto an existing key fails, with REPLACE it overwrites
    tc_set(r, b"dst", b"other")
    assert not r.copy(b"src", b"dst")
    assert tc_get(r, b"dst") == b"other"
    assert r.copy(b"src", b"dst", replace=True)
    assert tc_get(r, b"dst") == b"changed"


def test_copy_and_move_to_another_db(r, r_db1):
    tc_set(r, b"k", b"v", "TAGS", 1, b"t", "EX", 100)
    m = stable(meta(r, b"k"))
    assert r.copy(b"k", b"k", destination_db=1)
    assert stable(meta(r_db1, b"k")) == m
    r_db1.delete(b"k")
    assert r.move(b"k", 1)
    assert r.exists(b"k") == 0
    assert tc_get(r_db1, b"k") == b"v"
    assert stable(meta(r_db1, b"k")) == m
    assert stats(r)["entries"] == 1


def test_dump_restore(r):
    tc_set(r, b"k", compressible(3000), "EX", 100, "STALE", 5, "TAGS", 2, b"\x00", b"t", "CREATED", 77)
    m = stable(meta(r, b"k"))
    payload = r.dump(b"k")
    assert payload
    r.delete(b"k")
    r.restore(b"k", 0, payload)
    restored = meta(r, b"k")
    assert r.pttl(b"k") == -1
    expected = dict(m, expire_at_ms=-1)
    assert stable(restored) == expected
    assert tc_get(r, b"k") == compressible(3000)
    # with a TTL, with REPLACE and ABSTTL
    at = now_ms() + 50_000
    r.restore(b"k", at, payload, replace=True, absttl=True)
    assert pexpiretime(r, b"k") == at
    assert stable(meta(r, b"k")) == dict(m, expire_at_ms=at)
    r.restore(b"k2", 5000, payload)
    assert 4000 < r.pttl(b"k2") <= 5000
    assert get_encoded(r, b"k2") == get_encoded(r, b"k")
    assert stats(r)["entries"] == 2


def test_memory_usage(r):
    tc_set(r, b"small", b"x")
    tc_set(r, b"big", incompressible(100_000))
    tc_set(r, b"comp", compressible(100_000))
    small = r.memory_usage(b"small")
    big = r.memory_usage(b"big")
    comp = r.memory_usage(b"comp")
    assert isinstance(small, int) and small > 0
    assert big >= small + 99_000
    assert small < comp < big, "a compressed entry is counted at its stored size"


def test_debug_digest_value(r):
    tc_set(r, b"a", b"one", "CREATED", 1)
    tc_set(r, b"b", b"two", "CREATED", 1)
    tc_set(r, b"c", b"three", "CREATED", 1)
    da, db, dc = r.execute_command("DEBUG", "DIGEST-VALUE", b"a", b"b", b"c")
    zero = b"0" * 40
    assert zero not in (da, db, dc), "the type needs a digest callback"
    assert len({da, db, dc}) == 3, "different values, different digests"
    r.execute_command("DEBUG", "RELOAD")
    assert r.execute_command("DEBUG", "DIGEST-VALUE", b"a", b"b", b"c") == [da, db, dc]


# ---- DEBUG RELOAD --------------------------------------------------------------------------------------


def test_debug_reload_preserves_everything(r, r_db1):
    keys = populate(r, r_db1)
    clients = {0: r, 1: r_db1}
    before = capture(clients, keys)
    stats_before = stats(r)
    digest = r.execute_command("DEBUG", "DIGEST")
    assert r.execute_command("DEBUG", "RELOAD") == b"OK"
    after = capture(clients, keys)
    assert after == before
    assert r.execute_command("DEBUG", "DIGEST") == digest
    s = stats(r)
    for f in ("entries", "compressed_entries", "bytes_original", "bytes_stored"):
        assert s[f] == stats_before[f], f
    assert r.get(b"native") == b"string"
    assert meta(r, b"stale")["state"] == b"stale"


# ---- ACL and client tracking ---------------------------------------------------------------------------------


def test_read_only_acl_user_may_get(server, r):
    tc_set(r, b"k", b"v")
    user = f"ro_{uuid.uuid4().hex[:8]}"
    r.execute_command("ACL", "SETUSER", user, "on", ">pw", "%R~*", "+tiercache.get")
    try:
        ro = server.client(protocol=r.tc_protocol, username=user, password="pw")
        assert ro.execute_command("TIERCACHE.GET", b"k") == b"v"
        assert ro.execute_command("TIERCACHE.GET", b"k", "ENCODED") == [b"raw", b"v"]
        with pytest.raises(redis.exceptions.NoPermissionError):
            ro.execute_command("TIERCACHE.SET", b"k", b"w")
        assert tc_get(r, b"k") == b"v"
        ro.close()
    finally:
        r.execute_command("ACL", "DELUSER", user)


def test_client_tracking_invalidates_after_tiercache_get(server, r):
    """A TIERCACHE.GET is tracked (readonly command with a declared key), hits and misses alike: later
    writes send invalidations for those keys to the redirect connection."""
    tc_set(r, b"k", b"v")
    listener = redis.Connection(host="127.0.0.1", port=server.port, protocol=2, socket_timeout=5)
    tracker = redis.Connection(host="127.0.0.1", port=server.port, protocol=r.tc_protocol, socket_timeout=5)
    try:
        listener.send_command("CLIENT", "ID")
        listener_id = listener.read_response()
        listener.send_command("SUBSCRIBE", "__redis__:invalidate")
        assert listener.read_response()[0] == b"subscribe"
        tracker.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", listener_id)
        assert tracker.read_response() == b"OK"
        tracker.send_command("TIERCACHE.GET", b"k")
        assert tracker.read_response() == b"v"
        tracker.send_command("TIERCACHE.GET", b"missing")
        assert tracker.read_response() is None
        tc_set(r, b"k", b"v2")
        tc_set(r, b"missing", b"now here")
        got = set()
        deadline = time.monotonic() + 3
        while not {b"k", b"missing"} <= got and time.monotonic() < deadline:
            if listener.can_read(timeout=0.1):
                msg = listener.read_response()
                assert msg[0] == b"message" and msg[1] == b"__redis__:invalidate", msg
                got.update(msg[2] or [])
        assert {b"k", b"missing"} <= got
    finally:
        listener.disconnect()
        tracker.disconnect()


def test_resp3_tracking_push_after_tiercache_get(server):
    """RESP3 client tracking without REDIRECT: the invalidation arrives as a push on the reading
    connection."""
    key = f"track-{uuid.uuid4().hex}".encode()
    writer = server.client(protocol=2)
    tc_set(writer, key, b"v")
    got = []
    tracker = redis.Connection(host="127.0.0.1", port=server.port, protocol=3, socket_timeout=5)
    try:
        tracker.connect()
        tracker._parser.set_invalidation_push_handler(lambda push: got.append(push))
        tracker.send_command("CLIENT", "TRACKING", "ON")
        assert tracker.read_response() == b"OK"
        tracker.send_command("TIERCACHE.GET", key)
        assert tracker.read_response() == b"v"
        tc_set(writer, key, b"v2")
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            tracker.send_command("PING")
            assert tracker.read_response() == b"PONG"
        assert got, "no invalidation push"
        assert got[0][0] == b"invalidate"
        assert key in (got[0][1] or [])
    finally:
        tracker.disconnect()
        writer.delete(key)
