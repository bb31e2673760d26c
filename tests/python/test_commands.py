"""TIERCACHE.SET / GET / META semantics: values, TTLs (fresh -> stale -> gone), KEEPTTL, tags, CREATED,
compression, ENCODING and binary safety. Every test runs under RESP2 and RESP3."""

import struct
import time

import pytest

from helpers import (
    compressible,
    get_encoded,
    incompressible,
    lz4_frame,
    lz4_unframe,
    meta,
    now_ms,
    protocol_of,
    tc_get,
    tc_set,
    wait_for,
)

SLACK_MS = 5  # clock granularity between this process and the server (same host clock)


def pexpiretime(r, key) -> int:
    return r.execute_command("PEXPIRETIME", key)


# ---- basic SET / GET / META -----------------------------------------------------------------------


def test_set_replies_ok_and_get_returns_value(r):
    assert tc_set(r, b"k", b"hello") == b"OK"
    assert tc_get(r, b"k") == b"hello"
    assert r.exists(b"k") == 1


def test_missing_key_is_nil_everywhere(r):
    assert tc_get(r, b"nope") is None
    assert tc_get(r, b"nope", "ENCODED") is None
    assert r.execute_command("TIERCACHE.META", b"nope") is None


def test_meta_raw_shape_per_protocol(r):
    tc_set(r, b"k", b"abc", "TAGS", 2, b"t1", b"t2")
    raw = r.execute_command("TIERCACHE.META", b"k")
    names = [
        b"state", b"fresh_ttl_ms", b"stale_ttl_ms", b"fresh_until_ms", b"expire_at_ms",
        b"tags", b"encoding", b"size", b"stored_size", b"created_ms",
    ]
    if protocol_of(r) == 2:
        assert isinstance(raw, list) and len(raw) == 20
        assert raw[0::2] == names
        assert raw[1] == b"fresh"
        assert raw[11] == [b"t1", b"t2"]
    else:
        assert isinstance(raw, dict)
        assert list(raw.keys()) == names
        assert raw[b"state"] == b"fresh"
        assert raw[b"tags"] == [b"t1", b"t2"]


def test_meta_of_entry_without_ttl(r):
    before = now_ms()
    tc_set(r, b"k", b"hello")
    after = now_ms()
    m = meta(r, b"k")
    assert m["state"] == b"fresh"
    assert m["fresh_ttl_ms"] == -1
    assert m["stale_ttl_ms"] == -1
    assert m["fresh_until_ms"] == -1
    assert m["expire_at_ms"] == -1
    assert m["tags"] == []
    assert m["encoding"] == b"raw"
    assert m["size"] == 5
    assert m["stored_size"] == 5
    assert before - SLACK_MS <= m["created_ms"] <= after + SLACK_MS
    assert r.pttl(b"k") == -1


def test_overwrite_replaces_value_tags_and_ttl(r):
    tc_set(r, b"k", b"v1", "EX", 100, "STALE", 10, "TAGS", 1, b"old")
    assert r.ttl(b"k") > 100
    tc_set(r, b"k", b"v2")
    assert tc_get(r, b"k") == b"v2"
    assert r.pttl(b"k") == -1, "old TTL is replaced by the new one (none)"
    m = meta(r, b"k")
    assert m["tags"] == []
    assert m["fresh_until_ms"] == -1 and m["expire_at_ms"] == -1
    tc_set(r, b"k", b"v3", "PX", 5000)
    assert 4000 < r.pttl(b"k") <= 5000
    assert r.dbsize() == 1


# ---- fresh period and stale window -----------------------------------------------------------------


def test_ttl_is_fresh_plus_stale(r):
    before = now_ms()
    tc_set(r, b"k", b"v", "PX", 1000, "STALE", 10)
    after = now_ms()
    pttl = r.pttl(b"k")
    assert 10000 < pttl <= 11000
    m = meta(r, b"k")
    assert m["state"] == b"fresh"
    assert 0 < m["fresh_ttl_ms"] <= 1000
    assert before + 1000 - SLACK_MS <= m["fresh_until_ms"] <= after + 1000 + SLACK_MS
    assert m["expire_at_ms"] == m["fresh_until_ms"] + 10000
    assert m["expire_at_ms"] == pexpiretime(r, b"k")
    assert 10000 < m["stale_ttl_ms"] <= 11000
    assert abs(m["stale_ttl_ms"] - r.pttl(b"k")) < 200


def test_ex_and_stale_in_seconds(r):
    tc_set(r, b"k", b"v", "EX", 5, "STALE", 7)
    assert r.ttl(b"k") in (11, 12)
    m = meta(r, b"k")
    assert 4000 < m["fresh_ttl_ms"] <= 5000
    assert m["expire_at_ms"] - m["fresh_until_ms"] == 7000


def test_default_stale_is_zero(r):
    tc_set(r, b"k", b"v", "PX", 5000)
    m = meta(r, b"k")
    assert m["expire_at_ms"] == m["fresh_until_ms"] == pexpiretime(r, b"k")
    assert 4000 < r.pttl(b"k") <= 5000


def test_pxat_and_exat_are_absolute(r):
    at = now_ms() + 60_000
    tc_set(r, b"p", b"v", "PXAT", at, "STALE", 2)
    m = meta(r, b"p")
    assert m["fresh_until_ms"] == at
    assert m["expire_at_ms"] == at + 2000 == pexpiretime(r, b"p")
    secs = int(time.time()) + 100
    tc_set(r, b"e", b"v", "EXAT", secs)
    m = meta(r, b"e")
    assert m["fresh_until_ms"] == secs * 1000
    assert m["expire_at_ms"] == secs * 1000 == pexpiretime(r, b"e")


def test_stale_zero_without_fresh_period_is_allowed(r):
    assert tc_set(r, b"k", b"v", "STALE", 0) == b"OK"
    assert r.pttl(b"k") == -1
    assert meta(r, b"k")["fresh_until_ms"] == -1


def test_fresh_then_stale_then_gone(r):
    tc_set(r, b"k", b"value", "PX", 300, "STALE", 1)
    assert tc_get(r, b"k") == b"value"
    assert meta(r, b"k")["state"] == b"fresh"
    # stale: a miss for GET, but the key and its metadata are still there
    wait_for(lambda: meta(r, b"k")["state"] == b"stale", timeout=2, what="stale")
    assert tc_get(r, b"k") is None
    assert tc_get(r, b"k", "ENCODED") is None
    m = meta(r, b"k")
    assert m["state"] == b"stale"
    assert m["fresh_ttl_ms"] == 0
    assert 0 < m["stale_ttl_ms"] <= 1000
    assert m["size"] == 5
    assert r.exists(b"k") == 1
    assert r.type(b"k") == b"tiercache"
    assert 0 < r.pttl(b"k") <= 1000
    # gone once the stale window ends
    wait_for(lambda: r.exists(b"k") == 0, timeout=3, what="key expiry")
    assert tc_get(r, b"k") is None
    assert r.execute_command("TIERCACHE.META", b"k") is None
    assert r.pttl(b"k") == -2


def test_without_stale_window_entry_is_gone_after_fresh_period(r):
    tc_set(r, b"k", b"v", "PX", 300)
    assert tc_get(r, b"k") == b"v"
    time.sleep(0.45)
    assert tc_get(r, b"k") is None
    assert r.execute_command("TIERCACHE.META", b"k") is None
    assert r.exists(b"k") == 0


def test_stale_fields_after_fresh_period(r):
    tc_set(r, b"k", b"v", "PX", 100, "STALE", 5)
    time.sleep(0.25)
    m = meta(r, b"k")
    assert m["state"] == b"stale"
    assert m["fresh_ttl_ms"] == 0
    assert m["fresh_until_ms"] < now_ms()
    assert m["expire_at_ms"] == m["fresh_until_ms"] + 5000
    assert 4000 < m["stale_ttl_ms"] <= 4900


# ---- KEEPTTL ----------------------------------------------------------------------------------------


def test_keepttl_keeps_the_key_ttl_and_takes_a_new_fresh_deadline(r):
    tc_set(r, b"k", b"v1", "EX", 100, "STALE", 10)
    exp = pexpiretime(r, b"k")
    before = now_ms()
    assert tc_set(r, b"k", b"v2", "PX", 5000, "KEEPTTL") == b"OK"
    after = now_ms()
    assert pexpiretime(r, b"k") == exp
    m = meta(r, b"k")
    assert tc_get(r, b"k") == b"v2"
    assert before + 5000 - SLACK_MS <= m["fresh_until_ms"] <= after + 5000 + SLACK_MS
    assert m["expire_at_ms"] == exp
    # KEEPTTL without a fresh period: fresh forever, key TTL still kept
    tc_set(r, b"k", b"v3", "KEEPTTL")
    m = meta(r, b"k")
    assert m["fresh_until_ms"] == -1 and m["fresh_ttl_ms"] == -1
    assert m["expire_at_ms"] == exp == pexpiretime(r, b"k")
    assert tc_get(r, b"k") == b"v3"


def test_keepttl_on_key_without_ttl(r):
    tc_set(r, b"k", b"v1")
    tc_set(r, b"k", b"v2", "EX", 100, "KEEPTTL")
    assert r.pttl(b"k") == -1
    assert 99_000 < meta(r, b"k")["fresh_ttl_ms"] <= 100_000


def test_keepttl_on_new_key_sets_no_key_ttl(r):
    tc_set(r, b"k", b"v", "PX", 300, "KEEPTTL")
    assert r.pttl(b"k") == -1
    m = meta(r, b"k")
    assert m["expire_at_ms"] == -1 and m["stale_ttl_ms"] == -1
    assert 0 < m["fresh_ttl_ms"] <= 300
    # no key TTL: after the fresh period the entry stays, stale, with no end
    time.sleep(0.45)
    m = meta(r, b"k")
    assert m["state"] == b"stale"
    assert m["fresh_ttl_ms"] == 0
    assert m["stale_ttl_ms"] == -1
    assert tc_get(r, b"k") is None
    assert r.exists(b"k") == 1


# ---- tags, CREATED, options -----------------------------------------------------------------------------


def test_tags_keep_order_and_drop_repeats(r):
    tc_set(r, b"k", b"v", "TAGS", 5, b"b", b"a", b"b", b"c", b"a")
    assert meta(r, b"k")["tags"] == [b"b", b"a", b"c"]


def test_tags_zero(r):
    tc_set(r, b"k", b"v", "TAGS", 0)
    assert meta(r, b"k")["tags"] == []
    assert tc_get(r, b"k") == b"v"


def test_max_tags_default_32_allowed(r):
    tags = [f"tag{i}".encode() for i in range(32)]
    assert tc_set(r, b"k", b"v", "TAGS", 32, *tags) == b"OK"
    assert meta(r, b"k")["tags"] == tags


def test_tags_followed_by_more_options(r):
    tc_set(r, b"k", b"v", "TAGS", 2, b"x", b"y", "PX", 5000, "STALE", 1, "NOCOMPRESS")
    m = meta(r, b"k")
    assert m["tags"] == [b"x", b"y"]
    assert m["expire_at_ms"] - m["fresh_until_ms"] == 1000


def test_tag_that_looks_like_an_option(r):
    tc_set(r, b"k", b"v", "TAGS", 2, b"EX", b"NOCOMPRESS")
    m = meta(r, b"k")
    assert m["tags"] == [b"EX", b"NOCOMPRESS"]
    assert m["fresh_until_ms"] == -1


def test_created_is_recorded(r):
    tc_set(r, b"k", b"v", "CREATED", 1_600_000_000_123)
    assert meta(r, b"k")["created_ms"] == 1_600_000_000_123
    tc_set(r, b"z", b"v", "CREATED", 0)
    assert meta(r, b"z")["created_ms"] == 0


def test_options_case_insensitive_and_in_any_order(r):
    tc_set(r, b"k", b"v", "tags", 1, b"t", "stale", 3, "px", 5000, "created", 42, "nocompress")
    m = meta(r, b"k")
    assert m["tags"] == [b"t"]
    assert m["created_ms"] == 42
    assert m["expire_at_ms"] - m["fresh_until_ms"] == 3000
    assert m["encoding"] == b"raw"
    tc_set(r, b"k2", b"v", "Ex", 10, "Encoding", "raw", "KeepTTL")
    assert tc_get(r, b"k2") == b"v"
    tc_set(r, b"k3", lz4_frame(b"abc"), "encoding", "lz4", "Pxat", now_ms() + 10_000)
    assert tc_get(r, b"k3") == b"abc"


def test_command_names_case_insensitive(r):
    assert r.execute_command("tiercache.set", b"k", b"v") == b"OK"
    assert r.execute_command("TierCache.Get", b"k") == b"v"
    assert r.execute_command("tiercache.meta", b"k") is not None


# ---- binary safety ---------------------------------------------------------------------------------------


def test_binary_keys_values_and_tags(r):
    key = b"k\x00ey\xff\xfe"
    value = b"\x00\x01\x02\xff\x00" * 3
    tags = [b"\x00", b"\xff", b"a\x00b", b"\r\n"]
    tc_set(r, key, value, "TAGS", len(tags), *tags)
    assert tc_get(r, key) == value
    m = meta(r, key)
    assert m["tags"] == tags
    assert m["size"] == len(value)
    assert r.type(key) == b"tiercache"
    assert r.exists(b"k") == 0, "the key must not be cut at the NUL byte"
    assert get_encoded(r, key) == [b"raw", value]


def test_binary_compressed_value(r):
    value = (b"\x00\xff" * 10 + b"tier\x00cache") * 200
    tc_set(r, b"\xff", value)
    assert meta(r, b"\xff")["encoding"] == b"lz4"
    assert tc_get(r, b"\xff") == value


def test_empty_value(r):
    assert tc_set(r, b"k", b"") == b"OK"
    assert tc_get(r, b"k") == b""
    m = meta(r, b"k")
    assert m["size"] == 0 and m["stored_size"] == 0
    assert r.exists(b"k") == 1


def test_empty_key(r):
    assert tc_set(r, b"", b"v") == b"OK"
    assert tc_get(r, b"") == b"v"
    assert r.type(b"") == b"tiercache"


def test_large_incompressible_value(r):
    value = incompressible(1 << 20)
    tc_set(r, b"big", value)
    assert tc_get(r, b"big") == value
    m = meta(r, b"big")
    assert m["encoding"] == b"raw"
    assert m["size"] == m["stored_size"] == 1 << 20


# ---- compression -------------------------------------------------------------------------------------------


def test_default_threshold_is_1024_bytes(r):
    small = compressible(1023)
    tc_set(r, b"small", small)
    m = meta(r, b"small")
    assert m["encoding"] == b"raw"
    assert m["size"] == m["stored_size"] == 1023
    assert get_encoded(r, b"small") == [b"raw", small]

    big = compressible(1024)
    tc_set(r, b"big", big)
    m = meta(r, b"big")
    assert m["encoding"] == b"lz4"
    assert m["size"] == 1024
    assert m["stored_size"] < 1024 * 0.9
    assert tc_get(r, b"big") == big


def test_compressed_entry_is_a_tiercache_lz4_frame(r):
    value = compressible(8192)
    tc_set(r, b"k", value)
    enc, stored = get_encoded(r, b"k")
    assert enc == b"lz4"
    assert stored[:4] == struct.pack("<I", 8192)
    assert lz4_unframe(stored) == value
    m = meta(r, b"k")
    assert m["stored_size"] == len(stored)
    assert m["size"] == 8192


def test_incompressible_value_stays_raw(r):
    value = incompressible(4096)
    tc_set(r, b"k", value)
    m = meta(r, b"k")
    assert m["encoding"] == b"raw"
    assert m["stored_size"] == m["size"] == 4096
    assert get_encoded(r, b"k") == [b"raw", value]


def test_nocompress(r):
    value = compressible(10_000)
    tc_set(r, b"k", value, "NOCOMPRESS")
    m = meta(r, b"k")
    assert m["encoding"] == b"raw"
    assert m["stored_size"] == m["size"] == 10_000
    assert get_encoded(r, b"k") == [b"raw", value]
    assert tc_get(r, b"k") == value


def test_encoding_raw_is_stored_verbatim(r):
    value = compressible(10_000)
    tc_set(r, b"k", value, "ENCODING", "raw")
    assert meta(r, b"k")["encoding"] == b"raw"
    assert get_encoded(r, b"k") == [b"raw", value]


@pytest.mark.parametrize(
    "value",
    [compressible(5000), b"hello", b"", incompressible(3000), b"\x00\xff" * 700],
    ids=["compressible", "small", "empty", "incompressible", "binary"],
)
def test_encoding_lz4_with_a_python_frame(r, value):
    frame = lz4_frame(value)
    assert tc_set(r, b"k", frame, "ENCODING", "lz4") == b"OK"
    assert tc_get(r, b"k") == value
    assert get_encoded(r, b"k") == [b"lz4", frame]
    m = meta(r, b"k")
    assert m["encoding"] == b"lz4"
    assert m["size"] == len(value)
    assert m["stored_size"] == len(frame)


def test_encoded_bytes_can_be_set_back(r):
    value = compressible(4000)
    tc_set(r, b"a", value)
    enc, stored = get_encoded(r, b"a")
    assert enc == b"lz4"
    tc_set(r, b"b", stored, "ENCODING", "lz4")
    assert get_encoded(r, b"b") == [b"lz4", stored]
    assert tc_get(r, b"b") == value


def test_compression_follows_config(r):
    try:
        r.config_set("tiercache.compress-min-size", 100)
        tc_set(r, b"a", compressible(99))
        tc_set(r, b"b", compressible(100))
        assert meta(r, b"a")["encoding"] == b"raw"
        assert meta(r, b"b")["encoding"] == b"lz4"
        assert tc_get(r, b"b") == compressible(100)
        r.config_set("tiercache.compress-min-size", 0)
        tc_set(r, b"c", b"ab" * 40)
        assert meta(r, b"c")["encoding"] == b"lz4"
        assert tc_get(r, b"c") == b"ab" * 40
        tc_set(r, b"d", b"")
        assert meta(r, b"d")["size"] == 0
        assert tc_get(r, b"d") == b""
    finally:
        r.config_set("tiercache.compress-min-size", 1024)


def test_overwrite_changes_encoding(r):
    tc_set(r, b"k", compressible(4096))
    assert meta(r, b"k")["encoding"] == b"lz4"
    tc_set(r, b"k", b"short")
    m = meta(r, b"k")
    assert m["encoding"] == b"raw" and m["size"] == 5
    assert get_encoded(r, b"k") == [b"raw", b"short"]


def test_get_encoded_stale_is_nil_but_meta_remains(r):
    tc_set(r, b"k", compressible(2048), "PX", 100, "STALE", 5)
    time.sleep(0.2)
    assert tc_get(r, b"k", "ENCODED") is None
    m = meta(r, b"k")
    assert m["state"] == b"stale" and m["encoding"] == b"lz4"


def test_get_encoded_option_case_insensitive(r):
    tc_set(r, b"k", b"v")
    assert r.execute_command("TIERCACHE.GET", b"k", "encoded") == [b"raw", b"v"]
