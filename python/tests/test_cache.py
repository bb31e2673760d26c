"""TierCache basics: namespacing and value format (as the Rust client writes them), get/set/delete,
get_or_load through L1 and L2, L1 bounds."""

from __future__ import annotations

import os
import struct
import time

import lz4.block
import msgpack
import pytest

from conftest import wait_for
from tiercache import TierCache


def meta(r, key):
    m = r.execute_command("TIERCACHE.META", key)
    return None if m is None else dict(zip(m[::2], m[1::2]))


def test_keys_and_tags_are_namespaced_like_the_rust_client(make_cache, r):
    c = make_cache(namespace="app", schema_version=3)
    assert c.redis_key("user:42") == "app:v3:user:42"
    assert c.namespace_tag == "ns:app:v3"
    c.set("user:42", {"id": 42, "name": "Ada"}, ttl=60, stale=300, tags=["user:42", "team:7"])
    m = meta(r, "app:v3:user:42")
    assert m[b"tags"] == [b"ns:app:v3", b"user:42", b"team:7"]
    assert m[b"encoding"] == b"raw"
    assert 59_000 < m[b"fresh_ttl_ms"] <= 60_000
    assert 359_000 < m[b"stale_ttl_ms"] <= 360_000
    # MessagePack map with named fields, what rmp-serde's to_vec_named writes.
    assert r.execute_command("TIERCACHE.GET", "app:v3:user:42") == msgpack.packb({"id": 42, "name": "Ada"})


def test_raw_bytes_are_stored_verbatim(make_cache, r):
    c = make_cache()
    c.set("blob", b"\x00\xffbytes", raw=True)
    assert r.execute_command("TIERCACHE.GET", "t:v1:blob") == b"\x00\xffbytes"
    assert c.get("blob", raw=True) == b"\x00\xffbytes"
    # bytes without raw=True are MessagePack bin, and come back as bytes.
    c.set("bin", b"\x01\x02")
    assert r.execute_command("TIERCACHE.GET", "t:v1:bin") == msgpack.packb(b"\x01\x02", use_bin_type=True)
    assert c.get("bin") == b"\x01\x02"


def test_large_values_travel_as_the_client_side_lz4_frame(make_cache, r):
    c = make_cache(compress_min_size=1024)
    value = {"rows": [{"id": i, "ok": True, "name": "row"} for i in range(200)]}
    c.set("report", value)
    m = meta(r, "t:v1:report")
    assert m[b"encoding"] == b"lz4"
    enc, stored = r.execute_command("TIERCACHE.GET", "t:v1:report", "ENCODED")
    packed = msgpack.packb(value)
    assert enc == b"lz4"
    assert stored == struct.pack("<I", len(packed)) + lz4.block.compress(packed, store_size=False)
    other = make_cache()
    assert other.get("report") == value
    assert other.get_or_load("report", lambda: pytest.fail("must not load")) == value
    # Incompressible data is sent raw (NOCOMPRESS), so the server does not try again.
    c.set("noise", os.urandom(4096), raw=True)
    assert meta(r, "t:v1:noise")[b"encoding"] == b"raw"


def test_get_or_load_loads_once_then_serves_l1(make_cache, r):
    c = make_cache()
    calls = []

    def load():
        calls.append(1)
        return {"n": len(calls)}

    assert c.get_or_load("k", load, ttl=60) == {"n": 1}
    assert c.get_or_load("k", load, ttl=60) == {"n": 1}
    assert calls == [1]
    s = c.stats()
    assert (s["l1_hits"], s["l2_misses"], s["loads"], s["l1_entries"]) == (1, 1, 1, 1)
    # Another process (cache instance) finds it in Redis: an L2 hit, then L1.
    d = make_cache()
    assert d.get_or_load("k", load, ttl=60) == {"n": 1}
    assert d.get_or_load("k", load, ttl=60) == {"n": 1}
    assert d.stats()["l2_hits"] == 1 and d.stats()["l1_hits"] == 1
    assert calls == [1]


def test_get_set_delete_and_flush_namespace(make_cache, r):
    c = make_cache()
    assert c.get("missing") is None
    assert c.get("missing", default=0) == 0
    c.set("a", [1, 2, 3], ttl="1m")
    assert c.get("a") == [1, 2, 3]
    assert c.delete("a") == 1
    assert c.get("a") is None
    assert r.exists("t:v1:a") == 0
    c.set("b", 1)
    c.set("c", 2)
    other_ns = make_cache(namespace="other")
    other_ns.set("b", 3)
    assert c.flush_namespace() == 2
    assert c.get("b") is None and c.get("c") is None
    assert other_ns.get("b") == 3


def test_schema_version_abandons_old_entries(make_cache):
    v1 = make_cache(schema_version=1)
    v2 = make_cache(schema_version=2)
    v1.set("k", "old")
    assert v2.get("k") is None


def test_l1_is_bounded_by_the_servers_fresh_time(make_cache, r):
    c = make_cache(l1_ttl=60)
    # Another writer stored the entry with a short fresh period: L1 must not keep it longer.
    r.execute_command("TIERCACHE.SET", "t:v1:short", msgpack.packb("v"), "PX", 30_000, "TAGS", 1, "ns:t:v1")
    # Its key push must not race the read below (it would rightly void the read's L1 insert).
    wait_for(lambda: c.stats()["invalidations_received"] >= 1, what="the key push")
    before = time.monotonic()
    assert c.get_or_load("short", lambda: "loaded", ttl=600) == "v"
    entry = c._core._l1["short"]
    assert entry.until - before <= 30.0 + 0.5
    # ttl and l1_ttl bound it too.
    d = make_cache(l1_ttl=5)
    d.set("x", 1, ttl=600)
    assert d._core._l1["x"].until - time.monotonic() <= 5.0


def test_l1_is_bounded_by_bytes(make_cache):
    c = make_cache(l1_max_bytes=4000)
    for i in range(20):
        c.set(f"k{i}", "x" * 500, raw=False)
    s = c.stats()
    assert s["l1_bytes"] <= 4000
    assert 0 < s["l1_entries"] < 20
    # The most recent ones stay (LRU).
    assert "k19" in c._core._l1


def test_decode_responses_and_options_of_the_callers_client_do_not_matter(make_cache, r):
    c = make_cache(client_kw={"decode_responses": True})
    c.set("k", {"b": b"\xff"})
    assert c.get("k") == {"b": b"\xff"}
    assert c.get_or_load("k2", lambda: "v") == "v"


def test_durations(make_cache, r):
    from tiercache import seconds

    assert seconds("1h30m") == 5400
    assert seconds("500ms") == 0.5
    assert seconds(2) == 2
    with pytest.raises(ValueError):
        seconds("5 minutes")
    c = make_cache()
    c.set("k", 1, ttl="2m", stale="1h")
    m = meta(r, "t:v1:k")
    assert 119_000 < m[b"fresh_ttl_ms"] <= 120_000
    assert m[b"stale_ttl_ms"] > 3_600_000


def test_ttl_jitter_shortens_ttls(make_cache, r):
    c = make_cache(ttl_jitter=0.5)
    for i in range(10):
        c.set(f"k{i}", i, ttl=100)
    ttls = [meta(r, f"t:v1:k{i}")[b"fresh_ttl_ms"] for i in range(10)]
    assert all(50_000 <= t <= 100_000 for t in ttls)
    assert len(set(t // 1000 for t in ttls)) > 1


def test_wait_for_helper_is_bounded():
    with pytest.raises(AssertionError):
        wait_for(lambda: False, timeout=0.05)


def test_close_is_idempotent_enough(server):
    c = TierCache(server.client(), registry=None)
    c.close()


def test_raw_values_through_the_lease_path_and_lz4(make_cache, r):
    a = make_cache()
    payload = b"<tr><td>row</td></tr>" * 200
    assert a.get_or_load("page", lambda: payload, raw=True) == payload
    m = meta(r, "t:v1:page")
    assert m[b"encoding"] == b"lz4" and m[b"size"] == len(payload)
    b = make_cache()
    assert b.get_or_load("page", lambda: pytest.fail("must be a hit"), raw=True) == payload
    assert b.get("page", raw=True) == payload
    with pytest.raises(Exception, match="raw=True needs bytes"):
        a.set("x", "not bytes", raw=True)
