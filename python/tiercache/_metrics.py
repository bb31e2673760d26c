"""Counters and gauges with the names of the Rust client (client/src/metrics.rs), exported to
prometheus_client by one collector per registry that sums every live cache of the process (grouped by
the caches' optional ``metric_labels``)."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from ._core import Core

COUNTERS: Tuple[Tuple[str, str], ...] = (
    ("l1_hits", "Reads answered from the in-process cache."),
    ("l1_misses", "Reads the in-process cache could not answer."),
    ("l2_hits", "Reads answered fresh by Redis."),
    ("l2_stale", "Reads answered with a stale value by Redis (one caller refreshes)."),
    ("l2_misses", "Reads Redis could not answer (this caller loads or waits)."),
    ("loads", "Loader calls."),
    ("load_errors", "Loader calls that failed."),
    ("coalesced_local", "Reads that waited for another task of this process loading the same key."),
    ("coalesced_server", "Reads parked in Redis and answered by another client's fill."),
    ("fenced", "Fills refused by Redis because the key or a tag changed while loading."),
    ("fail_safe", "Stale values served because the loader failed."),
    ("redis_errors", "Redis calls that failed or timed out."),
    ("degraded_loads", "Loads done without Redis while it was unreachable."),
    ("invalidations_received", "Invalidation pushes and messages applied to the in-process cache."),
    ("l1_resets", "Times the in-process cache was dropped whole (gap, reset, reconnect)."),
)
GAUGES: Tuple[Tuple[str, str], ...] = (
    ("l1_entries", "Entries in the in-process cache."),
    ("l1_bytes", "Bytes of keys and encoded values in the in-process cache."),
    ("degraded", "1 while Redis is bypassed after repeated failures."),
)
PREFIX = "tiercache_client_"


class Metrics:
    """Plain integer counters (an L1 hit must stay cheap: no lock, no prometheus_client call). Under
    heavy thread contention an increment may rarely be lost (``+=`` is not atomic); they are metrics."""

    __slots__ = tuple(name for name, _ in COUNTERS)

    def __init__(self) -> None:
        self.l1_hits = 0
        self.l1_misses = 0
        self.l2_hits = 0
        self.l2_stale = 0
        self.l2_misses = 0
        self.loads = 0
        self.load_errors = 0
        self.coalesced_local = 0
        self.coalesced_server = 0
        self.fenced = 0
        self.fail_safe = 0
        self.redis_errors = 0
        self.degraded_loads = 0
        self.invalidations_received = 0
        self.l1_resets = 0

    def snapshot(self) -> Dict[str, int]:
        return {name: int(getattr(self, name)) for name, _ in COUNTERS}


class _Collector(Collector):
    def __init__(self) -> None:
        self._caches: "weakref.WeakSet[Core]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, core: "Core") -> None:
        with self._lock:
            self._caches.add(core)

    def describe(self) -> List[CounterMetricFamily]:
        return [CounterMetricFamily(PREFIX + name, help) for name, help in COUNTERS]

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self._lock:
            caches = list(self._caches)
        groups: Dict[Tuple[Tuple[str, str], ...], Dict[str, int]] = {}
        for c in caches:
            labels = tuple(sorted(c.metric_labels.items()))
            total = groups.setdefault(labels, {})
            for k, v in c.stats().items():
                if k == "degraded":
                    total[k] = max(total.get(k, 0), v)
                else:
                    total[k] = total.get(k, 0) + v
        label_names = sorted({k for labels in groups for k, _ in labels})
        for name, help in COUNTERS:
            fam = CounterMetricFamily(PREFIX + name, help, labels=label_names)
            for labels, total in groups.items():
                d = dict(labels)
                fam.add_metric([d.get(n, "") for n in label_names], total.get(name, 0))
            yield fam
        for name, help in GAUGES:
            gfam = GaugeMetricFamily(PREFIX + name, help, labels=label_names)
            for labels, total in groups.items():
                d = dict(labels)
                gfam.add_metric([d.get(n, "") for n in label_names], total.get(name, 0))
            yield gfam


_collectors: "weakref.WeakKeyDictionary[CollectorRegistry, _Collector]" = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def register(core: "Core", registry: CollectorRegistry) -> None:
    with _collectors_lock:
        col = _collectors.get(registry)
        if col is None:
            col = _Collector()
            registry.register(col)
            _collectors[registry] = col
    col.add(core)
