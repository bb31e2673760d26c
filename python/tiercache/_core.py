"""What the sync and asyncio clients share: configuration, key namespacing, L1 with its key buckets and
tag generations, fill tickets, the circuit breaker, the SET command and the invalidation messages.

It mirrors client/src/lib.rs so that both clients share entries and behave alike:

- Redis keys are ``<namespace>:v<schema_version>:<key>``; every entry also carries the namespace tag
  ``ns:<namespace>:v<schema_version>`` (first), then the caller's tags, verbatim.
- L1 holds a decoded value plus its encoded size; an entry lives until the earliest of the server's
  fresh time left (``WITHTTL``), the caller's ttl and ``l1_ttl``, and is dropped as soon as its key, one
  of its tags or the whole cache is invalidated.
- An L1 insert lands only if nothing it depends on was invalidated since the read or load it follows
  began (a *ticket*: coherence state, epoch, key bucket generation, tag generations).
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import msgpack
from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

from . import _codec
from ._durations import Duration, opt_seconds, seconds
from ._metrics import Metrics, register

KEY_BUCKETS = 4096
MAX_TRACKED_TAGS = 100_000
DEFAULT_CHANNEL = "tiercache:invalidations"

Tags = Sequence[Union[str, bytes]]


def _b(s: Union[str, bytes]) -> bytes:
    return s if isinstance(s, bytes) else s.encode()


class _Gen:
    """A tag's generation, bumped when the tag is invalidated; L1 entries remember (gen, value)."""

    __slots__ = ("v",)

    def __init__(self) -> None:
        self.v = 0


class _Entry:
    __slots__ = ("value", "data", "raw", "weight", "until", "tags")

    def __init__(self, value: Any, data: bytes, raw: bool, weight: int, until: float,
                 tags: Tuple[Tuple[_Gen, int], ...]) -> None:
        self.value = value
        self.data = data
        self.raw = raw
        self.weight = weight
        self.until = until
        self.tags = tags


class Ticket:
    """What an L1 insert must still match to land (taken before the read or load it follows)."""

    __slots__ = ("tracking", "epoch", "bucket", "key_gen", "tags")

    def __init__(self, tracking: bool, epoch: int, bucket: int, key_gen: int,
                 tags: Tuple[Tuple[_Gen, int], ...]) -> None:
        self.tracking = tracking
        self.epoch = epoch
        self.bucket = bucket
        self.key_gen = key_gen
        self.tags = tags


class Options:
    """Resolved per-call options."""

    __slots__ = ("ttl", "stale", "tags")

    def __init__(self, ttl: float, stale: float, tags: Tuple[bytes, ...]) -> None:
        self.ttl = ttl
        self.stale = stale
        self.tags = tags


_MISS = object()


class Core:
    """State shared by the sync and async clients. Thread-safe."""

    def __init__(
        self,
        *,
        db: int,
        namespace: str,
        schema_version: int,
        l1_max_bytes: int,
        l1_ttl: Duration,
        default_ttl: Duration,
        stale: Duration,
        lease_timeout: Duration,
        wait_timeout: Duration,
        compress_min_size: int,
        ttl_jitter: float,
        op_timeout: Duration,
        breaker_failures: int,
        breaker_cooldown: Duration,
        invalidation_channel: str,
        beta: Optional[float],
        registry: Optional[CollectorRegistry],
        metric_labels: Optional[Dict[str, str]],
    ) -> None:
        if not namespace:
            raise ValueError("namespace must not be empty")
        self.db = db
        self.namespace = namespace
        self.schema_version = schema_version
        self.prefix = f"{namespace}:v{schema_version}:"
        self.prefix_b = self.prefix.encode()
        self.ns_tag = f"ns:{namespace}:v{schema_version}".encode()
        self.l1_max_bytes = int(l1_max_bytes)
        self.l1_ttl = seconds(l1_ttl)
        self.default_ttl = seconds(default_ttl)
        self.stale = seconds(stale)
        self.lease_ms = max(1, int(seconds(lease_timeout) * 1000))
        self.wait_ms = max(1, int(seconds(wait_timeout) * 1000))
        self.compress_min_size = int(compress_min_size)
        self.ttl_jitter = min(max(float(ttl_jitter), 0.0), 0.5)
        self.op_timeout = seconds(op_timeout)
        self.breaker_failures = max(1, int(breaker_failures))
        self.breaker_cooldown = seconds(breaker_cooldown)
        self.channel = invalidation_channel.encode()
        if beta is not None and not beta > 0:
            raise ValueError("beta must be a positive number (or None to turn early refresh off)")
        self.beta = beta
        self.metric_labels: Dict[str, str] = dict(metric_labels or {})

        self.m = Metrics()
        self._l1: "OrderedDict[str, _Entry]" = OrderedDict()
        self._l1_bytes = 0
        self._lock = threading.Lock()
        self.epoch = 0
        self.key_gens = [0] * KEY_BUCKETS
        self._tags: Dict[bytes, _Gen] = {}
        self.tracking = False
        self._failures = 0
        self._open_until = 0.0
        self._last_msg: Optional[Tuple[str, int]] = None
        if registry is not None:
            register(self, registry)

    # ---- names -----------------------------------------------------------------------------------
    def full(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"cache keys are str, not {type(key).__name__}")
        return self.prefix + key

    def short(self, full: bytes) -> Optional[str]:
        if not full.startswith(self.prefix_b):
            return None
        return full[len(self.prefix_b):].decode("utf-8", "surrogateescape")

    def options(self, ttl: Optional[Duration], stale: Optional[Duration], tags: Optional[Tags]) -> Options:
        t = opt_seconds(ttl)
        s = opt_seconds(stale)
        tag_list: List[bytes] = []
        for tag in tags or ():
            tb = _b(tag)
            if not tb:
                raise ValueError("tags must not be empty strings")
            tag_list.append(tb)
        return Options(self.default_ttl if t is None else t, self.stale if s is None else s, tuple(tag_list))

    # ---- circuit breaker -------------------------------------------------------------------------
    def circuit_open(self) -> bool:
        return self._open_until > 0.0 and time.monotonic() < self._open_until

    def record(self, ok: bool) -> None:
        if ok:
            self._failures = 0
            self._open_until = 0.0
            return
        self.m.redis_errors += 1
        self._failures += 1
        if self._failures >= self.breaker_failures:
            self._open_until = time.monotonic() + self.breaker_cooldown
            self._failures = 0

    # ---- commands --------------------------------------------------------------------------------
    def set_args(self, full: str, data: bytes, o: Options, token: Optional[bytes]) -> List[Any]:
        ttl_ms = max(1, int(o.ttl * 1000))
        if self.ttl_jitter > 0.0:
            ttl_ms = max(1, ttl_ms - int(ttl_ms * self.ttl_jitter * random.random()))
        args: List[Any] = ["TIERCACHE.SET", full]
        frame = _codec.compress_if_worth(data, self.compress_min_size)
        if frame is not None:
            args += [frame, "ENCODING", "lz4"]
        else:
            args += [data, "NOCOMPRESS"]
        args += ["PX", ttl_ms]
        stale_s = int(o.stale)
        if stale_s > 0:
            args += ["STALE", stale_s]
        args += ["TAGS", len(o.tags) + 1, self.ns_tag, *o.tags]
        if token is not None:
            args += ["LEASE", token]
        return args

    def lease_args(self, full: str) -> List[Any]:
        args: List[Any] = ["TIERCACHE.GET", full, "ENCODED", "WITHTTL", "LEASE", self.lease_ms, "WAIT", self.wait_ms]
        if self.beta is not None:
            args += ["BETA", repr(float(self.beta))]
        return args

    # ---- generations and tickets -----------------------------------------------------------------
    def tag_gen(self, tag: bytes) -> _Gen:
        g = self._tags.get(tag)
        if g is not None:
            return g
        with self._lock:
            if len(self._tags) >= MAX_TRACKED_TAGS and tag not in self._tags:
                # Bounded memory with high-cardinality tags: forget every generation, and with them every
                # L1 entry that pointed at one.
                self._tags.clear()
                self._reset_locked()
            return self._tags.setdefault(tag, _Gen())

    def drop_tag(self, tag: bytes) -> None:
        g = self.tag_gen(tag)
        with self._lock:
            g.v += 1

    @staticmethod
    def bucket(full: bytes) -> int:
        return hash(full) % KEY_BUCKETS

    def ticket(self, full: str, o: Options) -> Ticket:
        b = self.bucket(full.encode())
        tags = tuple((g, g.v) for g in (self.tag_gen(t) for t in (self.ns_tag, *o.tags)))
        return Ticket(self.tracking, self.epoch, b, self.key_gens[b], tags)

    def ticket_valid(self, t: Ticket) -> bool:
        return (
            self.tracking == t.tracking
            and self.epoch == t.epoch
            and self.key_gens[t.bucket] == t.key_gen
            and all(g.v == v for g, v in t.tags)
        )

    def drop_key(self, full: bytes) -> None:
        b = self.bucket(full)
        with self._lock:
            self.key_gens[b] += 1
            short = self.short(full)
            if short is not None:
                self._remove_locked(short)

    # ---- L1 --------------------------------------------------------------------------------------
    def l1_get(self, key: str, raw: bool) -> Any:
        """The value, or ``_MISS``. Counts the hit or miss."""
        e = self._l1.get(key)
        if e is not None:
            for g, v in e.tags:
                if g.v != v:
                    # Invalidated through a tag: gone for good (not even for fail-safe).
                    with self._lock:
                        if self._l1.get(key) is e:
                            self._remove_locked(key)
                    self.m.l1_misses += 1
                    return _MISS
            if time.monotonic() < e.until:
                try:
                    self._l1.move_to_end(key)
                except KeyError:
                    pass
                self.m.l1_hits += 1
                if e.raw == raw:
                    return e.value
                return _codec.decode(e.data, raw)
        self.m.l1_misses += 1
        return _MISS

    def l1_only(self, key: str, raw: bool, default: Any) -> Any:
        """``get_l1``: the L1 read alone (counted), ``default`` on a miss and while invalidations are not
        flowing (L1 is not trusted unchecked then; ``get`` tries to reconnect first)."""
        if not self.tracking:
            self.m.l1_misses += 1
            return default
        v = self.l1_get(key, raw)
        return default if v is _MISS else v

    def l1_stale(self, key: str, raw: bool) -> Any:
        """A copy past its L1 deadline but never invalidated (fail-safe), or ``_MISS``."""
        e = self._l1.get(key)
        if e is None or not all(g.v == v for g, v in e.tags):
            return _MISS
        return e.value if e.raw == raw else _codec.decode(e.data, raw)

    def l1_put(self, key: str, value: Any, data: bytes, raw: bool, o: Options, ticket: Ticket,
               server_ttl_ms: Optional[int] = None) -> None:
        ttl = min(o.ttl, self.l1_ttl)
        if server_ttl_ms is not None and server_ttl_ms >= 0:
            ttl = min(ttl, server_ttl_ms / 1000.0)
        if ttl <= 0 or not self.ticket_valid(ticket):
            return
        weight = len(key) + len(data) + 64
        if weight > self.l1_max_bytes:
            return
        e = _Entry(value, data, raw, weight, time.monotonic() + ttl, ticket.tags)
        with self._lock:
            if not self.ticket_valid(ticket):
                return
            self._remove_locked(key)
            self._l1[key] = e
            self._l1_bytes += weight
            while self._l1_bytes > self.l1_max_bytes and self._l1:
                _, old = self._l1.popitem(last=False)
                self._l1_bytes -= old.weight

    def _remove_locked(self, key: str) -> None:
        old = self._l1.pop(key, None)
        if old is not None:
            self._l1_bytes -= old.weight

    def _reset_locked(self) -> None:
        self.epoch += 1
        if self._l1:
            self.m.l1_resets += 1
        self._l1.clear()
        self._l1_bytes = 0

    def reset_l1(self) -> None:
        with self._lock:
            self._reset_locked()

    def after_fork(self) -> None:
        self._lock = threading.Lock()

    def set_tracking(self, on: bool) -> None:
        with self._lock:
            self.tracking = on
            if on:
                # Coherence resumes: everything cached before (including what was loaded while Redis was
                # away) may have missed invalidations.
                self._last_msg = None
                self._reset_locked()

    # ---- pushes ----------------------------------------------------------------------------------
    def on_push(self, push: List[Any]) -> None:
        """One RESP3 push from the coherence connection."""
        if not push:
            return
        kind = push[0]
        if isinstance(kind, str):
            kind = kind.encode()
        if kind == b"invalidate":
            self.m.invalidations_received += 1
            keys = push[1] if len(push) > 1 else None
            if isinstance(keys, list):
                for k in keys:
                    if isinstance(k, (bytes, str)):
                        self.drop_key(_b(k))
            else:
                # A null key list: FLUSHALL / FLUSHDB.
                self.reset_l1()
        elif kind == b"message" and len(push) >= 3:
            if _b(push[1]) != self.channel:
                return
            self.m.invalidations_received += 1
            self.on_message(_b(push[2]))

    def on_message(self, payload: bytes) -> None:
        try:
            msg = msgpack.unpackb(payload, raw=False)
            v, run_id, seq = msg["v"], msg["run_id"], msg["seq"]
            reset = bool(msg.get("reset", False))
            tags = msg.get("tags") or []
            db = msg.get("db")
        except Exception:
            self.reset_l1()
            return
        with self._lock:
            last = self._last_msg
            gap = v != 1 or (last is not None and (last[0] != run_id or last[1] + 1 != seq))
            self._last_msg = (run_id, seq)
        if gap or reset:
            self.reset_l1()
            return
        if db is not None and db != self.db:
            return
        for t in tags:
            if isinstance(t, (bytes, str)):
                self.drop_tag(_b(t))

    # ---- stats -----------------------------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        out = self.m.snapshot()
        out["l1_entries"] = len(self._l1)
        out["l1_bytes"] = self._l1_bytes
        out["degraded"] = 1 if self.circuit_open() else 0
        return out


MISS = _MISS


def bulk(v: Any) -> Optional[bytes]:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    if isinstance(v, int):
        return str(v).encode()
    return None


class LeaseReply:
    """A parsed ``TIERCACHE.GET ... ENCODED WITHTTL LEASE`` reply."""

    __slots__ = ("status", "data", "token", "ttl_ms")

    def __init__(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 4:
            raise ValueError(f"unexpected lease reply: {reply!r}")
        self.status = bulk(reply[0]) or b""
        stored = bulk(reply[1])
        self.token = bulk(reply[2])
        encoding = bulk(reply[3])
        self.data = _codec.read_encoded(encoding, stored) if stored is not None else None
        ttl = reply[4] if len(reply) > 4 else None
        self.ttl_ms: Optional[int] = ttl if isinstance(ttl, int) else None
