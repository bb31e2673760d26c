"""Benchmarks of the Python client (figures in BENCHMARKS.md, section "Python client").

    cargo build --release                       # or a debug build: --module target/debug/libtiercache.so
    .venv/bin/pip install ./python
    .venv/bin/python python/bench/bench.py [--quick] [--module PATH]

It starts its own redis-server with the module on a free loopback port and prints Markdown tables:

1. L1 hit cost: ``cache.get`` and ``cache.get_or_load`` of a hot key, and a call of a ``@cache.cached``
   function, against a plain ``dict`` lookup and a ``functools.lru_cache`` call (best of R rounds of N
   calls each; ratios are what hold across machines).
2. L2 hit (L1 off) against a plain redis-py GET of a string of the same size, same server, alternating
   rounds.
3. A stampede: 4 processes x 50 threads miss one key at once, the loader takes 100 ms; database loads
   per burst, over several bursts.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import redis

from tiercache import TierCache

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(module: Path) -> Tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    d = tempfile.mkdtemp(prefix="tiercache-pybench-")
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", d, "--loadmodule", str(module)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            if redis.Redis(host="127.0.0.1", port=port).ping():
                return proc, port, d
        except redis.RedisError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def best_ns(fn: Callable[[], Any], n: int, rounds: int) -> float:
    """Best per-call time over `rounds` rounds of `n` calls (a loop of plain calls)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n)
    return best


def bench_l1(port: int, n: int, rounds: int) -> List[Tuple[str, float]]:
    cache = TierCache(redis.Redis(host="127.0.0.1", port=port), namespace="bench", registry=None, l1_ttl=3600)
    value = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "active": True}
    cache.set("user:42", value, ttl=3600)
    d = {"user:42": value}

    @functools.lru_cache(maxsize=1024)
    def lru(user_id: int) -> Dict[str, Any]:
        return value

    @cache.cached(ttl=3600, key="u:{user_id}")
    def cached(user_id: int) -> Dict[str, Any]:
        return value

    cached(42)
    lru(42)
    loader = lambda: value  # noqa: E731
    # Interleave the rows round by round so that drift of the machine hits them all alike.
    rows: Dict[str, float] = {}
    fns = {
        "dict.get": lambda: d.get("user:42"),
        "functools.lru_cache call": lambda: lru(42),
        "TierCache.get (L1 hit)": lambda: cache.get("user:42"),
        "TierCache.get_or_load (L1 hit)": lambda: cache.get_or_load("user:42", loader),
        "@cache.cached call (L1 hit)": lambda: cached(42),
    }
    for _ in range(rounds):
        for name, fn in fns.items():
            rows[name] = min(rows.get(name, float("inf")), best_ns(fn, n, 1))
    s = cache.stats()
    assert s["l2_hits"] + s["l2_misses"] <= 2, s
    cache.close()
    return list(rows.items())


def bench_l2(port: int, n: int, rounds: int) -> List[Tuple[str, List[float]]]:
    r = redis.Redis(host="127.0.0.1", port=port)
    cache = TierCache(redis.Redis(host="127.0.0.1", port=port), namespace="bench", registry=None, l1_max_bytes=0)
    value = {"id": 42, "name": "Ada Lovelace", "email": "ada@example.com", "active": True}
    cache.set("l2", value, ttl=3600)
    raw = r.execute_command("TIERCACHE.GET", "bench:v1:l2")
    r.set("plain", raw)
    loader = lambda: value  # noqa: E731
    fns = {
        "redis-py GET (plain string, same bytes)": lambda: r.get("plain"),
        "redis-py GET + msgpack decode": lambda: __import__("msgpack").unpackb(r.get("plain")),
        "TierCache.get (L1 off: TIERCACHE.GET ENCODED + decode)": lambda: cache.get("l2"),
        "TierCache.get_or_load (L1 off: lease read HIT + decode)": lambda: cache.get_or_load("l2", loader),
    }
    per: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per[name].append(best_ns(fn, n, 1))
    assert cache.stats()["loads"] == 0
    cache.close()
    return list(per.items())


def _stampede_proc(port: int, key: str, threads: int, barrier: Any, out: Any) -> None:
    cache = TierCache(redis.Redis(host="127.0.0.1", port=port), namespace="bench", registry=None, wait_timeout=10)
    counter = redis.Redis(host="127.0.0.1", port=port)

    def load() -> Dict[str, Any]:
        counter.incr("bench:loads:" + key)
        time.sleep(0.1)
        return {"report": list(range(100))}

    results: List[Any] = []
    go = threading.Event()

    def run() -> None:
        go.wait()
        results.append(cache.get_or_load(key, load, ttl=60))

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    go.set()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    s = cache.stats()
    out.put((len(results), s["loads"], s["coalesced_local"], s["l2_hits"], elapsed))
    cache.close()


def bench_stampede(port: int, bursts: int, procs: int = 4, threads: int = 50) -> List[Dict[str, Any]]:
    ctx = mp.get_context("spawn")
    r = redis.Redis(host="127.0.0.1", port=port)
    rows = []
    for b in range(bursts):
        key = f"stampede:{b}"
        st0 = dict(zip(*[iter(r.execute_command("TIERCACHE.STATS"))] * 2))
        barrier, out = ctx.Barrier(procs), ctx.Queue()
        ps = [ctx.Process(target=_stampede_proc, args=(port, key, threads, barrier, out)) for _ in range(procs)]
        for p in ps:
            p.start()
        res = [out.get(timeout=120) for _ in ps]
        for p in ps:
            p.join()
        st1 = dict(zip(*[iter(r.execute_command("TIERCACHE.STATS"))] * 2))
        rows.append({
            "callers": sum(x[0] for x in res),
            "db_loads": int(r.get("bench:loads:" + key) or 0),
            "coalesced_local": sum(x[2] for x in res),
            "l2_hits": sum(x[3] for x in res),
            "parked": st1[b"waiters_parked"] - st0[b"waiters_parked"],
            "slowest_s": max(x[4] for x in res),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--module", type=Path, default=None)
    a = ap.parse_args()
    module = a.module or next((p for p in (REPO / "target/release/libtiercache.so", REPO / "target/debug/libtiercache.so")
                               if p.is_file()), None)
    if module is None:
        raise SystemExit("no module: cargo build --release")
    n, rounds, l2n, bursts = (20_000, 5, 500, 2) if a.quick else (200_000, 7, 3000, 5)
    proc, port, d = start_server(module)
    try:
        print(f"module: {module}; Python {sys.version.split()[0]}; redis-py {redis.__version__}; "
              f"{os.cpu_count()} CPUs\n")
        l1 = bench_l1(port, n, rounds)
        base = dict(l1)
        print(f"### L1 hit (best of {rounds} x {n:,} calls)\n")
        print("| call | ns per call | vs dict.get | vs lru_cache call |\n|---|---|---|---|")
        for name, ns in l1:
            print(f"| {name} | {ns:.0f} | {ns / base['dict.get']:.1f}x | "
                  f"{ns / base['functools.lru_cache call']:.2f}x |")
        l2 = bench_l2(port, l2n, rounds)
        print(f"\n### L2 hit (median of {rounds} rounds x {l2n:,} calls, best-of-round per call)\n")
        ref = statistics.median(l2[0][1])
        print("| call | µs per call (median) | min–max | vs plain GET |\n|---|---|---|---|")
        for name, xs in l2:
            med = statistics.median(xs)
            print(f"| {name} | {med / 1000:.1f} | {min(xs) / 1000:.1f}–{max(xs) / 1000:.1f} | {med / ref:.2f}x |")
        st = bench_stampede(port, bursts)
        print("\n### Stampede: 4 processes x 50 threads, one missing key, 100 ms load\n")
        print("| burst | callers | database loads | waited in-process | parked in Redis | slowest caller (s) |")
        print("|---|---|---|---|---|---|")
        for i, row in enumerate(st, 1):
            print(f"| {i} | {row['callers']} | **{row['db_loads']}** | {row['coalesced_local']} | {row['parked']} | "
                  f"{row['slowest_s']:.2f} |")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
