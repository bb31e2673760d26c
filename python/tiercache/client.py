"""The synchronous client: ``TierCache(redis.Redis(...))``."""

from __future__ import annotations

import logging
import functools
import inspect
import os
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, Union, cast

import redis
from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

from . import _codec, _conn
from ._core import MISS, Core, LeaseReply, Options, Tags, Ticket
from ._decorator import Binder
from ._durations import Duration, seconds
from ._errors import (
    CodecError,
    FencedError,
    LeaseTimeout,
    RedisUnavailable,
    TierCacheError,
    map_redis_error,
)

_log = logging.getLogger("tiercache")

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

_IO_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
_POOL_MAX = 16


class _Session:
    """The coherence session: a RESP3 listener connection subscribed to the invalidation channel, and a
    writer connection with ``CLIENT TRACKING ON REDIRECT <listener> BCAST PREFIX <ns> NOLOOP``. Every
    write of this process goes through the writer, so it is not echoed back (NOLOOP), while writes of
    every other client under the prefix are pushed to the listener."""

    def __init__(self, listener: Any, writer: Any) -> None:
        self.listener = listener
        self.writer = writer
        self.wlock = threading.Lock()
        self.closed = False
        self.thread: Optional[threading.Thread] = None

    def close(self) -> None:
        self.closed = True
        for c in (self.listener, self.writer):
            try:
                c.disconnect()
            except Exception:
                pass


class Lease:
    """A fill lease taken by :meth:`TierCache.lease`; the connection that took it is kept until
    :meth:`fill` or :meth:`release` (leaving the ``with`` block releases an unfilled lease)."""

    def __init__(self, cache: "TierCache", key: str, reply: LeaseReply, conn: Any, raw: bool) -> None:
        self._cache = cache
        self.key = key
        self.status = reply.status.decode()
        self.token = reply.token
        self.ttl_ms = reply.ttl_ms
        self._raw = raw
        self.value: Any = None if reply.data is None else _codec.decode(reply.data, raw)
        self._conn = conn

    @property
    def held(self) -> bool:
        return self._conn is not None and self.token is not None

    def fill(self, value: Any, *, ttl: Optional[Duration] = None, stale: Optional[Duration] = None,
             tags: Optional[Tags] = None) -> None:
        """``TIERCACHE.SET ... LEASE token``; raises :class:`FencedError` (server text) when refused."""
        if not self.held:
            raise TierCacheError(f"no lease held on {self.key!r} (status {self.status})")
        c = self._cache
        o = c._core.options(ttl, stale, tags)
        full = c._core.full(self.key)
        data = _codec.encode(value, self._raw)
        ticket = c._core.ticket(full, o)
        try:
            c._write(c._core.set_args(full, data, o, self.token))
            c._core.l1_put(self.key, _codec.decode(data, self._raw), data, self._raw, o, ticket)
        except FencedError:
            c._core.m.fenced += 1
            raise
        finally:
            conn, self._conn = self._conn, None
            c._give_back(conn)

    def release(self, pass_: bool = False) -> bool:
        """``TIERCACHE.RELEASE key token [PASS]``; True if the lease was still held."""
        if not self.held:
            return False
        conn, self._conn = self._conn, None
        return self._cache._release_on(conn, self._cache._core.full(self.key), cast(bytes, self.token), pass_)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.release()
        elif self._conn is not None:
            conn, self._conn = self._conn, None
            self._cache._give_back(conn)


class TierCache:
    """An in-process cache (L1) in front of the tiercache Redis module (L2), sharing entries with the
    Rust client ``tiercache-client``.

    ``redis_client`` is a ``redis.Redis``; its connection settings (host, port, db, password, TLS...) are
    reused for the connections this cache opens for itself (a coherence listener, a writer, and one
    connection per parked lease read), whatever protocol and ``decode_responses`` it uses.
    """

    def __init__(
        self,
        redis_client: "redis.Redis",
        *,
        namespace: str = "app",
        schema_version: int = 1,
        l1_max_bytes: int = 64 << 20,
        l1_ttl: Duration = 10,
        default_ttl: Duration = 300,
        stale: Duration = 0,
        lease_timeout: Duration = 5,
        wait_timeout: Duration = 2,
        compress_min_size: int = 1024,
        ttl_jitter: float = 0.0,
        op_timeout: Duration = 0.5,
        breaker_failures: int = 3,
        breaker_cooldown: Duration = 2,
        invalidation_channel: str = "tiercache:invalidations",
        beta: Optional[float] = 1.0,
        on_busy: str = "load",
        registry: Optional[CollectorRegistry] = REGISTRY,
        metric_labels: Optional[Dict[str, str]] = None,
        refresh_workers: int = 4,
        ping_interval: Duration = 5,
    ) -> None:
        if on_busy not in ("load", "raise"):
            raise ValueError("on_busy must be 'load' (load without caching) or 'raise' (LeaseTimeout)")
        self.redis = redis_client
        pool = redis_client.connection_pool
        self._cls, base, self._protocol = _conn.derive(pool, asyncio=False)
        db = int(base.get("db") or 0)
        self._core = Core(
            db=db, namespace=namespace, schema_version=schema_version, l1_max_bytes=l1_max_bytes,
            l1_ttl=l1_ttl, default_ttl=default_ttl, stale=stale, lease_timeout=lease_timeout,
            wait_timeout=wait_timeout, compress_min_size=compress_min_size, ttl_jitter=ttl_jitter,
            op_timeout=op_timeout, breaker_failures=breaker_failures, breaker_cooldown=breaker_cooldown,
            invalidation_channel=invalidation_channel, beta=beta, registry=registry,
            metric_labels=metric_labels,
        )
        c = self._core
        self._on_busy = on_busy
        self._ping_interval = seconds(ping_interval)
        self._kw_plain = _conn.kwargs_for(base, self._protocol, c.op_timeout, c.op_timeout, False)
        self._kw_listen = _conn.kwargs_for(base, 3, None, c.op_timeout, False)
        self._kw_lease = _conn.kwargs_for(base, self._protocol, c.wait_ms / 1000.0 + c.op_timeout, c.op_timeout, False)
        # Plain reads (get, stats): a pool of our own, never decoding, never retrying.
        self._r = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=self._cls, **self._kw_plain))
        self._sess: Optional[_Session] = None
        self._sess_lock = threading.Lock()
        self._lease_pool: List[Any] = []
        self._pool_lock = threading.Lock()
        self._flights: Dict[str, List[Any]] = {}
        self._flights_lock = threading.Lock()
        self._bg = ThreadPoolExecutor(max_workers=max(1, refresh_workers), thread_name_prefix="tiercache-refresh")
        self._closed = False
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def in_child() -> None:
                cache = ref()
                if cache is not None:
                    cache._after_fork()

            os.register_at_fork(after_in_child=in_child)
        self._session()

    # ---- public API ------------------------------------------------------------------------------
    @property
    def namespace(self) -> str:
        return self._core.namespace

    def redis_key(self, key: str) -> str:
        """The Redis key of ``key``: ``<namespace>:v<schema_version>:<key>`` (as the Rust client)."""
        return self._core.full(key)

    @property
    def namespace_tag(self) -> str:
        return self._core.ns_tag.decode()

    def stats(self) -> Dict[str, int]:
        """Counters and gauges now, under the Rust client's names (without ``tiercache_client_``)."""
        return self._core.stats()

    def get_l1(self, key: str, default: Any = None, *, raw: bool = False) -> Any:
        """The in-process (L1) read alone, without a Redis call: the value on an L1 hit (what ``get``
        would answer, counted as a hit), ``default`` on a miss, and ``default`` while invalidations are
        not flowing (Redis away or reconnecting; ``get`` then tries to reconnect first and serves L1
        through an outage). For hot paths that fall back to ``get_or_load`` on a miss."""
        return self._core.l1_only(key, raw, default)

    def get(self, key: str, default: Any = None, *, raw: bool = False) -> Any:
        """L1, then ``TIERCACHE.GET key ENCODED`` (no lease, no load); ``default`` on a miss or when Redis
        fails."""
        c = self._core
        if not c.tracking:
            self._session()
        v = c.l1_get(key, raw)
        if v is not MISS:
            return v
        full = c.full(key)
        if c.circuit_open():
            return default
        try:
            reply = self._r.execute_command("TIERCACHE.GET", full, "ENCODED")  # type: ignore[no-untyped-call]
            c.record(True)
        except redis.ResponseError as e:
            raise map_redis_error(e) from None
        except _IO_ERRORS:
            c.record(False)
            return default
        if not isinstance(reply, list) or len(reply) < 2:
            return default
        data = _codec.read_encoded(reply[0], reply[1])
        return _codec.decode(data, raw)

    def set(self, key: str, value: Any, *, ttl: Optional[Duration] = None, stale: Optional[Duration] = None,
            tags: Optional[Tags] = None, raw: bool = False) -> None:
        """Stores ``value`` in Redis (``TIERCACHE.SET``), then in L1. Raises :class:`RedisUnavailable`
        or :class:`CommandError`."""
        c = self._core
        o = c.options(ttl, stale, tags)
        full = c.full(key)
        data = _codec.encode(value, raw)
        self._write(c.set_args(full, data, o, None))
        # A read that reached Redis before this write may be about to put the old value in L1 (and
        # NOLOOP means no push for our own write): void it, then store the new value.
        c.drop_key(full.encode())
        c.l1_put(key, _codec.decode(data, raw), data, raw, o, c.ticket(full, o))

    def delete(self, key: str) -> int:
        """``TIERCACHE.DEL``: deletes the key everywhere and fences a fill in flight. Call it after the
        database commit."""
        c = self._core
        full = c.full(key).encode()
        c.drop_key(full)
        try:
            return int(self._write(["TIERCACHE.DEL", full]))
        finally:
            # Again after the reply: a read that began in between may have put the old value back.
            c.drop_key(full)

    def invalidate_tags(self, tags: Union[str, Sequence[Union[str, bytes]]]) -> int:
        """``TIERCACHE.INVALIDATE``: every process drops entries carrying a tag; this one before the
        command and again after its reply (read-your-writes within the process)."""
        c = self._core
        tag_list = [tags] if isinstance(tags, str) else list(tags)
        tb = [t if isinstance(t, bytes) else t.encode() for t in tag_list]
        if not tb:
            return 0
        for t in tb:
            c.drop_tag(t)
        try:
            return int(self._write(["TIERCACHE.INVALIDATE", *tb]))
        finally:
            for t in tb:
                c.drop_tag(t)

    def flush_namespace(self) -> int:
        """Invalidates every entry of this namespace and schema version (O(1): the namespace tag)."""
        return self.invalidate_tags([self._core.ns_tag])

    def get_or_load(self, key: str, loader: Callable[[], T], *, ttl: Optional[Duration] = None,
                    stale: Optional[Duration] = None, tags: Optional[Tags] = None, raw: bool = False) -> T:
        """The cached value of ``key``, or ``loader()``'s, loaded once for the whole fleet: L1, then this
        process's load of the same key, then a lease read (waiting in Redis while another client
        loads), then ``loader``, whose value is stored in Redis and L1. A stale value is returned at once
        while one caller refreshes it in the background. Redis errors never reach the caller; the
        loader's do, unless a stale L1 copy can be served (fail-safe)."""
        c = self._core
        if not c.tracking:
            self._session()
        v = c.l1_get(key, raw)
        if v is not MISS:
            return cast(T, v)
        o = c.options(ttl, stale, tags)
        full = c.full(key)
        with self._flights_lock:
            flight = self._flights.get(full)
            if flight is None:
                flight = self._flights[full] = [threading.Lock(), 0]
            flight[1] += 1
        lock: threading.Lock = flight[0]
        waited = not lock.acquire(blocking=False)
        if waited:
            lock.acquire()
        try:
            if waited:
                c.m.coalesced_local += 1
                v = c.l1_get(key, raw)
                if v is not MISS:
                    return cast(T, v)
            return cast(T, self._load_through_redis(key, full, o, loader, raw))
        finally:
            lock.release()
            with self._flights_lock:
                flight[1] -= 1
                if flight[1] == 0 and self._flights.get(full) is flight:
                    del self._flights[full]

    def lease(self, key: str, *, raw: bool = False, wait: bool = True) -> Lease:
        """A lease read (``TIERCACHE.GET key ENCODED WITHTTL LEASE ... [WAIT ...]``) for callers that drive
        the fill themselves. Raises :class:`LeaseTimeout` on ``BUSY``, :class:`RedisUnavailable` when Redis
        cannot be reached."""
        c = self._core
        full = c.full(key)
        args = c.lease_args(full)
        if not wait:
            i = args.index("WAIT")
            del args[i:i + 2]
        conn = self._take_conn()
        out = self._roundtrip(conn, args)
        try:
            reply = LeaseReply(out)
        except (ValueError, CodecError):
            conn.disconnect()
            raise
        if reply.status == b"BUSY":
            self._give_back(conn)
            raise LeaseTimeout(key)
        if reply.token is None:
            self._give_back(conn)
            conn = None
        return Lease(self, key, reply, conn, raw)

    def cached(self, ttl: Optional[Duration] = None, stale: Optional[Duration] = None, key: Optional[str] = None,
               tags: Sequence[str] = (), raw: bool = False) -> Callable[[F], F]:
        """Decorator: ``@cache.cached(ttl="30m", stale="1h", key="user:{user_id}:profile",
        tags=["user:{user_id}"])``. Templates are filled from the call's arguments (bound with the
        function's signature, defaults applied). The wrapper gets ``invalidate(**args)`` (deletes the
        entry) and ``cache_key(**args)``."""

        def deco(fn: F) -> F:
            if inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is a coroutine function: decorate it with an AsyncTierCache")
            b = Binder(fn, key, tags)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                k, t = b.for_call(args, kwargs)
                return self.get_or_load(k, lambda: fn(*args, **kwargs), ttl=ttl, stale=stale, tags=t, raw=raw)

            def cache_key(*args: Any, **kwargs: Any) -> str:
                return b.render(b.key, b.arguments(args, kwargs, partial=True))

            def invalidate(*args: Any, **kwargs: Any) -> int:
                return self.delete(cache_key(*args, **kwargs))

            w = cast(Any, wrapper)
            w.cache_key = cache_key
            w.invalidate = invalidate
            w.cache = self
            return cast(F, wrapper)

        return deco

    def close(self) -> None:
        self._closed = True
        self._bg.shutdown(wait=True)
        with self._sess_lock:
            sess, self._sess = self._sess, None
        if sess is not None:
            sess.close()
        with self._pool_lock:
            pool, self._lease_pool = self._lease_pool, []
        for conn in pool:
            conn.disconnect()
        self._r.close()

    def __enter__(self) -> "TierCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _after_fork(self) -> None:
        """In a forked child (gunicorn --preload, multiprocessing): the listener thread did not come
        along and the sockets are the parent's. Forget them without closing them; the next call connects
        anew, which drops the L1 inherited from the parent."""
        self._sess = None
        self._core.after_fork()
        self._core.set_tracking(False)
        self._sess_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._flights_lock = threading.Lock()
        self._lease_pool = []
        self._flights = {}
        self._bg = ThreadPoolExecutor(max_workers=self._bg._max_workers, thread_name_prefix="tiercache-refresh")

    # ---- the read path ---------------------------------------------------------------------------
    def _load_through_redis(self, key: str, full: str, o: Options, loader: Callable[[], Any], raw: bool) -> Any:
        c = self._core
        ticket = c.ticket(full, o)
        got: Optional[Tuple[LeaseReply, Any]] = None
        if not c.circuit_open() and self._session() is not None:
            got = self._lease_get(full)
        if got is None:
            # Redis is down or failing: load directly; L1 still serves what it has.
            c.m.degraded_loads += 1
            return self._run_loader(key, full, o, loader, raw, None, None, ticket, store=False)
        lr, conn = got
        st = lr.status
        if st in (b"HIT", b"STALE") and lr.data is None:
            if conn is not None:
                self._release_on(conn, full, cast(bytes, lr.token), False)
            raise CodecError("unreadable value from Redis")
        if st == b"HIT":
            c.m.l2_hits += 1
            v = _codec.decode(cast(bytes, lr.data), raw)
            if lr.token is not None:
                # Elected to refresh early (XFetch): serve now, refresh in the background.
                self._refresh_in_background(key, full, o, loader, raw, lr.token, conn)
            c.l1_put(key, v, cast(bytes, lr.data), raw, o, ticket, lr.ttl_ms)
            return v
        if st == b"STALE":
            # Served stale (never put in L1); the one caller holding the token refreshes behind.
            c.m.l2_stale += 1
            v = _codec.decode(cast(bytes, lr.data), raw)
            if lr.token is not None:
                self._refresh_in_background(key, full, o, loader, raw, lr.token, conn)
            return v
        c.m.l2_misses += 1
        if st == b"FILL" and lr.token is not None:
            return self._run_loader(key, full, o, loader, raw, lr.token, conn, ticket, store=True)
        if st == b"PASS":
            # The holder decided the value must not be cached: load it for this caller only.
            return self._run_loader(key, full, o, loader, raw, None, None, ticket, store=False, keep=False)
        # BUSY at the wait deadline: load without caching in Redis rather than fail.
        if self._on_busy == "raise":
            raise LeaseTimeout(key)
        return self._run_loader(key, full, o, loader, raw, None, None, ticket, store=False)

    def _run_loader(self, key: str, full: str, o: Options, loader: Callable[[], Any], raw: bool,
                    token: Optional[bytes], conn: Any, ticket: Ticket, store: bool, served_stale: bool = False,
                    keep: bool = True) -> Any:
        c = self._core
        c.m.loads += 1
        t0 = time.perf_counter()
        try:
            try:
                v = loader()
                c.m.observe_load(time.perf_counter() - t0)
            except Exception:
                c.m.observe_load(time.perf_counter() - t0)
                if served_stale:
                    c.m.fail_safe += 1
                c.m.load_errors += 1
                if token is not None and conn is not None:
                    self._release_on(conn, full, token, False)
                    conn = None
                # Fail-safe: a copy past its L1 deadline, but never one an invalidation killed.
                s = c.l1_stale(key, raw)
                if s is not MISS:
                    c.m.fail_safe += 1
                    return s
                raise
            data = _codec.encode(v, raw)
            value = _codec.decode(data, raw)
            if store and token is not None:
                if c.circuit_open():
                    self._release_on(conn, full, token, False)
                    conn = None
                else:
                    try:
                        self._write(c.set_args(full, data, o, token))
                        c.l1_put(key, value, data, raw, o, ticket)
                    except FencedError:
                        # The key or a tag changed while loading: the value goes to the caller only.
                        c.m.fenced += 1
                    except TierCacheError as e:
                        # Refused for another reason (OOM, too many tags...): count it, say it, and let the
                        # readers parked on this lease load for themselves.
                        c.m.fill_errors += 1
                        _log.warning("tiercache: fill of %r refused: %s", full, e)
                        self._release_on(conn, full, token, True)
                        conn = None
            elif keep:
                # Degraded or BUSY: keep L1 useful, but never past an invalidation seen meanwhile (and
                # entries loaded while Redis is away are dropped when coherence resumes).
                c.l1_put(key, value, data, raw, o, ticket)
            return value
        finally:
            if conn is not None:
                self._give_back(conn)

    def _refresh_in_background(self, key: str, full: str, o: Options, loader: Callable[[], Any], raw: bool,
                               token: bytes, conn: Any) -> None:
        def job() -> None:
            ticket = self._core.ticket(full, o)
            try:
                self._run_loader(key, full, o, loader, raw, token, conn, ticket, store=True, served_stale=True)
            except Exception:
                pass  # the stale value already served stands in for it

        try:
            self._bg.submit(job)
        except RuntimeError:  # closed
            self._release_on(conn, full, token, False)

    # ---- connections -----------------------------------------------------------------------------
    def _resume(self) -> None:
        """While invalidations are not flowing, try to reconnect (at most once per breaker cooldown while
        Redis stays down); a success drops L1. One attribute read when all is well."""
        if not self._core.tracking:
            self._session()

    def _session(self) -> Optional[_Session]:
        s = self._sess
        if s is not None and not s.closed:
            return s
        c = self._core
        with self._sess_lock:
            s = self._sess
            if s is not None and not s.closed:
                return s
            if c.circuit_open() or self._closed:
                return None
            listener = self._cls(**self._kw_listen)
            writer = self._cls(**self._kw_plain)
            try:
                listener.connect()
                _conn.install_push_handlers(listener._parser)
                listener.send_command("CLIENT", "ID")
                lid = listener.read_response()
                listener.send_command("SUBSCRIBE", c.channel)
                listener.read_response(push_request=True)
                writer.connect()
                writer.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", lid, "BCAST", "PREFIX", c.prefix, "NOLOOP")
                writer.read_response()
            except Exception:
                listener.disconnect()
                writer.disconnect()
                c.record(False)
                return None
            c.record(True)
            s = _Session(listener, writer)
            self._sess = s
            c.set_tracking(True)
            t = threading.Thread(target=self._listen, args=(s,), name="tiercache-listener", daemon=True)
            s.thread = t
            t.start()
            return s

    def _listen(self, s: _Session) -> None:
        c = self._core
        quiet = 0
        while not s.closed:
            try:
                if not s.listener.can_read(timeout=self._ping_interval):
                    # Nothing for a while: PING, and give up after two unanswered ones (a peer that
                    # vanished without closing the connection would otherwise keep L1 trusted forever).
                    quiet += 1
                    if quiet > 2:
                        break
                    s.listener.send_command("PING")
                    continue
                quiet = 0
                push = s.listener.read_response(push_request=True)
            except Exception:
                break
            if isinstance(push, list):
                try:
                    c.on_push(push)
                except Exception:
                    c.reset_l1()
        self._lost(s)

    def _lost(self, s: _Session) -> None:
        """The coherence session is gone: L1 keeps serving what it has and what is loaded meanwhile
        (bounded by l1_ttl), and is dropped whole when coherence resumes."""
        with self._sess_lock:
            if self._sess is s:
                self._sess = None
                self._core.set_tracking(False)
        s.close()
        with self._pool_lock:
            pool, self._lease_pool = self._lease_pool, []
        for conn in pool:
            conn.disconnect()

    def _write(self, args: List[Any]) -> Any:
        c = self._core
        s = self._session()
        if s is None:
            raise RedisUnavailable("tiercache: Redis unreachable (or circuit open)")
        with s.wlock:
            try:
                s.writer.send_command(*args)
                out = s.writer.read_response()
            except redis.ResponseError as e:
                c.record(True)
                raise map_redis_error(e) from None
            except Exception as e:
                c.record(False)
                err = map_redis_error(e)
                self._lost(s)
                raise err from None
        c.record(True)
        return out

    def _take_conn(self) -> Any:
        with self._pool_lock:
            if self._lease_pool:
                return self._lease_pool.pop()
        return self._cls(**self._kw_lease)

    def _give_back(self, conn: Any) -> None:
        if conn is None:
            return
        with self._pool_lock:
            if len(self._lease_pool) < _POOL_MAX and not self._closed:
                self._lease_pool.append(conn)
                return
        conn.disconnect()

    def _roundtrip(self, conn: Any, args: List[Any]) -> Any:
        """One command on a lease connection; server errors and IO errors as tiercache exceptions."""
        c = self._core
        try:
            conn.send_command(*args)
            out = conn.read_response()
        except redis.ResponseError as e:
            c.record(True)
            self._give_back(conn)
            raise map_redis_error(e) from None
        except Exception as e:
            c.record(False)
            conn.disconnect()
            raise map_redis_error(e) from None
        c.record(True)
        return out

    def _lease_get(self, full: str) -> Optional[Tuple[LeaseReply, Any]]:
        """The lease read on a connection of its own; the connection comes back with the reply when it
        holds a lease (it must live until the fill or the release)."""
        conn = self._take_conn()
        try:
            out = self._roundtrip(conn, self._core.lease_args(full))
        except TierCacheError:
            return None
        try:
            reply = LeaseReply(out)
        except (ValueError, CodecError):
            conn.disconnect()  # ends any lease it was given
            return None
        if reply.token is None:
            self._give_back(conn)
            return reply, None
        return reply, conn

    def _release_on(self, conn: Any, full: Union[str, bytes], token: bytes, pass_: bool) -> bool:
        args: List[Any] = ["TIERCACHE.RELEASE", full, token]
        if pass_:
            args.append("PASS")
        try:
            out = self._roundtrip(conn, args)
        except TierCacheError:
            return False
        self._give_back(conn)
        return bool(out)
