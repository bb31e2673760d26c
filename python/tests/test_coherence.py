"""L1 coherence: key tracking pushes, invalidation messages (gap detection, resets), and fills racing
an invalidation."""

from __future__ import annotations

import threading

import msgpack
import pytest

from conftest import wait_for


def test_another_clients_write_drops_the_key_from_l1(make_cache, r):
    a = make_cache()
    b = make_cache()
    a.set("k", "old")
    assert a.get("k") == "old" and a.stats()["l1_hits"] == 1
    b.set("k", "new")
    wait_for(lambda: "k" not in a._core._l1, what="the key push")
    assert a.get("k") == "new"
    assert a.stats()["invalidations_received"] >= 1


def test_own_writes_are_not_echoed_back(make_cache, r):
    a = make_cache()
    a.set("k", 1)
    # NOLOOP: our own SET produces no push, so the value we just stored stays in L1.
    a.set("k2", 2)
    b = make_cache()
    b.set("sentinel", 0)  # a push that does arrive, after ours would have
    wait_for(lambda: a.stats()["invalidations_received"] >= 1, what="the sentinel push")
    assert "k" in a._core._l1 and "k2" in a._core._l1


def test_plain_redis_writes_and_deletes_drop_the_key(make_cache, r):
    a = make_cache()
    a.set("k", 1)
    r.delete("t:v1:k")
    wait_for(lambda: "k" not in a._core._l1, what="the DEL push")
    a.set("k", 1)
    r.execute_command("TIERCACHE.SET", "t:v1:k", msgpack.packb(2), "TAGS", 1, "ns:t:v1")
    wait_for(lambda: "k" not in a._core._l1, what="the SET push")
    assert a.get("k") == 2


def test_tag_invalidation_message_drops_tagged_entries(make_cache, r):
    a = make_cache()
    b = make_cache()
    a.set("u1", "x", tags=["user:1"])
    a.set("u2", "y", tags=["user:2"])
    assert b.invalidate_tags(["user:1"]) == 1
    wait_for(lambda: a.get("u1") is None, what="the invalidation message")
    assert a.get("u2") == "y"
    assert a.stats()["l1_hits"] >= 1


def test_invalidation_from_any_client_on_the_server(make_cache, r):
    a = make_cache()
    a.set("u1", "x", tags=["user:1"])
    r.execute_command("TIERCACHE.INVALIDATE", "user:1")
    wait_for(lambda: a.get("u1") is None, what="the invalidation message")


def test_own_invalidation_is_read_your_writes(make_cache, r):
    a = make_cache()
    a.set("u1", "x", tags=["user:1"])
    a.invalidate_tags("user:1")
    assert a.get("u1") is None  # no wait: dropped locally before and after the command


def test_flush_resets_l1(make_cache, r):
    a = make_cache()
    a.set("k", 1)
    r.flushdb()
    wait_for(lambda: a.stats()["l1_entries"] == 0, what="the flush push / reset message")
    assert a.stats()["l1_resets"] >= 1


def test_sequence_gap_and_unknown_version_drop_l1(make_cache):
    a = make_cache()
    core = a._core

    def msg(seq, run_id="r1", **extra):
        d = {"v": 1, "run_id": run_id, "seq": seq, "db": 0, "tags": [b"t"]}
        d.update(extra)
        return msgpack.packb(d, use_bin_type=True)

    core._last_msg = None
    a.set("k", 1)
    core.on_message(msg(5))
    core.on_message(msg(6))
    assert "k" in core._l1  # in order, a tag it does not carry
    core.on_message(msg(8))  # 7 was missed
    assert "k" not in core._l1
    a.set("k", 1)
    core.on_message(msg(9, run_id="r2"))  # a restarted server
    assert "k" not in core._l1
    a.set("k", 1)
    core.on_message(msg(10, run_id="r2", v=2))
    assert "k" not in core._l1
    a.set("k", 1)
    core.on_message(b"\xc1garbage")
    assert "k" not in core._l1
    a.set("k", 1)
    d = {"v": 1, "run_id": "r3", "seq": 1, "reset": True, "tags": []}
    core._last_msg = None
    core.on_message(msgpack.packb(d))
    assert "k" not in core._l1


def test_message_of_another_database_is_ignored(make_cache):
    a = make_cache()
    a.set("k", 1, tags=["t"])
    a._core._last_msg = None
    a._core.on_message(msgpack.packb({"v": 1, "run_id": "x", "seq": 1, "db": 5, "tags": [b"t"]}, use_bin_type=True))
    assert a.get("k") == 1


def test_cache_on_another_db(make_cache, r, server):
    a = make_cache(client_kw={"db": 2})
    b = make_cache(client_kw={"db": 2})
    a.set("k", 1, tags=["t"])
    assert server.client(db=2).exists("t:v1:k") == 1
    b.invalidate_tags("t")
    wait_for(lambda: a.get("k") is None, what="the invalidation on db 2")


def test_an_invalidation_during_a_load_keeps_the_old_value_out(make_cache, r):
    """The fill race: the loader read the database before a change; the change's invalidation arrives
    while it is still loading. The value goes to the caller but neither to Redis (fenced) nor to L1."""
    a = make_cache()
    b = make_cache()
    started, proceed = threading.Event(), threading.Event()

    def slow_load():
        started.set()
        assert proceed.wait(10)
        return "old"

    out = []
    t = threading.Thread(target=lambda: out.append(a.get_or_load("k", slow_load, tags=["user:1"])))
    t.start()
    assert started.wait(10)
    b.invalidate_tags(["user:1"])
    wait_for(lambda: a._core._tags[b"user:1"].v > 0, what="the invalidation message")
    proceed.set()
    t.join(10)
    assert out == ["old"]
    assert a.stats()["fenced"] == 1
    assert "k" not in a._core._l1
    assert r.exists("t:v1:k") == 0


def test_a_generation_bump_alone_keeps_a_degraded_load_out_of_l1(make_cache):
    """The same guard without Redis in the way: a ticket taken before the load, a tag invalidated during
    it (as the listener thread would), and the insert is refused."""
    a = make_cache()
    core = a._core
    o = core.options(60, 0, ["t"])
    ticket = core.ticket("t:v1:k", o)
    core.drop_tag(b"t")
    core.l1_put("k", 1, b"\x01", False, o, ticket)
    assert "k" not in core._l1
    ticket = core.ticket("t:v1:k", o)
    core.drop_key(b"t:v1:k")
    core.l1_put("k", 1, b"\x01", False, o, ticket)
    assert "k" not in core._l1
    ticket = core.ticket("t:v1:k", o)
    core.reset_l1()
    core.l1_put("k", 1, b"\x01", False, o, ticket)
    assert "k" not in core._l1
    ticket = core.ticket("t:v1:k", o)
    core.l1_put("k", 1, b"\x01", False, o, ticket)
    assert "k" in core._l1


@pytest.mark.parametrize("n", [200])
def test_many_tags_stay_bounded(make_cache, n):
    from tiercache import _core

    a = make_cache()
    old = _core.MAX_TRACKED_TAGS
    _core.MAX_TRACKED_TAGS = 50
    try:
        for i in range(n):
            a.set(f"k{i}", i, tags=[f"tag{i}"])
        assert len(a._core._tags) <= 51
    finally:
        _core.MAX_TRACKED_TAGS = old
