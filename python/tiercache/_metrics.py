"""Counters and gauges with the names of the Rust client (client/src/metrics.rs), exported to
prometheus_client by one collector per registry that sums every live cache of the process (grouped by
the caches' optional ``metric_labels``)."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Dict, Iterator, List, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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
    ("fenced", "Fills refused by Redis because the key or a tag changed while loading."),
    ("fill_errors", "Fills refused by Redis for another reason than fencing (OOM, too many tags...): the value is returned, not cached."),
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
# The same histogram as the Rust client's tiercache_client_load_duration_seconds (same buckets): how long loader
# calls took, failed ones included.
LOAD_HISTOGRAM = ("load_duration_seconds", "Loader call durations, failed calls included.")
BUCKETS: Tuple[float, ...] = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Plain integer counters (an L1 hit must stay cheap: no lock, no prometheus_client call). Under
    heavy thread contention an increment may rarely be lost (``+=`` is not atomic); they are metrics."""

    __slots__ = tuple(name for name, _ in COUNTERS) + ("load_buckets", "load_sum")

    def __init__(self) -> None:
        self.l1_hits = 0
        self.l1_misses = 0
        self.l2_hits = 0
        self.l2_stale = 0
        self.l2_misses = 0
        self.loads = 0
        self.load_errors = 0
        self.coalesced_local = 0
        self.fenced = 0
        self.fill_errors = 0
        self.fail_safe = 0
        self.redis_errors = 0
        self.degraded_loads = 0
        self.invalidations_received = 0
        self.l1_resets = 0
        self.load_buckets = [0] * (len(BUCKETS) + 1)
        self.load_sum = 0.0

    def observe_load(self, seconds: float) -> None:
        i = 0
        while i < len(BUCKETS) and seconds > BUCKETS[i]:
            i += 1
        self.load_buckets[i] += 1
        self.load_sum += seconds

    def snapshot(self) -> Dict[str, int]:
        return {name: int(getattr(self, name)) for name, _ in COUNTERS}


class _Collector(Collector):
    def __init__(self) -> None:
        self._caches: "weakref.WeakSet[Core]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, core: "Core") -> None:
        with self._lock:
            self._caches.add(core)

    def describe(self) -> List[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        out: List[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily] = []
        out += [CounterMetricFamily(PREFIX + name, help) for name, help in COUNTERS]
        out += [GaugeMetricFamily(PREFIX + name, help) for name, help in GAUGES]
        out.append(HistogramMetricFamily(PREFIX + LOAD_HISTOGRAM[0], LOAD_HISTOGRAM[1]))
        return out

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        with self._lock:
            caches = list(self._caches)
        groups: Dict[Tuple[Tuple[str, str], ...], Dict[str, int]] = {}
        hists: Dict[Tuple[Tuple[str, str], ...], Tuple[List[int], List[float]]] = {}
        for c in caches:
            labels = tuple(sorted(c.metric_labels.items()))
            counts, total_sum = hists.setdefault(labels, ([0] * (len(BUCKETS) + 1), [0.0]))
            for i, n in enumerate(c.m.load_buckets):
                counts[i] += n
            total_sum[0] += c.m.load_sum
            total = groups.setdefault(labels, {})
            for k, v in c.stats().items():
                if k == "degraded":
                    total[k] = max(total.get(k, 0), v)
                else:
                    total[k] = total.get(k, 0) + v
        label_names = sorted({k for labels in groups for k, _ in labels})
        families = [(CounterMetricFamily, n, h) for n, h in COUNTERS] + [(GaugeMetricFamily, n, h) for n, h in GAUGES]
        for family, name, help in families:
            fam = family(PREFIX + name, help, labels=label_names)
            for labels, total in groups.items():
                d = dict(labels)
                fam.add_metric([d.get(n, "") for n in label_names], total.get(name, 0))
            yield fam
        hfam = HistogramMetricFamily(PREFIX + LOAD_HISTOGRAM[0], LOAD_HISTOGRAM[1], labels=label_names)
        for labels, (counts, total_sum) in hists.items():
            d = dict(labels)
            cumulative, buckets = 0, []
            for le, n in zip([*(repr(b) for b in BUCKETS), "+Inf"], counts):
                cumulative += n
                buckets.append((le, float(cumulative)))
            hfam.add_metric([d.get(n, "") for n in label_names], buckets, total_sum[0])
        yield hfam


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
