"""TIERCACHE.STATS and INFO tiercache (section tiercache_stats)."""

import time

from helpers import (
    STATS_FIELDS,
    compressible,
    info_text,
    meta,
    protocol_of,
    stats,
    tc_get,
    tc_set,
    wait_for,
)


def info_stats_section(r) -> tuple[list[str], dict[str, int]]:
    """The `# tiercache_stats` section of `INFO tiercache`: field names in order and int values.
    Redis 7.0 prefixes every module INFO field with the module name (`tiercache_entries`)."""
    names, values, inside = [], {}, False
    for line in info_text(r, "tiercache").splitlines():
        line = line.strip()
        if line.startswith("#"):
            inside = line[1:].strip() == "tiercache_stats"
            continue
        if inside and ":" in line:
            k, v = line.split(":", 1)
            names.append(k)
            values[k] = int(v)
    return names, values


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("hits", "misses", "sets")}


def test_stats_raw_shape(r):
    raw = r.execute_command("TIERCACHE.STATS")
    if protocol_of(r) == 2:
        assert isinstance(raw, list) and len(raw) == 2 * len(STATS_FIELDS)
        assert [x.decode() for x in raw[0::2]] == STATS_FIELDS
        assert all(isinstance(x, int) for x in raw[1::2])
    else:
        assert isinstance(raw, dict)
        assert [x.decode() for x in raw.keys()] == STATS_FIELDS
        assert all(isinstance(x, int) for x in raw.values())


def test_stats_empty_after_flush(r):
    s = stats(r)
    assert s["entries"] == 0
    assert s["compressed_entries"] == 0
    assert s["bytes_original"] == 0
    assert s["bytes_stored"] == 0


def test_stats_count_entries_bytes_and_commands(r, r_db1):
    s0 = stats(r)
    tc_set(r, b"a", b"x" * 10)
    tc_set(r, b"b", compressible(4096))
    tc_set(r_db1, b"c", b"y" * 5, "NOCOMPRESS")
    stored_b = meta(r, b"b")["stored_size"]
    assert stored_b < 4096
    s = stats(r)
    assert s["entries"] == 3, "entries are counted over all DBs"
    assert s["compressed_entries"] == 1
    assert s["bytes_original"] == 10 + 4096 + 5
    assert s["bytes_stored"] == 10 + stored_b + 5
    assert delta(s, s0) == {"hits": 0, "misses": 0, "sets": 3}

    s1 = stats(r)
    assert tc_get(r, b"a") == b"x" * 10  # hit
    assert tc_get(r, b"b") == compressible(4096)  # hit
    assert tc_get(r, b"missing") is None  # miss
    meta(r, b"a")  # not a GET: not counted
    meta(r, b"missing")
    assert delta(stats(r), s1) == {"hits": 2, "misses": 1, "sets": 0}

    # overwrite: one entry, new sizes
    tc_set(r, b"a", b"z" * 20)
    s = stats(r)
    assert s["entries"] == 3
    assert s["bytes_original"] == 20 + 4096 + 5
    assert s["bytes_stored"] == 20 + stored_b + 5

    r.delete(b"b")
    s = stats(r)
    assert s["entries"] == 2
    assert s["compressed_entries"] == 0
    assert s["bytes_original"] == 20 + 5
    assert s["bytes_stored"] == 20 + 5

    r.flushall()
    s = stats(r)
    assert (s["entries"], s["compressed_entries"], s["bytes_original"], s["bytes_stored"]) == (0, 0, 0, 0)
    assert s["sets"] >= s0["sets"] + 4, "counters are not reset by FLUSHALL"


def test_get_encoded_is_counted(r):
    """GET ... ENCODED is a cache read like any other: it counts as a hit or a miss."""
    tc_set(r, b"a", b"v")
    s0 = stats(r)
    assert tc_get(r, b"a", "ENCODED") == [b"raw", b"v"]
    assert tc_get(r, b"missing", "ENCODED") is None
    assert delta(stats(r), s0) == {"hits": 1, "misses": 1, "sets": 0}


def test_stale_get_counts_as_miss(r):
    tc_set(r, b"k", b"v", "PX", 100, "STALE", 5)
    time.sleep(0.2)
    s0 = stats(r)
    assert tc_get(r, b"k") is None
    s = stats(r)
    assert delta(s, s0) == {"hits": 0, "misses": 1, "sets": 0}
    assert s["entries"] == 1, "a stale entry is still a live entry"


def test_expired_entries_leave_the_stats(r):
    tc_set(r, b"k", compressible(2000), "PX", 100)
    tc_set(r, b"keep", b"v")
    assert stats(r)["entries"] == 2
    # active expiry, without touching the key
    wait_for(lambda: stats(r)["entries"] == 1, timeout=5, what="active expiry to remove the entry")
    s = stats(r)
    assert s["compressed_entries"] == 0
    assert s["bytes_original"] == 1


def test_lazily_expired_entry_leaves_the_stats(r):
    r.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 0)
    try:
        tc_set(r, b"k", b"vvv", "PX", 100)
        time.sleep(0.2)
        assert stats(r)["entries"] == 1
        assert r.exists(b"k") == 0  # lazy expiry
        assert stats(r)["entries"] == 0
        assert stats(r)["bytes_original"] == 0
    finally:
        r.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 1)


def test_stats_equal_info_tiercache(r, r_db1):
    tc_set(r, b"a", compressible(3000))
    tc_set(r, b"b", b"plain", "TAGS", 1, b"t")
    tc_set(r_db1, b"c", b"other")
    tc_get(r, b"a")
    tc_get(r, b"nope")
    text = info_text(r, "tiercache")
    assert "# tiercache_stats" in text
    names, info = info_stats_section(r)
    assert names == ["tiercache_" + f for f in STATS_FIELDS]
    info = {k[len("tiercache_"):]: v for k, v in info.items()}
    assert stats(r) == info
    assert info["entries"] == 3
    assert info["compressed_entries"] == 1
    assert info["hits"] >= 1 and info["misses"] >= 1 and info["sets"] >= 3


def test_info_all_includes_tiercache_section(r):
    tc_set(r, b"a", b"v")
    text = info_text(r, "everything")
    assert "# tiercache_stats" in text


def test_flushdb_and_swapdb_keep_per_db_counts(r, r_db1):
    tc_set(r, b"a", b"12345")
    tc_set(r_db1, b"b", compressible(3000))
    tc_set(r_db1, b"c", b"x")
    assert stats(r)["entries"] == 3
    r.swapdb(0, 1)
    s = stats(r)
    assert s["entries"] == 3 and s["compressed_entries"] == 1
    assert tc_get(r, b"b") == compressible(3000)
    assert tc_get(r_db1, b"a") == b"12345"
    r.flushdb()  # db 0 now holds b and c
    s = stats(r)
    assert s["entries"] == 1
    assert s["compressed_entries"] == 0
    assert s["bytes_original"] == 5
    assert s["bytes_stored"] == 5
