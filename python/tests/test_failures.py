"""Fail-safe (a failing loader serves the stale L1 copy), degradation while Redis is down (loader only,
circuit breaker), and coherence resuming when it returns (L1 dropped)."""

from __future__ import annotations

import time

import pytest

from conftest import wait_for
from tiercache import RedisUnavailable


class DbDown(Exception):
    pass


def boom():
    raise DbDown("database unreachable")


def test_fail_safe_serves_the_expired_l1_copy(start_server, protocol):
    """Redis is down and the database fails too: the L1 copy past its deadline, never invalidated, is
    served. (While Redis is up, an expired entry is dropped by its key push, and a stale one is served
    by Redis itself.)"""
    import redis as redis_py

    from tiercache import TierCache

    srv = start_server()
    c = TierCache(redis_py.Redis(host="127.0.0.1", port=srv.port, protocol=protocol), namespace="t", registry=None,
                  l1_ttl=0.05, op_timeout=0.2)
    try:
        assert c.get_or_load("k", lambda: "v1", ttl=60) == "v1"
        entry = c._core._l1["k"]
        srv.stop()
        wait_for(lambda: time.monotonic() > entry.until, what="the L1 deadline")
        assert c.get_or_load("k", boom) == "v1"
        s = c.stats()
        assert (s["fail_safe"], s["load_errors"]) == (1, 1)
        with pytest.raises(DbDown):
            c.get_or_load("never-cached", boom)
    finally:
        c.close()


def test_fail_safe_never_serves_an_invalidated_copy(make_cache, r):
    c = make_cache()
    c.get_or_load("k", lambda: "v1", tags=["user:1"])
    c.invalidate_tags("user:1")
    with pytest.raises(DbDown):
        c.get_or_load("k", boom, tags=["user:1"])
    assert c.stats()["fail_safe"] == 0


def test_loader_errors_propagate_and_release_the_lease(make_cache, r):
    c = make_cache()
    with pytest.raises(DbDown):
        c.get_or_load("k", boom)
    s = r.execute_command("TIERCACHE.STATS")
    assert dict(zip(s[::2], s[1::2]))[b"leases"] == 0
    assert c.get_or_load("k", lambda: "ok") == "ok"


def test_redis_down_degrades_to_the_loader_then_resumes(start_server, protocol):
    import redis as redis_py

    from tiercache import TierCache

    srv = start_server()
    port = srv.port
    c = TierCache(redis_py.Redis(host="127.0.0.1", port=port, protocol=protocol), namespace="t", registry=None,
                  op_timeout=0.2, breaker_failures=2, breaker_cooldown=0.3)
    try:
        c.set("k", "cached")
        assert c.get("k") == "cached"
        srv.stop()
        wait_for(lambda: not c._core.tracking, what="the listener to notice")
        # L1 keeps serving what it has...
        assert c.get_or_load("k", boom) == "cached"
        # ...and misses go to the loader: no Redis error reaches the caller.
        assert c.get_or_load("other", lambda: "from db") == "from db"
        assert c.get_or_load("other2", lambda: "from db") == "from db"
        s = c.stats()
        assert s["degraded_loads"] >= 2 and s["redis_errors"] >= 2
        assert s["degraded"] == 1  # the circuit is open: Redis is not even tried
        with pytest.raises(RedisUnavailable):
            c.set("x", 1)
        # Redis comes back on the same port: after the cooldown, the next call reconnects and drops L1
        # (invalidations may have been missed meanwhile).
        srv.port = port
        srv.start()
        srv.client().execute_command("TIERCACHE.SET", "t:v1:k", b"\xa3new", "TAGS", 1, "ns:t:v1")
        wait_for(lambda: not c._core.circuit_open(), what="the cooldown")
        resets = c.stats()["l1_resets"]
        assert c.get_or_load("k", boom) == "new"
        assert c._core.tracking
        assert c.stats()["l1_resets"] == resets + 1
        assert c.stats()["degraded"] == 0
    finally:
        c.close()


def test_starts_degraded_when_redis_is_down(protocol):
    import socket

    import redis as redis_py

    from tiercache import TierCache

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = TierCache(redis_py.Redis(host="127.0.0.1", port=port, protocol=protocol), registry=None, op_timeout=0.1, breaker_cooldown=60)
    try:
        assert c.get_or_load("k", lambda: 1) == 1
        assert c.get("k") == 1  # kept in L1 while degraded
        assert c.stats()["degraded_loads"] == 1
    finally:
        c.close()


def _child_reads(cache, q):
    core = cache._core
    before = (core.tracking, "k" in core._l1)
    value = cache.get("k")
    q.put((before[0], before[1], value, core.tracking, cache.stats()["l1_resets"], cache._sess is not None))


def test_a_forked_child_reconnects_and_drops_the_inherited_l1(make_cache, r):
    """gunicorn --preload, multiprocessing: the child has no listener thread and the parent's sockets.
    It must not trust the L1 it inherited: the first call reconnects, which drops it."""
    import multiprocessing as mp

    a = make_cache()
    a.set("k", "old")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_reads, args=(a, q))
    p.start()
    got = q.get(timeout=30)
    p.join(10)
    assert got == (False, True, "old", True, 1, True)
    assert a.get("k") == "old" and a._core.tracking  # the parent is untouched


def test_a_silent_server_is_noticed_by_ping(start_server, protocol):
    """The server stops answering without closing the connection (CLIENT PAUSE stands in for a network
    partition): after unanswered PINGs the listener gives up, so L1 stops being trusted."""
    import asyncio

    import redis as redis_py
    import redis.asyncio

    from tiercache import AsyncTierCache, TierCache

    srv = start_server()
    c = TierCache(redis_py.Redis(host="127.0.0.1", port=srv.port, protocol=protocol), registry=None, ping_interval=0.05)

    async def main():
        a = AsyncTierCache(redis.asyncio.Redis(host="127.0.0.1", port=srv.port, protocol=protocol), registry=None, ping_interval=0.05)
        assert await a.connect()
        srv.client().execute_command("CLIENT", "PAUSE", 20000, "ALL")  # the server is stopped after the test
        deadline = time.monotonic() + 15
        while (c._core.tracking or a._core.tracking) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        result = (c._core.tracking, a._core.tracking)
        await a.aclose()
        return result

    try:
        assert asyncio.run(main()) == (False, False)
    finally:
        c.close()


def test_get_l1_reads_l1_alone(start_server, protocol):
    """``get_l1``: a key only in Redis is a miss and is not fetched; a loaded key is a hit (the L1 object,
    counted); another client's tag invalidation makes it a miss; with Redis gone it answers the default
    although L1 holds the key, which ``get`` still serves."""
    import redis as redis_py

    from tiercache import TierCache

    srv = start_server()

    def cache(**kw):
        return TierCache(redis_py.Redis(host="127.0.0.1", port=srv.port, protocol=protocol), namespace="t",
                         registry=None, op_timeout=0.2, **kw)

    a, b = cache(), cache()
    try:
        b.set("only-redis", {"id": 9})
        s0 = a.stats()
        assert a.get_l1("only-redis") is None
        assert a.get_l1("only-redis", "dflt") == "dflt"
        s1 = a.stats()
        assert (s1["l1_misses"] - s0["l1_misses"], s1["l2_hits"] - s0["l2_hits"]) == (2, 0)
        assert a.get_or_load("p", lambda: {"id": 1}, tags=["grp"]) == {"id": 1}
        hit = a.get_l1("p")
        assert hit == {"id": 1} and a.get_l1("p") is hit
        assert a.stats()["l1_hits"] - s1["l1_hits"] == 2
        b.invalidate_tags("grp")
        wait_for(lambda: a.get_l1("p") is None, what="a's L1 to drop the entry b invalidated")
        assert a.get_or_load("q", lambda: "q-v") == "q-v"
        assert a.get_l1("q") == "q-v"
        srv.stop()
        wait_for(lambda: not a._core.tracking, what="the listener to notice")
        assert a.get_l1("q", "dflt") == "dflt"
        assert a.get("q") == "q-v"
    finally:
        a.close()
        b.close()
