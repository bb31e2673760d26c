"""Tag invalidation (spec/TAGS.md): TIERCACHE.INVALIDATE / TAGCOUNT / TAGKEYS, the reclaim timer, the tag
index staying exact on every keyspace path, the MessagePack invalidation messages, replication and
DEBUG RELOAD in the middle of a reclaim."""

import time

import msgpack
import pytest
import redis

from helpers import (
    DEFAULT_INVALIDATION_CHANNEL,
    DEFAULT_RECLAIM_BUDGET,
    assert_tag_index_exact,
    config_get,
    info_section,
    meta,
    raises_exact,
    stats,
    tc_get,
    tc_invalidate,
    tc_set,
    tc_tagcount,
    tc_tagkeys,
    wait_for,
    wait_reclaim_done,
)


@pytest.fixture(autouse=True)
def _restore_tag_configs(_shared):
    """Puts back the configs these tests change on the shared server."""
    yield
    srv = _shared.server
    if srv is None or not srv.alive():
        return
    c = srv.client(protocol=3)
    try:
        for name, value in (("tiercache.reclaim-budget", DEFAULT_RECLAIM_BUDGET),
                            ("tiercache.invalidation-channel", DEFAULT_INVALIDATION_CHANNEL)):
            try:
                c.config_set(name, value)
            except redis.RedisError:
                pass
        try:
            c.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 1)
        except redis.RedisError:
            pass
    finally:
        c.close()


def set_many(c, prefix: bytes, n: int, *opts):
    p = c.pipeline(transaction=False)
    for i in range(n):
        p.execute_command("TIERCACHE.SET", prefix + b"%d" % i, b"v%d" % i, *opts)
    assert p.execute() == [b"OK"] * n
    return [prefix + b"%d" % i for i in range(n)]


def gets(c, keys):
    p = c.pipeline(transaction=False)
    for k in keys:
        p.execute_command("TIERCACHE.GET", k)
    return p.execute()


def metas(c, keys):
    p = c.pipeline(transaction=False)
    for k in keys:
        p.execute_command("TIERCACHE.META", k)
    return p.execute()


def exists_each(c, keys):
    p = c.pipeline(transaction=False)
    for k in keys:
        p.exists(k)
    return p.execute()


# ---- TIERCACHE.INVALIDATE ------------------------------------------------------------------------------


def test_invalidate_counts_per_tag_and_hides_them_at_once(r):
    tc_set(r, b"k1", b"v1", "TAGS", 1, b"a")
    tc_set(r, b"k2", b"v2", "TAGS", 2, b"a", b"b")
    tc_set(r, b"k3", b"v3", "TAGS", 2, b"b", b"c")
    tc_set(r, b"k4", b"v4", "TAGS", 1, b"c")
    tc_set(r, b"plain", b"p")
    r.set(b"native", b"n")
    before = stats(r)
    # In one transaction so the reclaim timer cannot run in between: nil at once, others untouched.
    p = r.pipeline(transaction=True)
    p.execute_command("TIERCACHE.INVALIDATE", b"a", b"b", b"a", b"nope")
    for k in (b"k1", b"k2", b"k3", b"k4", b"plain"):
        p.execute_command("TIERCACHE.GET", k)
        p.execute_command("TIERCACHE.META", k)
    res = p.execute()
    # The sum over the distinct tags named of the entries under each: a has k1 k2, b has k2 k3, so k2
    # counts twice (4, where the distinct entries are 3); the repeated a and the unknown tag add nothing.
    assert res[0] == 4
    assert res[1:7] == [None] * 6
    assert res[7] == b"v4" and meta(r, b"k4")["tags"] == [b"c"]
    assert res[9] == b"p"
    assert r.get(b"native") == b"n"
    assert stats(r)["invalidations"] == before["invalidations"] + 1
    wait_reclaim_done(r)
    assert tc_invalidate(r, b"a", b"b") == 0
    assert tc_invalidate(r, b"c") == 1
    assert tc_get(r, b"k4") is None
    assert tc_get(r, b"plain") == b"p"
    assert_tag_index_exact(r, also_tags=[b"a", b"b", b"c"])


def test_invalidate_count_includes_entries_awaiting_reclaim(r):
    """Counting stays O(1): an entry invalidated through one tag is still indexed under its other tags until
    the reclaim timer deletes it, and is counted again if one of those is invalidated meanwhile (MULTI keeps
    the timer out). Documented in COMMANDS.md."""
    tc_set(r, b"k3", b"v", "TAGS", 2, b"b", b"c")
    tc_set(r, b"k4", b"v", "TAGS", 1, b"c")
    p = r.pipeline(transaction=True)
    p.execute_command("TIERCACHE.INVALIDATE", b"b")
    p.execute_command("TIERCACHE.INVALIDATE", b"b")
    p.execute_command("TIERCACHE.INVALIDATE", b"c")
    assert p.execute() == [1, 0, 2]
    wait_reclaim_done(r)
    assert tc_invalidate(r, b"c") == 0


def test_invalidate_of_many_tags_counts_per_tag_with_per_tag_work(start_server):
    """Issue 9: one INVALIDATE of many tags used to count distinct entries by walking every key of every
    tag on the main thread. The reply is the sum of the tags' TAGCOUNTs, and the work is per tag. Checked
    structurally on a fresh server, not by timing: index_longest_op_steps (the most index elements one
    operation touched) stays within a few per tag named, below the number of keys the tags carry."""
    srv = start_server(name="manytags")
    c = srv.client(protocol=2)
    tags = [b"t%d" % i for i in range(256)]
    n = 256 * 40 // 2  # entry i is under tags i and i + 1 (mod 256): 40 entries per tag
    p = c.pipeline(transaction=False)
    for i in range(n):
        p.execute_command("TIERCACHE.SET", b"k%d" % i, b"v", "TAGS", 2, tags[i % 256], tags[(i + 1) % 256])
    p.execute()
    counts = [tc_tagcount(c, t) for t in tags]
    assert counts == [40] * len(tags)
    assert tc_invalidate(c, *tags) == sum(counts) == 2 * n  # each entry counted under both of its tags
    steps = stats(c)["index_longest_op_steps"]
    assert 0 < steps <= 64 * len(tags) and steps < n, steps
    assert tc_get(c, b"k0") is None
    wait_reclaim_done(c)
    assert c.dbsize() == 0
    assert stats(c)["index_longest_op_steps"] <= 64 * len(tags)


def test_invalidate_unknown_tag_is_zero(r):
    tc_set(r, b"k", b"v", "TAGS", 1, b"t")
    assert tc_invalidate(r, b"unknown") == 0
    assert tc_invalidate(r, b"T") == 0  # tags are case-sensitive bytes
    assert tc_get(r, b"k") == b"v"
    assert tc_tagcount(r, b"t") == 1


def test_set_after_invalidation_is_live(r):
    tc_set(r, b"old", b"v", "TAGS", 1, b"t")
    tc_set(r, b"again", b"v", "TAGS", 1, b"t")
    p = r.pipeline(transaction=True)
    p.execute_command("TIERCACHE.INVALIDATE", b"t")
    p.execute_command("TIERCACHE.SET", b"new", b"fresh", "TAGS", 1, b"t")
    p.execute_command("TIERCACHE.SET", b"again", b"second", "TAGS", 1, b"t")  # overwrite before reclaim
    p.execute_command("TIERCACHE.GET", b"new")
    p.execute_command("TIERCACHE.GET", b"again")
    p.execute_command("TIERCACHE.GET", b"old")
    p.execute_command("TIERCACHE.TAGCOUNT", b"t")
    assert p.execute() == [2, b"OK", b"OK", b"fresh", b"second", None, 2]
    wait_reclaim_done(r)
    assert tc_get(r, b"new") == b"fresh"
    assert tc_get(r, b"again") == b"second"
    assert meta(r, b"again")["tags"] == [b"t"]
    assert r.exists(b"old") == 0
    assert sorted(tc_tagkeys(r, b"t")) == [b"again", b"new"]
    assert_tag_index_exact(r, also_tags=[b"t"])
    assert tc_invalidate(r, b"t") == 2


def test_invalidate_is_per_database(r, r_db1):
    tc_set(r, b"k", b"zero", "TAGS", 1, b"t")
    tc_set(r_db1, b"k", b"one", "TAGS", 1, b"t")
    tc_set(r_db1, b"k2", b"one", "TAGS", 1, b"t")
    assert tc_tagcount(r, b"t") == 1
    assert tc_tagcount(r_db1, b"t") == 2
    assert tc_invalidate(r, b"t") == 1
    assert tc_get(r, b"k") is None
    assert tc_get(r_db1, b"k") == b"one"
    assert tc_tagcount(r_db1, b"t") == 2
    assert sorted(tc_tagkeys(r_db1, b"t")) == [b"k", b"k2"]
    wait_reclaim_done(r)
    assert r.exists(b"k") == 0
    assert r_db1.exists(b"k", b"k2") == 2
    assert tc_invalidate(r_db1, b"t") == 2
    assert tc_get(r_db1, b"k2") is None
    assert_tag_index_exact(r, also_tags=[b"t"])


def test_invalidate_binary_tags(r):
    tc_set(r, b"nul", b"v", "TAGS", 1, b"\x00")
    tc_set(r, b"ff", b"v", "TAGS", 1, b"\xff")
    tc_set(r, b"both", b"v", "TAGS", 2, b"\x00\xff", b"x\x00y")
    assert tc_tagcount(r, b"\x00") == 1
    assert tc_tagkeys(r, b"\xff") == [b"ff"]
    assert tc_invalidate(r, b"\x00\x00") == 0
    assert tc_invalidate(r, b"\x00") == 1
    assert tc_get(r, b"nul") is None
    assert tc_get(r, b"ff") == b"v" and tc_get(r, b"both") == b"v"
    assert tc_invalidate(r, b"x\x00y", b"\xff") == 2
    assert tc_get(r, b"ff") is None and tc_get(r, b"both") is None
    assert_tag_index_exact(r, also_tags=[b"\x00", b"\xff", b"\x00\xff", b"x\x00y"])


def test_invalidate_errors(r):
    tc_set(r, b"k", b"v", "TAGS", 1, b"t")
    before = stats(r)["invalidations"]
    with raises_exact("ERR wrong number of arguments for 'tiercache.invalidate' command"):
        r.execute_command("TIERCACHE.INVALIDATE")
    with raises_exact("ERR tags must not be empty strings"):
        tc_invalidate(r, b"")
    with raises_exact("ERR tags must not be empty strings"):
        tc_invalidate(r, b"t", b"")
    with raises_exact("ERR too many tags: at most 1024 per INVALIDATE"):
        tc_invalidate(r, b"t", *[b"x%d" % i for i in range(1024)])
    assert tc_get(r, b"k") == b"v"  # nothing invalidated by a refused command
    assert stats(r)["invalidations"] == before
    assert tc_invalidate(r, b"t", *[b"x%d" % i for i in range(1023)]) == 1  # exactly 1024 is fine


def test_reply_shapes(r):
    tc_set(r, b"k", b"v", "TAGS", 1, b"t")
    n = tc_tagcount(r, b"t")
    assert n == 1 and type(n) is int
    assert tc_tagkeys(r, b"t") == [b"k"]
    assert tc_tagkeys(r, b"none") == []
    assert tc_tagcount(r, b"none") == 0
    n = tc_invalidate(r, b"t")
    assert n == 1 and type(n) is int
    assert r.execute_command("TIERCACHE.META", b"k") is None
    assert r.execute_command("TIERCACHE.GET", b"k", "ENCODED") is None


# ---- TAGCOUNT / TAGKEYS --------------------------------------------------------------------------------


def test_tagcount_and_tagkeys(r):
    keys = set_many(r, b"k", 150, "TAGS", 1, b"big")
    tc_set(r, b"s1", b"v", "TAGS", 2, b"small", b"big")
    tc_set(r, b"s2", b"v", "TAGS", 1, b"small")
    assert tc_tagcount(r, b"big") == 151
    assert tc_tagcount(r, b"small") == 2
    default = tc_tagkeys(r, b"big")
    assert len(default) == 100 and len(set(default)) == 100
    assert set(default) <= set(keys) | {b"s1"}
    assert sorted(tc_tagkeys(r, b"big", "COUNT", 1000)) == sorted(keys + [b"s1"])
    assert sorted(tc_tagkeys(r, b"small", "count", 5)) == [b"s1", b"s2"]
    one = tc_tagkeys(r, b"small", "COUNT", 1)
    assert len(one) == 1 and one[0] in (b"s1", b"s2")
    assert len(tc_tagkeys(r, b"big", "COUNT", 7)) == 7


def test_tagkeys_errors(r):
    tc_set(r, b"k", b"v", "TAGS", 1, b"t")
    for bad in ("0", "-1", "-100"):
        with raises_exact("ERR COUNT must be a positive integer"):
            tc_tagkeys(r, b"t", "COUNT", bad)
    for bad in ("abc", "1.5", "", "99999999999999999999"):
        with raises_exact("ERR value is not an integer or out of range"):
            tc_tagkeys(r, b"t", "COUNT", bad)
    with raises_exact("ERR syntax error"):
        tc_tagkeys(r, b"t", "FOO")
    with raises_exact("ERR syntax error"):
        tc_tagkeys(r, b"t", "COUNT", 5, "EXTRA")
    with raises_exact("ERR syntax error"):
        tc_tagkeys(r, b"t", "LIMIT", 5)
    with raises_exact("ERR syntax error"):
        tc_tagkeys(r, b"t", "COUNT", 5, "COUNT", 6)
    with raises_exact("ERR syntax error"):
        tc_tagkeys(r, b"t", "LOCAL", "LOCAL")
    # LOCAL is an option (a no-op without a cluster), before or after COUNT.
    assert tc_tagkeys(r, b"t", "LOCAL", "COUNT", 5) == [b"k"]
    assert tc_tagkeys(r, b"t", "COUNT", 5, "LOCAL") == [b"k"]


def test_tagcount_keeps_remaining_tags_until_reclaimed(r):
    tc_set(r, b"k", b"v", "TAGS", 2, b"x", b"y")
    tc_set(r, b"other", b"v", "TAGS", 1, b"y")
    p = r.pipeline(transaction=True)
    p.execute_command("TIERCACHE.INVALIDATE", b"x")
    p.execute_command("TIERCACHE.TAGCOUNT", b"y")
    p.execute_command("TIERCACHE.TAGCOUNT", b"x")
    assert p.execute() == [1, 2, 0]
    wait_reclaim_done(r)
    assert tc_tagcount(r, b"y") == 1
    assert tc_tagkeys(r, b"y") == [b"other"]
    assert_tag_index_exact(r, also_tags=[b"x", b"y"])


def test_stats_and_info_fields(r):
    tc_set(r, b"a", b"v", "TAGS", 3, b"t1", b"t2", b"t3")
    tc_set(r, b"b", b"v", "TAGS", 1, b"t1")
    s = stats(r)
    assert s["tags"] == 3 and s["tag_index_entries"] == 4 and s["reclaim_pending"] == 0
    tc_invalidate(r, b"t3")
    s2 = wait_reclaim_done(r)
    assert s2["invalidations"] == s["invalidations"] + 1
    assert s2["reclaimed"] == s["reclaimed"] + 1
    assert s2["tags"] == 1 and s2["tag_index_entries"] == 1
    info = info_section(r, "tiercache")
    for f in ("tags", "tag_index_entries", "invalidations", "invalidation_messages", "reclaim_pending", "reclaimed"):
        assert int(info[f"tiercache_{f}"]) == s2[f], f
    names = [k for k in info if k.startswith("tiercache_")]
    tag_fields = ["tags", "tag_index_entries", "index_longest_op_us", "index_longest_op_steps", "invalidations", "invalidation_messages", "reclaim_pending",
                  "reclaimed", "reclaim_ticks", "reclaim_max_tick_us"]
    at = names.index("tiercache_tags")
    assert names[at:at + len(tag_fields)] == [f"tiercache_{f}" for f in tag_fields]
    assert s2["reclaim_ticks"] >= 1 and s2["reclaim_max_tick_us"] > 0


def test_stats_tags_counts_tags_per_database(r, r_db1):
    """Tags are indexed per database: `tags` counts (db, tag) pairs with at least one live entry."""
    tc_set(r, b"k", b"v", "TAGS", 1, b"shared")
    tc_set(r_db1, b"k", b"v", "TAGS", 2, b"shared", b"only1")
    s = stats(r)
    assert s["tag_index_entries"] == 3
    assert s["tags"] == 3  # shared in db 0, shared and only1 in db 1


# ---- reclaim -------------------------------------------------------------------------------------------


def test_reclaim_deletes_invalidated_keys(r):
    tagged = set_many(r, b"t", 50, "TAGS", 1, b"gone")
    kept = set_many(r, b"u", 10)
    kept += set_many(r, b"o", 5, "TAGS", 1, b"other")
    before = stats(r)
    assert tc_invalidate(r, b"gone") == 50
    wait_for(lambda: sum(exists_each(r, tagged)) == 0, timeout=10, what="invalidated keys deleted")
    s = wait_reclaim_done(r)
    assert s["reclaimed"] == before["reclaimed"] + 50
    assert s["entries"] == 15
    assert gets(r, kept) == [b"v%d" % i for i in range(10)] + [b"v%d" % i for i in range(5)]
    assert r.dbsize() == 15
    assert_tag_index_exact(r, also_tags=[b"gone"])


def test_reclaim_with_budget_1_finishes(r):
    r.config_set("tiercache.reclaim-budget", 1)
    assert config_get(r, "tiercache.reclaim-budget") == b"1"
    tagged = set_many(r, b"t", 300, "TAGS", 1, b"slow")
    set_many(r, b"u", 5)
    before = stats(r)
    assert tc_invalidate(r, b"slow") == 300
    assert stats(r)["reclaim_pending"] > 0  # 1 key per tick: cannot be done yet
    s = wait_reclaim_done(r, timeout=20)
    assert s["reclaimed"] == before["reclaimed"] + 300
    assert sum(exists_each(r, tagged)) == 0
    assert r.dbsize() == 5
    assert_tag_index_exact(r, also_tags=[b"slow"])


def test_key_overwritten_after_invalidation_survives_reclaim(r):
    r.config_set("tiercache.reclaim-budget", 1)
    keys = set_many(r, b"t", 500, "TAGS", 1, b"t")
    before = stats(r)
    assert tc_invalidate(r, b"t") == 500
    # Overwrite a few right away (atomically with checking whether the key was reclaimed already).
    chosen = keys[::100]
    still_there = 0
    for i, k in enumerate(chosen):
        p = r.pipeline(transaction=True)
        p.exists(k)
        p.execute_command("TIERCACHE.SET", k, b"new%d" % i, "TAGS", 2, b"t", b"n")
        existed, ok = p.execute()
        assert ok == b"OK"
        still_there += existed
    assert still_there > 0
    s = wait_reclaim_done(r, timeout=20)
    assert gets(r, chosen) == [b"new%d" % i for i in range(len(chosen))]
    assert r.dbsize() == len(chosen)
    assert s["reclaimed"] == before["reclaimed"] + 500 - still_there
    assert sorted(tc_tagkeys(r, b"t")) == sorted(chosen)
    assert_tag_index_exact(r, also_tags=[b"t", b"n"])


def test_reclaim_budget_config_range(r):
    for bad in (0, -1, 1_000_001):
        with pytest.raises(redis.ResponseError):
            r.config_set("tiercache.reclaim-budget", bad)
        assert config_get(r, "tiercache.reclaim-budget") == b"1000"
    r.config_set("tiercache.reclaim-budget", 1_000_000)
    assert config_get(r, "tiercache.reclaim-budget") == b"1000000"


# ---- the index stays exact on every path ---------------------------------------------------------------


def test_index_overwrite_with_other_tags(r):
    tc_set(r, b"k", b"v", "TAGS", 2, b"a", b"b")
    tc_set(r, b"j", b"v", "TAGS", 1, b"a")
    assert_tag_index_exact(r)
    tc_set(r, b"k", b"v2", "TAGS", 2, b"b", b"c")
    idx = assert_tag_index_exact(r, also_tags=[b"a"])
    assert idx[0] == {b"a": {b"j"}, b"b": {b"k"}, b"c": {b"k"}}
    tc_set(r, b"k", b"v3")  # no tags any more
    assert_tag_index_exact(r, also_tags=[b"b", b"c"])
    assert stats(r)["tag_index_entries"] == 1
    assert tc_invalidate(r, b"b", b"c") == 0
    assert tc_get(r, b"k") == b"v3"


@pytest.mark.parametrize("cmd", ["DEL", "UNLINK"])
def test_index_del_unlink(r, cmd):
    tc_set(r, b"a", b"v", "TAGS", 2, b"x", b"y")
    tc_set(r, b"b", b"v", "TAGS", 1, b"x")
    tc_set(r, b"c", b"v", "TAGS", 1, b"z")
    assert r.execute_command(cmd, b"a", b"c", b"missing") == 2
    assert_tag_index_exact(r, also_tags=[b"y", b"z"])
    assert stats(r)["tag_index_entries"] == 1
    assert tc_invalidate(r, b"x", b"y", b"z") == 1


def test_index_rename(r):
    tc_set(r, b"src", b"s", "TAGS", 2, b"s1", b"s2")
    tc_set(r, b"dst", b"d", "TAGS", 1, b"d1")
    tc_set(r, b"other", b"o", "TAGS", 1, b"s1")
    r.rename(b"src", b"moved")
    idx = assert_tag_index_exact(r)
    assert idx[0][b"s1"] == {b"moved", b"other"}
    r.rename(b"moved", b"dst")  # onto an existing tagged key: its tags go
    idx = assert_tag_index_exact(r, also_tags=[b"d1"])
    assert idx[0] == {b"s1": {b"dst", b"other"}, b"s2": {b"dst"}}
    assert tc_invalidate(r, b"d1") == 0
    assert tc_invalidate(r, b"s2") == 1
    assert tc_get(r, b"dst") is None and tc_get(r, b"other") == b"o"
    assert_tag_index_exact(r, also_tags=[b"s2", b"d1"])


def test_index_move(r, r_db1):
    tc_set(r, b"k", b"v", "TAGS", 2, b"m", b"n")
    tc_set(r, b"stay", b"v", "TAGS", 1, b"o")
    assert_tag_index_exact(r)
    assert r.move(b"k", 1)
    idx = assert_tag_index_exact(r, also_tags=[b"m", b"n", b"o"])
    assert idx == {0: {b"o": {b"stay"}}, 1: {b"m": {b"k"}, b"n": {b"k"}}}
    assert tc_invalidate(r, b"m") == 0
    assert tc_get(r_db1, b"k") == b"v"
    assert tc_invalidate(r_db1, b"m") == 1
    assert tc_get(r_db1, b"k") is None
    assert tc_get(r, b"stay") == b"v"
    assert_tag_index_exact(r, also_tags=[b"m", b"n", b"o"])


def test_index_copy_same_db(r):
    tc_set(r, b"a", b"v", "TAGS", 2, b"c1", b"c2")
    tc_set(r, b"b", b"v", "TAGS", 1, b"bb")
    assert r.copy(b"a", b"a2")
    idx = assert_tag_index_exact(r)
    assert idx[0][b"c1"] == {b"a", b"a2"}
    assert r.copy(b"a", b"b", replace=True)
    idx = assert_tag_index_exact(r, also_tags=[b"bb"])
    assert idx[0] == {b"c1": {b"a", b"a2", b"b"}, b"c2": {b"a", b"a2", b"b"}}
    assert tc_invalidate(r, b"c2") == 3
    assert_tag_index_exact(r, also_tags=[b"c1", b"c2", b"bb"])


def test_index_copy_to_db1(r, r_db1):
    tc_set(r, b"a", b"v", "TAGS", 2, b"c1", b"c2")
    assert r.copy(b"a", b"a", destination_db=1)
    for c in (r, r_db1):
        for t in (b"c1", b"c2"):
            assert tc_tagcount(c, t) == 1 and tc_tagkeys(c, t) == [b"a"]
    assert stats(r)["tag_index_entries"] == 4
    assert tc_invalidate(r_db1, b"c1") == 1
    assert tc_get(r_db1, b"a") is None
    assert tc_get(r, b"a") == b"v"
    idx = assert_tag_index_exact(r, also_tags=[b"c1", b"c2"])
    assert idx == {0: {b"c1": {b"a"}, b"c2": {b"a"}}}
    # Copied again: the same tags now live in two dbs; STATS `tags` counts (db, tag) pairs.
    assert r.copy(b"a", b"b", destination_db=1)
    idx = assert_tag_index_exact(r, also_tags=[b"c1", b"c2"])
    assert idx == {0: {b"c1": {b"a"}, b"c2": {b"a"}}, 1: {b"c1": {b"b"}, b"c2": {b"b"}}}


def test_index_dump_restore(r):
    tc_set(r, b"a", b"v", "TAGS", 2, b"r1", b"r2")
    tc_set(r, b"b", b"w", "TAGS", 1, b"bb")
    dumped = r.dump(b"a")
    r.restore(b"a2", 0, dumped)
    idx = assert_tag_index_exact(r)
    assert idx[0][b"r1"] == {b"a", b"a2"}
    r.restore(b"b", 0, dumped, replace=True)
    idx = assert_tag_index_exact(r, also_tags=[b"bb"])
    assert idx[0] == {b"r1": {b"a", b"a2", b"b"}, b"r2": {b"a", b"a2", b"b"}}
    r.delete(b"a")
    r.restore(b"a", 0, dumped)
    assert_tag_index_exact(r, also_tags=[b"bb"])
    assert tc_invalidate(r, b"r1") == 3
    assert_tag_index_exact(r, also_tags=[b"r1", b"r2", b"bb"])


def test_index_active_expiry(r):
    set_many(r, b"e", 20, "PX", 100, "TAGS", 2, b"exp", b"both")
    tc_set(r, b"stay", b"v", "TAGS", 1, b"both")
    assert stats(r)["tag_index_entries"] == 41
    # Active expiry only: wait without touching the keys.
    wait_for(lambda: stats(r)["tag_index_entries"] == 1, timeout=10, interval=0.05, what="active expiry")
    assert r.dbsize() == 1
    assert_tag_index_exact(r, also_tags=[b"exp"])


def test_index_lazy_expiry(r):
    r.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 0)
    tc_set(r, b"a", b"v", "PX", 50, "TAGS", 2, b"x", b"y")
    tc_set(r, b"b", b"v", "PX", 50, "TAGS", 1, b"x")
    tc_set(r, b"stay", b"v", "TAGS", 1, b"x")
    time.sleep(0.15)
    assert stats(r)["tag_index_entries"] == 4  # nothing expired without a touch
    assert r.exists(b"a") == 0  # lazy expiry of a
    s = stats(r)
    assert s["tag_index_entries"] == 2 and s["tags"] == 1
    assert tc_tagcount(r, b"y") == 0
    r.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 1)
    assert_tag_index_exact(r, also_tags=[b"y"])
    assert tc_tagkeys(r, b"x") == [b"stay"]


@pytest.mark.parametrize("flush", ["FLUSHDB", "FLUSHDB ASYNC", "FLUSHALL", "FLUSHALL ASYNC"])
def test_index_flush(r, r_db1, flush):
    tc_set(r, b"a", b"v", "TAGS", 2, b"z1", b"z2")
    tc_set(r_db1, b"b", b"v", "TAGS", 1, b"o1")
    r.execute_command(*flush.split())
    if flush.startswith("FLUSHDB"):
        idx = assert_tag_index_exact(r, also_tags=[b"z1", b"z2"])
        assert idx == {1: {b"o1": {b"b"}}}
        assert tc_invalidate(r_db1, b"o1") == 1
    else:
        assert assert_tag_index_exact(r, also_tags=[b"z1", b"z2", b"o1"]) == {}
        assert tc_invalidate(r_db1, b"o1") == 0
    assert tc_invalidate(r, b"z1") == 0
    assert_tag_index_exact(r, also_tags=[b"z1", b"z2", b"o1"])


def test_index_flush_during_reclaim(r):
    r.config_set("tiercache.reclaim-budget", 1)
    set_many(r, b"t", 300, "TAGS", 1, b"t")
    assert tc_invalidate(r, b"t") == 300
    r.flushall()
    set_many(r, b"t", 3, "TAGS", 1, b"t")  # same names again, after the flush
    wait_reclaim_done(r, timeout=20)
    assert gets(r, [b"t0", b"t1", b"t2"]) == [b"v0", b"v1", b"v2"]
    assert_tag_index_exact(r, also_tags=[b"t"])


def test_index_swapdb(r, r_db1):
    tc_set(r, b"a", b"zero", "TAGS", 1, b"s0")
    tc_set(r_db1, b"b", b"one", "TAGS", 2, b"s1", b"x")
    r.swapdb(0, 1)
    idx = assert_tag_index_exact(r, also_tags=[b"s0", b"s1", b"x"])
    assert idx == {0: {b"s1": {b"b"}, b"x": {b"b"}}, 1: {b"s0": {b"a"}}}
    assert tc_invalidate(r, b"s0") == 0
    assert tc_invalidate(r_db1, b"s1") == 0
    assert tc_invalidate(r, b"s1") == 1
    assert tc_get(r, b"b") is None
    assert tc_get(r_db1, b"a") == b"zero"
    assert_tag_index_exact(r, also_tags=[b"s0", b"s1", b"x"])


def test_index_debug_reload(r, r_db1):
    tc_set(r, b"a", b"v", "TAGS", 2, b"d1", b"d2")
    tc_set(r, b"b", b"v", "TAGS", 1, b"d1")
    tc_set(r_db1, b"c", b"v", "TAGS", 1, b"e1")
    tc_set(r, b"gone", b"v", "TAGS", 1, b"dead")
    tc_invalidate(r, b"dead")
    before = assert_tag_index_exact(r)
    s_before = stats(r)
    r.execute_command("DEBUG", "RELOAD")
    after = assert_tag_index_exact(r, also_tags=[b"dead"])
    assert after == before
    s = stats(r)
    assert (s["tags"], s["tag_index_entries"]) == (s_before["tags"], s_before["tag_index_entries"])
    assert tc_invalidate(r, b"d1") == 2
    assert tc_invalidate(r_db1, b"e1") == 1
    assert_tag_index_exact(r, also_tags=[b"d1", b"d2", b"e1", b"dead"])


def test_index_maxmemory_eviction(start_server):
    srv = start_server(name="evict")
    c = srv.client(protocol=3)
    used = int(info_section(c, "memory")["used_memory"])
    c.config_set("maxmemory", used + 2_000_000)
    c.config_set("maxmemory-policy", "allkeys-lru")
    value = b"x" * 1000
    for batch in range(40):
        p = c.pipeline(transaction=False)
        for i in range(100):
            n = batch * 100 + i
            p.execute_command("TIERCACHE.SET", b"k%d" % n, value, "NOCOMPRESS", "TAGS", 2, b"all", b"g%d" % (n % 7))
        p.execute(raise_on_error=False)
        if int(info_section(c, "stats")["evicted_keys"]) > 0 and batch >= 5:
            break
    assert int(info_section(c, "stats")["evicted_keys"]) > 0
    c.config_set("maxmemory", 0)
    idx = assert_tag_index_exact(c, also_tags=[b"all"] + [b"g%d" % i for i in range(7)])
    assert 0 < len(idx[0][b"all"]) < 4000
    n = len(idx[0][b"all"])
    assert tc_invalidate(c, b"all") == n
    assert_tag_index_exact(c, also_tags=[b"all"] + [b"g%d" % i for i in range(7)])


# ---- invalidation messages -----------------------------------------------------------------------------


def next_message(p, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = p.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if m is not None and m["type"] == "message":
            return m
    return None


def no_message(p, wait=0.2):
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        m = p.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if m is not None and m["type"] == "message":
            return m
    return None


def subscribed(c, *channels):
    p = c.pubsub()
    p.subscribe(*channels)
    for _ in channels:
        m = p.get_message(timeout=2)
        assert m is not None and m["type"] == "subscribe", m
    return p


def decode(m, channel=DEFAULT_INVALIDATION_CHANNEL):
    assert m is not None, "no invalidation message"
    assert m["channel"] == channel
    assert isinstance(m["data"], bytes)
    return msgpack.unpackb(m["data"], raw=False)


def test_invalidation_message(r, r_db1):
    run_id = info_section(r, "server")["run_id"]
    p = subscribed(r, DEFAULT_INVALIDATION_CHANNEL)
    try:
        tc_set(r, b"k", b"v", "TAGS", 2, b"\xff", b"a")
        base = stats(r)
        assert tc_invalidate(r, b"a", b"\x00", b"\xff") == 2  # k is under a and under \xff
        msg = decode(next_message(p))
        assert msg == {"v": 1, "run_id": run_id, "seq": msg["seq"], "db": 0, "tags": [b"a", b"\x00", b"\xff"]}
        assert list(msg) == ["v", "run_id", "seq", "db", "tags"]
        assert isinstance(msg["seq"], int) and msg["seq"] >= 1
        assert no_message(p) is None  # exactly one
        first = msg["seq"]
        assert stats(r)["invalidation_messages"] == first
        assert first == base["invalidation_messages"] + 1
        # seq +1 per INVALIDATE, even when nothing matched; db of the client's SELECT.
        assert tc_invalidate(r, b"unknown") == 0
        assert decode(next_message(p)) == {"v": 1, "run_id": run_id, "seq": first + 1, "db": 0, "tags": [b"unknown"]}
        assert tc_invalidate(r_db1, b"t1", b"t2") == 0
        assert decode(next_message(p)) == {"v": 1, "run_id": run_id, "seq": first + 2, "db": 1, "tags": [b"t1", b"t2"]}
        assert no_message(p) is None
        s = stats(r)
        assert s["invalidation_messages"] == first + 2
        assert s["invalidations"] == base["invalidations"] + 3
    finally:
        p.close()


def test_invalidation_channel_config(r):
    assert config_get(r, "tiercache.invalidation-channel") == DEFAULT_INVALIDATION_CHANNEL
    p = subscribed(r, DEFAULT_INVALIDATION_CHANNEL, b"other:chan")
    try:
        assert tc_invalidate(r, b"a") == 0
        first = decode(next_message(p))["seq"]
        r.config_set("tiercache.invalidation-channel", "other:chan")
        assert config_get(r, "tiercache.invalidation-channel") == b"other:chan"
        tc_invalidate(r, b"b")
        m = next_message(p)
        assert decode(m, channel=b"other:chan")["seq"] == first + 1
        assert decode(m, channel=b"other:chan")["tags"] == [b"b"]
        assert no_message(p) is None
        # Empty channel: no publishing, the command still runs and counts.
        r.config_set("tiercache.invalidation-channel", "")
        assert config_get(r, "tiercache.invalidation-channel") == b""
        tc_set(r, b"k", b"v", "TAGS", 1, b"c")
        before = stats(r)
        assert tc_invalidate(r, b"c") == 1
        assert tc_get(r, b"k") is None
        assert no_message(p) is None
        s = stats(r)
        assert s["invalidations"] == before["invalidations"] + 1
        assert s["invalidation_messages"] == before["invalidation_messages"] == first + 1
        r.config_set("tiercache.invalidation-channel", DEFAULT_INVALIDATION_CHANNEL)
        tc_invalidate(r, b"d")
        msg = decode(next_message(p))
        assert msg["tags"] == [b"d"]
        assert msg["seq"] > first + 1
        assert stats(r)["invalidation_messages"] == msg["seq"]
    finally:
        p.close()


def test_invalidation_seq_starts_at_1_per_server(start_server, protocol):
    srv = start_server(name="seq")
    c = srv.client(protocol=protocol)
    p = subscribed(c, DEFAULT_INVALIDATION_CHANNEL)
    try:
        for i in range(1, 4):
            tc_invalidate(c, b"t%d" % i)
            msg = decode(next_message(p))
            assert (msg["seq"], msg["tags"]) == (i, [b"t%d" % i])
        assert stats(c)["invalidation_messages"] == 3
    finally:
        p.close()


# ---- replication ---------------------------------------------------------------------------------------


def wait_link_up(replica_client):
    wait_for(lambda: info_section(replica_client, "replication").get("master_link_status") == "up",
             timeout=20, interval=0.05, what="master_link_status:up")


def cmd_calls(c, name: str) -> int:
    line = info_section(c, "commandstats").get(f"cmdstat_{name}")
    if not line:
        return 0
    return int(dict(kv.split("=") for kv in line.split(","))["calls"])


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_replica_follows_invalidation(start_server, protocol):
    master = start_server(args=["--repl-diskless-sync-delay", "0"], name="master")
    replica = start_server(name="replica")
    m, rep = master.client(protocol=protocol), replica.client(protocol=protocol)
    m1, rep1 = master.client(protocol=protocol, db=1), replica.client(protocol=protocol, db=1)
    # Some tagged data already there before the full sync, some streamed.
    synced = set_many(m, b"s", 20, "TAGS", 2, b"t", b"pre")
    rep.replicaof("127.0.0.1", master.port)
    wait_link_up(rep)
    m.config_set("tiercache.reclaim-budget", 1)
    streamed = set_many(m, b"x", 200, "TAGS", 1, b"t")
    keep = set_many(m, b"u", 5, "TAGS", 1, b"keep")
    tc_set(m1, b"s0", b"db1", "TAGS", 1, b"d1")
    assert m.wait(1, 5000) == 1
    assert_tag_index_exact(rep, also_tags=[b"t", b"pre", b"keep", b"d1"])
    rp = subscribed(rep, DEFAULT_INVALIDATION_CHANNEL)
    try:
        dels_before = cmd_calls(rep, "del")
        assert tc_invalidate(m, b"t") == 220
        assert tc_invalidate(m1, b"t") == 0
        assert m.wait(1, 5000) == 1
        assert gets(rep, synced + streamed) == [None] * 220
        assert metas(rep, synced[:5] + streamed[:5]) == [None] * 10
        assert gets(rep, keep) == [b"v%d" % i for i in range(5)]
        assert tc_get(rep1, b"s0") == b"db1"
        assert tc_tagcount(rep1, b"d1") == 1
        # The replica publishes its own message (its own run_id and seq; its full resync already
        # published reset messages, so the seq is past 1).
        msg = decode(next_message(rp))
        assert msg["seq"] > 1
        assert {k: v for k, v in msg.items() if k != "seq"} == {
            "v": 1, "run_id": info_section(rep, "server")["run_id"], "db": 0, "tags": [b"t"]}
        assert msg["run_id"] != info_section(m, "server")["run_id"]
    finally:
        rp.close()
    s = wait_reclaim_done(m, timeout=20)
    assert s["reclaimed"] == 220
    assert m.wait(1, 5000) == 1
    assert rep.dbsize() == m.dbsize() == 5
    assert sum(exists_each(rep, synced + streamed)) == 0
    assert cmd_calls(rep, "del") - dels_before == 220  # deleted by the master's DELs
    rs = wait_reclaim_done(rep)
    assert rs["reclaimed"] == 0
    assert rs["invalidations"] == 2
    idx = assert_tag_index_exact(rep, also_tags=[b"t", b"pre", b"keep", b"d1"])
    assert idx == assert_tag_index_exact(m, also_tags=[b"t", b"pre", b"keep", b"d1"])
    assert idx == {0: {b"keep": set(keep)}, 1: {b"d1": {b"s0"}}}


# ---- persistence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_debug_reload_during_slow_reclaim(start_server, protocol):
    srv = start_server(name="reload")
    c = srv.client(protocol=protocol)
    c.config_set("tiercache.reclaim-budget", 1)
    tagged = set_many(c, b"t", 5000, "TAGS", 2, b"big", b"side")
    untagged = set_many(c, b"u", 50)
    other = set_many(c, b"o", 20, "TAGS", 1, b"side")
    before = stats(c)
    assert tc_invalidate(c, b"big") == 5000
    time.sleep(0.05)
    assert stats(c)["reclaim_pending"] > 0
    c.execute_command("DEBUG", "RELOAD")
    s = stats(c)
    assert 0 < s["reclaim_pending"] <= 5000
    assert gets(c, tagged) == [None] * 5000
    assert metas(c, tagged) == [None] * 5000
    assert tc_invalidate(c, b"big") == 0
    assert tc_tagcount(c, b"big") == 0
    assert gets(c, untagged) == [b"v%d" % i for i in range(50)]
    assert gets(c, other) == [b"v%d" % i for i in range(20)]
    # The reclaim resumes (still at 1 key per tick), then finish it faster.
    pending = s["reclaim_pending"]
    wait_for(lambda: stats(c)["reclaim_pending"] < pending, timeout=5, what="reclaim to resume after RELOAD")
    c.config_set("tiercache.reclaim-budget", DEFAULT_RECLAIM_BUDGET)
    wait_reclaim_done(c, timeout=20)
    assert sum(exists_each(c, tagged)) == 0
    assert c.dbsize() == 70
    assert gets(c, untagged) == [b"v%d" % i for i in range(50)]
    idx = assert_tag_index_exact(c, also_tags=[b"big", b"side"])
    assert idx == {0: {b"side": set(other)}}
    assert before["reclaim_pending"] == 0


def test_flush_publishes_a_reset_message(r):
    """FLUSHDB/FLUSHALL change the dataset without per-tag messages: subscribers get a reset."""
    p = subscribed(r, DEFAULT_INVALIDATION_CHANNEL)
    try:
        tc_set(r, b"k", b"v", "TAGS", 1, b"t")
        tc_invalidate(r, b"t")
        first = decode(next_message(p))
        r.flushdb()
        reset = decode(next_message(p))
        assert reset == {"v": 1, "run_id": first["run_id"], "seq": first["seq"] + 1, "reset": True, "tags": []}
    finally:
        p.close()
