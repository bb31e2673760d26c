"""AsyncTierCache: the same read path, coherence and entries over redis.asyncio."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgpack
import pytest
import redis.asyncio

from tiercache import AsyncTierCache, FencedError, LeaseTimeout, TierCache


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def acache(server, protocol, **kw) -> AsyncTierCache:
    kw.setdefault("namespace", "t")
    kw.setdefault("registry", None)
    return AsyncTierCache(redis.asyncio.Redis(host="127.0.0.1", port=server.port, protocol=protocol), **kw)


async def until(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def test_get_or_load_set_get_delete(server, r, protocol):
    async def main():
        async with acache(server, protocol) as c:
            calls = []

            async def load():
                calls.append(1)
                return {"id": 1}

            assert await c.get_or_load("k", load, ttl=60, tags=["user:1"]) == {"id": 1}
            assert await c.get_or_load("k", load) == {"id": 1}
            assert calls == [1]
            assert c.stats()["l1_hits"] == 1
            await c.set("j", [1, 2], ttl="1m")
            assert await c.get("j") == [1, 2]
            assert await c.delete("j") == 1
            assert await c.get("j") is None
            assert r.execute_command("TIERCACHE.GET", "t:v1:k") == msgpack.packb({"id": 1})
            assert await c.invalidate_tags("user:1") == 1
            assert await c.get("k") is None

    run(main())


def test_async_and_sync_share_entries_and_coherence(server, r, protocol):
    sync = TierCache(server.client(protocol=protocol), namespace="t", registry=None)

    async def main():
        async with acache(server, protocol) as c:
            await c.set("k", {"v": 1}, tags=["t1"])
            assert sync.get("k") == {"v": 1}
            sync.set("k", {"v": 2}, tags=["t1"])
            await until(lambda: "k" not in c._core._l1, what="the key push")
            assert await c.get("k") == {"v": 2}
            await c.get_or_load("k", lambda: None, tags=["t1"])  # L1 entries carry the caller's tags
            sync.invalidate_tags(["t1"])
            await until(lambda: c._core._tags[b"t1"].v > 0, what="the message")
            assert await c.get("k") is None

    try:
        run(main())
    finally:
        sync.close()


def test_async_single_flight_and_parked_readers(server, r, protocol):
    async def main():
        a = acache(server, protocol, wait_timeout=10)
        b = acache(server, protocol, wait_timeout=10)
        await a.connect()
        await b.connect()
        calls = []
        release = asyncio.Event()

        async def load():
            calls.append(1)
            await release.wait()
            return "v"

        ta = [asyncio.ensure_future(a.get_or_load("k", load)) for _ in range(10)]
        tb = [asyncio.ensure_future(b.get_or_load("k", load)) for _ in range(10)]
        await until(lambda: a._flights.get("t:v1:k", [0, 0])[1] == 10 and b._flights.get("t:v1:k", [0, 0])[1] == 10,
                    what="everyone queued")
        await until(lambda: int(dict(zip(*[iter(r.execute_command("TIERCACHE.STATS"))] * 2))[b"lease_waiters"]) == 1,
                    what="b parked in Redis")
        release.set()
        out = await asyncio.gather(*ta, *tb)
        assert out == ["v"] * 20
        assert calls == [1]
        assert a.stats()["coalesced_local"] == 9 and b.stats()["coalesced_local"] == 9
        await a.aclose()
        await b.aclose()

    run(main())


def test_async_fence_and_fill_race(server, r, protocol):
    async def main():
        a = acache(server, protocol)
        b = acache(server, protocol)
        started, proceed = asyncio.Event(), asyncio.Event()

        async def slow():
            started.set()
            await proceed.wait()
            return "old"

        t = asyncio.ensure_future(a.get_or_load("k", slow, tags=["user:1"]))
        await started.wait()
        await b.invalidate_tags(["user:1"])
        await until(lambda: b"user:1" in a._core._tags and a._core._tags[b"user:1"].v > 0, what="the message")
        proceed.set()
        assert await t == "old"
        assert a.stats()["fenced"] == 1
        assert "k" not in a._core._l1
        lease = await a.lease("j")
        await b.set("j", 1)
        with pytest.raises(FencedError, match="^FENCED the key was written or deleted after the lease was granted$"):
            await lease.fill(0)
        lease = await a.lease("m")
        with pytest.raises(LeaseTimeout):
            await b.lease("m", wait=False)
        await lease.release()
        await a.aclose()
        await b.aclose()

    run(main())


def test_async_stale_while_revalidate_and_fail_safe_when_down(start_server, protocol):
    srv = start_server()

    async def main():
        c = acache(srv, protocol, l1_ttl=0.05, op_timeout=0.2)
        rr = srv.client()
        rr.execute_command("TIERCACHE.SET", "t:v1:s", msgpack.packb("old"), "PX", 1, "STALE", 60, "TAGS", 1, "ns:t:v1")
        await until(lambda: rr.execute_command("TIERCACHE.GET", "t:v1:s") is None, what="stale")
        assert await c.get_or_load("s", lambda: "new") == "old"
        await until(lambda: rr.execute_command("TIERCACHE.GET", "t:v1:s") == msgpack.packb("new"), what="the refresh")
        assert await c.get_or_load("k", lambda: "v1", ttl=60) == "v1"
        entry = c._core._l1["k"]
        srv.stop()
        await until(lambda: time.monotonic() > entry.until, what="the L1 deadline")

        def boom():
            raise RuntimeError("db down")

        assert await c.get_or_load("k", boom) == "v1"
        assert await c.get_or_load("other", lambda: "from db") == "from db"
        assert c.stats()["fail_safe"] == 1 and c.stats()["degraded_loads"] >= 1
        await c.aclose()

    run(main())


def test_async_decorator(server, r, protocol):
    async def main():
        c = acache(server, protocol)
        calls = []

        @c.cached(ttl="30m", key="user:{user_id}:profile", tags=["user:{user_id}"])
        async def profile(user_id: int) -> dict:
            calls.append(user_id)
            return {"id": user_id}

        assert await profile(7) == {"id": 7}
        assert await profile(user_id=7) == {"id": 7}
        assert calls == [7]
        assert profile.cache_key(user_id=7) == "user:7:profile"
        assert await profile.invalidate(user_id=7) == 1
        await profile(7)
        assert calls == [7, 7]
        with pytest.raises(TypeError, match="not a coroutine function"):
            c.cached()(lambda: 1)
        await c.aclose()

    run(main())


def test_async_get_l1_without_awaiting(server, r, protocol):
    async def main():
        async with acache(server, protocol) as a, acache(server, protocol) as b:
            await b.set("only-redis", 9)
            assert a.get_l1("only-redis") is None, "only in Redis: a miss, never fetched"
            assert await a.get_or_load("k", lambda: {"id": 1}, tags=["grp"]) == {"id": 1}
            s0 = a.stats()
            assert a.get_l1("k") == {"id": 1}
            assert a.stats()["l1_hits"] - s0["l1_hits"] == 1
            await b.invalidate_tags("grp")
            await until(lambda: a.get_l1("k") is None, what="a's L1 to drop the entry b invalidated")

    run(main())
