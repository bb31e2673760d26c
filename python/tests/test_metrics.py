"""Metric names are the Rust client's (client/src/metrics.rs), exported through prometheus_client."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from tiercache._metrics import COUNTERS, GAUGES

REPO = Path(__file__).resolve().parents[2]


def rust_names():
    src = (REPO / "client" / "src" / "metrics.rs").read_text()
    block = src[src.index("counters! {"):]
    counters = re.findall(r"^\s+(\w+): \"", block, re.M)
    gauges = re.findall(r'\("(\w+)", "', src)
    return counters, gauges


def test_same_names_as_the_rust_client():
    counters, gauges = rust_names()
    assert [n for n, _ in COUNTERS] == counters
    assert [n for n, _ in GAUGES] == gauges


def test_prometheus_export_and_stats(make_cache, r):
    reg = CollectorRegistry()
    a = make_cache(registry=reg)
    b = make_cache(registry=reg, metric_labels={"cache": "b"})
    a.get_or_load("k", lambda: 1)
    a.get_or_load("k", lambda: 1)
    b.get_or_load("k", lambda: 1)
    text = generate_latest(reg).decode()
    assert 'tiercache_client_l1_hits_total{cache=""} 1.0' in text
    assert 'tiercache_client_l2_hits_total{cache="b"} 1.0' in text
    assert 'tiercache_client_loads_total{cache=""} 1.0' in text
    assert "# TYPE tiercache_client_l1_entries gauge" in text
    assert 'tiercache_client_degraded{cache=""} 0.0' in text
    counters, gauges = rust_names()
    for n in counters:
        assert f"tiercache_client_{n}_total" in text
    for n in gauges:
        assert f"tiercache_client_{n}" in text
    s = a.stats()
    assert set(s) == set(counters) | set(gauges)
    # The loader-duration histogram (the Rust client exports it under the same name and buckets).
    assert 'tiercache_client_load_duration_seconds_count{cache=""} 1.0' in text
    assert 'tiercache_client_load_duration_seconds_bucket{cache="b",le="+Inf"} 0.0' in text


def test_without_labels(make_cache):
    reg = CollectorRegistry()
    a = make_cache(registry=reg)
    a.set("k", 1)
    a.get("k")
    assert "tiercache_client_l1_hits_total 1.0" in generate_latest(reg).decode()


def test_a_refused_fill_is_counted_logged_and_released(make_cache, r, caplog):
    """A fill Redis refuses for a reason other than fencing (here: too many tags) returns the value to the
    caller, caches nothing, counts fill_errors, logs a warning and gives the lease back with PASS."""
    c = make_cache()
    old = r.config_get("tiercache.max-tags")["tiercache.max-tags"]
    r.config_set("tiercache.max-tags", 1)
    try:
        with caplog.at_level("WARNING", logger="tiercache"):
            assert c.get_or_load("refused", lambda: "v", tags=["t1", "t2"]) == "v"
    finally:
        r.config_set("tiercache.max-tags", old)
    assert c.stats()["fill_errors"] == 1
    assert any("too many tags" in rec.getMessage() for rec in caplog.records), caplog.records
    st = dict(zip(*[iter(r.execute_command("TIERCACHE.STATS"))] * 2)) if r.get_connection_kwargs().get("protocol") in (None, 2) else r.execute_command("TIERCACHE.STATS")
    passes = st.get(b"passes", st.get("passes"))
    leases = st.get(b"leases", st.get("leases"))
    assert leases == 0 and passes >= 1, st
