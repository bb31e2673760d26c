"""The read path's fill leases: single-flight in a process and across processes, parked readers,
fencing, PASS, BUSY, stale-while-revalidate and early refresh, and the low-level Lease API."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import msgpack
import pytest
import redis

from conftest import wait_for
from tiercache import FencedError, LeaseTimeout, TierCache, WrongTypeError


def stats(r):
    s = r.execute_command("TIERCACHE.STATS")
    return dict(zip([k.decode() for k in s[::2]], s[1::2]))


def test_local_single_flight(make_cache, r):
    c = make_cache()
    n = 12
    calls = []

    def load():
        calls.append(1)
        # Hold the load until every other thread has queued behind it (bounded).
        wait_for(lambda: c._flights["t:v1:k"][1] == n, timeout=10, what="the other threads")
        return "v"

    out = []
    threads = [threading.Thread(target=lambda: out.append(c.get_or_load("k", load))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert out == ["v"] * n
    assert len(calls) == 1
    assert c.stats()["coalesced_local"] == n - 1
    assert c._flights == {}


def _stampede_worker(port, protocol, threads, barrier, results):
    cache = TierCache(redis.Redis(host="127.0.0.1", port=port, protocol=protocol), namespace="st", registry=None, wait_timeout=10)
    counter = redis.Redis(host="127.0.0.1", port=port)

    def load():
        counter.incr("st:loads")
        time.sleep(0.2)  # the database query; the others park in Redis meanwhile
        return {"answer": 42}

    got = []
    barrier.wait()
    ts = [threading.Thread(target=lambda: got.append(cache.get_or_load("hot", load, ttl=60))) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    results.put((got.count({"answer": 42}), cache.stats()["loads"]))
    cache.close()


def test_stampede_across_processes_loads_once(server, r, protocol):
    procs, threads = 4, 10
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_stampede_worker, args=(server.port, protocol, threads, barrier, results)) for _ in range(procs)]
    for p in ps:
        p.start()
    outs = [results.get(timeout=60) for _ in ps]
    for p in ps:
        p.join(30)
    assert sum(o[0] for o in outs) == procs * threads
    assert int(r.get("st:loads")) == 1
    assert sum(o[1] for o in outs) == 1


def test_parked_reader_gets_the_fill(make_cache, r):
    a = make_cache(wait_timeout=10)
    b = make_cache(wait_timeout=10)
    started, proceed = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert proceed.wait(10)
        return "filled"

    woken = stats(r)["waiters_woken"]
    out = []
    t = threading.Thread(target=lambda: out.append(a.get_or_load("k", slow)))
    t.start()
    assert started.wait(10)
    tb = threading.Thread(target=lambda: out.append(b.get_or_load("k", lambda: pytest.fail("b must not load"))))
    tb.start()
    wait_for(lambda: stats(r)["lease_waiters"] == 1, what="b parked")
    proceed.set()
    t.join(10)
    tb.join(10)
    assert out == ["filled", "filled"]
    assert b.stats()["l2_hits"] == 1
    assert stats(r)["waiters_woken"] == woken + 1


def test_delete_during_a_load_fences_the_fill(make_cache, r):
    a = make_cache()
    b = make_cache()
    started, proceed = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert proceed.wait(10)
        return "old row"

    out = []
    t = threading.Thread(target=lambda: out.append(a.get_or_load("k", slow)))
    t.start()
    assert started.wait(10)
    b.delete("k")
    proceed.set()
    t.join(10)
    assert out == ["old row"]
    assert a.stats()["fenced"] == 1
    assert r.exists("t:v1:k") == 0
    assert "k" not in a._core._l1


def test_pass_makes_parked_readers_load_without_caching(make_cache, r):
    a = make_cache(wait_timeout=10)
    with a.lease("k") as lease:
        assert lease.status == "FILL" and lease.held
        out = []
        t = threading.Thread(target=lambda: out.append(a.get_or_load("k", lambda: "mine")))
        t.start()
        wait_for(lambda: stats(r)["lease_waiters"] == 1, what="the reader parked")
        assert lease.release(pass_=True) is True
        t.join(10)
    assert out == ["mine"]
    assert r.exists("t:v1:k") == 0
    assert "k" not in a._core._l1


def test_busy_at_the_wait_deadline_loads_or_raises(make_cache, r):
    holder = make_cache()
    with holder.lease("k") as lease:
        assert lease.held
        loads = make_cache(wait_timeout=0.05)
        assert loads.get_or_load("k", lambda: "direct") == "direct"
        assert r.exists("t:v1:k") == 0
        raises = make_cache(wait_timeout=0.05, on_busy="raise")
        with pytest.raises(LeaseTimeout):
            raises.get_or_load("k2" if False else "k", lambda: "never")
        with pytest.raises(LeaseTimeout) as e:
            holder.lease("k", wait=False)
        assert "BUSY" in str(e.value)


def test_fenced_error_keeps_the_servers_text(make_cache, r):
    a = make_cache()
    b = make_cache()
    lease = a.lease("k")
    assert lease.status == "FILL"
    b.set("k", "newer")
    with pytest.raises(FencedError) as e:
        lease.fill("older")
    assert str(e.value) == "FENCED the key was written or deleted after the lease was granted"
    assert a.get("k") == "newer"
    lease = a.lease("j")
    b.invalidate_tags("t1")
    with pytest.raises(FencedError, match="^FENCED a tag of this entry was invalidated after the lease was granted$"):
        lease.fill("v", tags=["t1"])


def test_lease_fill_and_hit(make_cache, r):
    a = make_cache()
    with a.lease("k") as lease:
        lease.fill({"x": 1}, ttl=60, tags=["t"])
    with a.lease("k") as lease:
        assert lease.status == "HIT" and lease.value == {"x": 1} and not lease.held
        assert 0 < lease.ttl_ms <= 60_000


def test_wrongtype_error_text(make_cache, r):
    a = make_cache()
    r.set("t:v1:plain", "x")
    with pytest.raises(WrongTypeError, match="^WRONGTYPE Operation against a key holding the wrong kind of value$"):
        a.set("plain", 1)


def test_stale_while_revalidate(make_cache, r):
    a = make_cache(l1_ttl=60)
    r.execute_command("TIERCACHE.SET", "t:v1:k", msgpack.packb("old"), "PX", 1, "STALE", 60, "TAGS", 1, "ns:t:v1")
    wait_for(lambda: r.execute_command("TIERCACHE.GET", "t:v1:k") is None, what="the entry to go stale")
    refreshed = threading.Event()

    def load():
        refreshed.set()
        return "new"

    assert a.get_or_load("k", load, ttl=60, stale=60) == "old"  # served stale at once
    assert a.stats()["l2_stale"] == 1
    assert refreshed.wait(10)
    wait_for(lambda: r.execute_command("TIERCACHE.GET", "t:v1:k") == msgpack.packb("new"), what="the refresh")
    assert "k" not in a._core._l1 or a.get("k") == "new"
    assert a.get_or_load("k", load) == "new"


def test_failed_background_refresh_releases_the_lease(make_cache, r):
    a = make_cache()
    r.execute_command("TIERCACHE.SET", "t:v1:k", msgpack.packb("old"), "PX", 1, "STALE", 60, "TAGS", 1, "ns:t:v1")
    wait_for(lambda: r.execute_command("TIERCACHE.GET", "t:v1:k") is None, what="stale")

    def boom():
        raise RuntimeError("db down")

    assert a.get_or_load("k", boom) == "old"
    wait_for(lambda: a.stats()["load_errors"] == 1 and stats(r)["leases"] == 0, what="the release")
    assert a.stats()["fail_safe"] >= 1


def test_early_refresh_with_beta(make_cache, r):
    a = make_cache(beta=1e6, l1_ttl=0.001)
    early = stats(r)["early_refreshes"]
    loads = []

    def load():
        loads.append(1)
        time.sleep(0.02)  # a fill duration the server records (XFetch needs delta >= 1 ms)
        return len(loads)

    assert a.get_or_load("k", load, ttl=30) == 1
    # A huge beta elects the next lease read: HIT with a token, refresh in the background.
    wait_for(lambda: "k" not in a._core._l1 or a._core._l1["k"].until <= time.monotonic(), what="L1 expiry")
    assert a.get_or_load("k", load, ttl=30) == 1
    wait_for(lambda: len(loads) == 2, what="the background refresh")
    assert stats(r)["early_refreshes"] >= early + 1
    wait_for(lambda: r.execute_command("TIERCACHE.GET", "t:v1:k") == msgpack.packb(2), what="the refreshed value")


def test_lease_connection_is_kept_until_the_fill(make_cache, r):
    a = make_cache()
    started, proceed = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert proceed.wait(10)
        return "v"

    t = threading.Thread(target=lambda: a.get_or_load("k", slow))
    t.start()
    assert started.wait(10)
    assert stats(r)["leases"] == 1
    # The holder's connection is out of the pool: nobody else can use (or close) it meanwhile.
    assert len(a._lease_pool) == 0
    proceed.set()
    t.join(10)
    assert stats(r)["leases"] == 0
    assert len(a._lease_pool) == 1


def test_more_concurrent_fills_than_pooled_connections(make_cache, r):
    """Every lease stays with its connection until its fill, however many are in flight: 24 concurrent
    misses of distinct keys (the idle pool keeps 16 connections) all fill, none is fenced."""
    c = make_cache()
    n = 24
    gate = threading.Barrier(n, timeout=20)

    def load(i):
        gate.wait()  # every loader holds its lease at the same time
        return i

    out = []
    ts = [threading.Thread(target=lambda i=i: out.append(c.get_or_load(f"k{i}", lambda: load(i)))) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert sorted(out) == list(range(n))
    assert c.stats()["fenced"] == 0
    assert sum(r.exists(f"t:v1:k{i}") for i in range(n)) == n
    assert len(c._lease_pool) == 16
