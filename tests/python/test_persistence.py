"""Restarts from RDB and from AOF (aof-use-rdb-preamble yes and no, with and without a rewrite): values,
tags, fresh_until_ms, expire_at_ms and created_ms come back identical."""

import time

import pytest

from helpers import (
    capture,
    compressible,
    config_get,
    info_section,
    meta,
    populate,
    stable,
    stats,
    tc_get,
    tc_set,
    wait_for,
)

# The gauges that describe the data itself (counters of activity differ between servers).
SIZE_FIELDS = ["entries", "compressed_entries", "bytes_original", "bytes_stored", "tags", "tag_index_entries"]


def clients(srv, protocol):
    return {0: srv.client(protocol=protocol), 1: srv.client(protocol=protocol, db=1)}


def sizes(c):
    s = stats(c)
    return {f: s[f] for f in SIZE_FIELDS}


def wait_no_rewrite(c):
    def idle():
        p = info_section(c, "persistence")
        return p["aof_rewrite_in_progress"] == "0" and p["aof_rewrite_scheduled"] == "0"

    wait_for(idle, timeout=20, interval=0.05, what="AOF rewrite to finish")


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_rdb_restart(start_server, protocol):
    srv = start_server(name="rdb")
    c = clients(srv, protocol)
    keys = populate(c[0], c[1])
    before = capture(c, keys)
    sizes_before = sizes(c[0])
    assert sizes_before["entries"] == 15
    c[0].save()
    time.sleep(0.2)  # a restart that re-derived relative times would move them
    srv.restart()
    assert (srv.dir / "dump.rdb").exists()
    c = clients(srv, protocol)
    assert capture(c, keys) == before
    assert sizes(c[0]) == sizes_before
    assert c[0].get(b"native") == b"string"
    assert meta(c[0], b"stale")["state"] == b"stale"
    assert tc_get(c[0], b"comp") == compressible(5000)
    # the restarted server keeps working on the loaded entries
    tc_set(c[0], b"plain", b"new")
    assert tc_get(c[0], b"plain") == b"new"
    c[0].delete(b"comp")
    s = sizes(c[0])
    assert s["entries"] == 14
    assert s["compressed_entries"] == sizes_before["compressed_entries"] - 1


def test_rdb_restart_entry_turns_stale_and_expires_on_time(start_server):
    srv = start_server(name="rdb-time")
    c = srv.client()
    tc_set(c, b"k", b"v", "PX", 300, "STALE", 1)
    m = meta(c, b"k")
    c.save()
    srv.restart()
    c = srv.client()
    m2 = meta(c, b"k")
    assert (m2["fresh_until_ms"], m2["expire_at_ms"]) == (m["fresh_until_ms"], m["expire_at_ms"])
    wait_for(lambda: meta(c, b"k")["state"] == b"stale", timeout=2, what="stale after restart")
    assert tc_get(c, b"k") is None
    wait_for(lambda: c.exists(b"k") == 0, timeout=3, what="expiry after restart")


@pytest.mark.parametrize("preamble", ["yes", "no"], ids=["preamble-yes", "preamble-no"])
@pytest.mark.parametrize("rewrite", [False, True], ids=["incremental", "rewritten"])
def test_aof_restart(start_server, preamble, rewrite):
    srv = start_server(
        args=["--appendonly", "yes", "--aof-use-rdb-preamble", preamble, "--appendfsync", "always"],
        name=f"aof-{preamble}",
    )
    c = clients(srv, 3)
    wait_no_rewrite(c[0])
    keys = populate(c[0], c[1])
    if rewrite:
        c[0].bgrewriteaof()
        wait_no_rewrite(c[0])
        assert info_section(c[0], "persistence")["aof_last_bgrewrite_status"] == "ok"
    # writes after the (possible) rewrite land in the incremental file
    tc_set(c[0], b"after", compressible(2000), "PX", 100_000, "STALE", 3, "TAGS", 1, b"after")
    tc_set(c[0], b"plain", b"overwritten", "TAGS", 1, b"p")
    c[0].delete(b"noise")
    c[0].pexpire(b"empty", 777_000)
    c[0].rename(b"tagged", b"renamed")
    c[0].copy(b"comp", b"copied")
    keys[0] = [k for k in keys[0] if k not in (b"noise", b"tagged")] + [b"after", b"renamed", b"copied"]
    before = capture(c, keys)
    sizes_before = sizes(c[0])
    time.sleep(0.3)  # replaying relative times at load would move every deadline by this much
    srv.restart()
    assert (srv.dir / "appendonlydir").is_dir()
    c = clients(srv, 3)
    after = capture(c, keys)
    assert after == before
    assert sizes(c[0]) == sizes_before
    assert c[0].exists(b"noise", b"tagged") == 0
    assert c[0].get(b"native") == b"string"
    assert tc_get(c[0], b"plain") == b"overwritten"


@pytest.mark.parametrize("preamble", ["yes", "no"], ids=["preamble-yes", "preamble-no"])
def test_aof_restart_twice_after_rewrite_keeps_created(start_server, preamble):
    """created_ms and deadlines set with defaults (now) survive two restarts and a rewrite in between."""
    srv = start_server(
        args=["--appendonly", "yes", "--aof-use-rdb-preamble", preamble, "--appendfsync", "always"],
        name=f"aof2-{preamble}",
    )
    c = srv.client(protocol=2)
    wait_no_rewrite(c)
    tc_set(c, b"k", b"v", "EX", 1000, "STALE", 5, "TAGS", 2, b"x", b"y")
    want = meta(c, b"k")
    time.sleep(0.1)
    srv.restart()
    c = srv.client(protocol=2)
    wait_no_rewrite(c)
    c.bgrewriteaof()
    wait_no_rewrite(c)
    time.sleep(0.1)
    srv.restart()
    c = srv.client(protocol=2)
    got = meta(c, b"k")
    for f in ("fresh_until_ms", "expire_at_ms", "created_ms", "tags", "size", "encoding"):
        assert got[f] == want[f], f


@pytest.mark.parametrize("preamble", ["yes", "no"], ids=["preamble-yes", "preamble-no"])
def test_aof_keeps_stored_bytes_when_config_changes(start_server, preamble):
    """Entries come back with the bytes they were stored with, whatever compress-min-size is at load."""
    srv = start_server(
        args=["--appendonly", "yes", "--aof-use-rdb-preamble", preamble, "--appendfsync", "always",
              "--tiercache.compress-min-size", "16"],
        name=f"aofcfg-{preamble}",
    )
    c = srv.client(protocol=2)
    wait_no_rewrite(c)
    tc_set(c, b"small", b"ab" * 100)
    tc_set(c, b"raw", compressible(5000), "NOCOMPRESS")
    want = {k: tc_get(c, k, "ENCODED") for k in (b"small", b"raw")}
    assert want[b"small"][0] == b"lz4"
    srv.args = [a if a != "16" else "100000" for a in srv.args]
    srv.restart()
    c = srv.client(protocol=2)
    assert config_get(c, "tiercache.compress-min-size") == b"100000"
    assert {k: tc_get(c, k, "ENCODED") for k in (b"small", b"raw")} == want
    c.bgrewriteaof()
    wait_no_rewrite(c)
    srv.restart()
    c = srv.client(protocol=2)
    assert {k: tc_get(c, k, "ENCODED") for k in (b"small", b"raw")} == want


# ---- crafted DUMP payloads (the RDB layout in core/src/persist.rs) ---------------------------------------

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x95AC9329AC4BC9B5 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc64(data: bytes) -> int:
    """Redis's CRC-64 (Jones polynomial, reflected), as in the DUMP footer."""
    crc = 0
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


def rdb_len(v: int) -> bytes:
    if v < 64:
        return bytes([v])
    if v < 16384:
        return bytes([0x40 | (v >> 8), v & 0xFF])
    if v <= 0xFFFFFFFF:
        return b"\x80" + v.to_bytes(4, "big")
    return b"\x81" + v.to_bytes(8, "big")


def craft(template: bytes, encoding, fresh_until, created, size, data, tags) -> bytes:
    """A DUMP payload with the template's module header (type byte 7 + 9-byte module id) and RDB
    version, the given entry fields (signed fields are saved as unsigned bits) and a valid CRC."""
    assert template[0] == 7 and template[1] == 0x81
    u = lambda v: b"\x02" + rdb_len(v & 0xFFFFFFFFFFFFFFFF)  # noqa: E731
    s = lambda b: b"\x05" + rdb_len(len(b)) + b  # noqa: E731
    body = template[:10] + u(encoding) + u(fresh_until) + u(created) + u(size) + s(data) + u(len(tags))
    body += b"".join(s(t) for t in tags) + u(0) + b"\x00" + template[-10:-8]
    return body + crc64(body).to_bytes(8, "little")


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_restore_refuses_what_set_refuses_and_keeps_what_it_accepts(start_server, protocol):
    """RESTORE refuses payloads TIERCACHE.SET would refuse (before, it accepted them and an AOF restart
    without the preamble dropped them silently); what it accepts survives that restart identically."""
    import lz4.block
    import redis

    srv = start_server(args=["--appendonly", "yes", "--aof-use-rdb-preamble", "no"], name="crafted")
    c = srv.client(protocol=protocol)
    wait_no_rewrite(c)
    tc_set(c, b"template", b"v", "TAGS", 1, b"t")
    template = c.dump(b"template")
    c.delete(b"template")
    value = compressible(6000)
    frame = lz4.block.compress(value, store_size=True)
    far = 4_102_444_800_000
    refused = {
        "65536 tags": (0, -1, 1, 1, b"v", [b"t%d" % i for i in range(65536)]),
        "negative created": (0, -1, -1, 1, b"v", [b"t"]),
        "fresh deadline 0": (0, 0, 1, 1, b"v", [b"t"]),
        "lz4 body that does not decode": (1, far, 1, len(value), frame[:-3], [b"t"]),
        "lz4 header announcing 600 MiB": (1, far, 1, 600 << 20, (600 << 20).to_bytes(4, "little") + frame[4:], []),
        "size longer than the frame's": (1, far, 1, len(value) + 1, frame, []),
    }
    for what, fields in refused.items():
        with pytest.raises(redis.ResponseError, match="^Bad data format$"):
            c.restore(b"bad", 0, craft(template, *fields))
        assert c.exists(b"bad") == 0, what
    accepted = {
        b"k1024": (0, -1, 1, 1, b"v", [b"t%d" % i for i in range(1024)]),
        b"kcreated0": (0, -1, 0, 1, b"v", [b"t"]),
        b"klz4": (1, far, 7, len(value), frame, [b"a", b"\0b"]),
    }
    for key, fields in accepted.items():
        assert c.restore(key, 0, craft(template, *fields))
    before = {k: (stable(meta(c, k)), tc_get(c, k)) for k in accepted}
    c.bgrewriteaof()
    wait_no_rewrite(c)
    srv.restart()
    c = srv.client(protocol=protocol)
    assert {k: (stable(meta(c, k)), tc_get(c, k)) for k in accepted} == before
