"""The asyncio client: ``AsyncTierCache(redis.asyncio.Redis(...))``. Same read path, coherence and entries
as :class:`tiercache.TierCache`; the listener is a task, refreshes are tasks, the single-flight is per
event loop."""

from __future__ import annotations

import logging
import asyncio
import functools
import inspect
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Set, Tuple, TypeVar, Union, cast

import redis
import redis.asyncio
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
Loader = Callable[[], Union[Awaitable[Any], Any]]

_POOL_MAX = 16


async def _close(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:
        pass


class _Session:
    def __init__(self, listener: Any, writer: Any) -> None:
        self.listener = listener
        self.writer = writer
        self.wlock = asyncio.Lock()
        self.closed = False
        self.task: Optional["asyncio.Task[None]"] = None
        self.last_seen = time.monotonic()

    async def close(self) -> None:
        self.closed = True
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        await _close(self.listener)
        await _close(self.writer)


class AsyncLease:
    """A fill lease taken by :meth:`AsyncTierCache.lease` (see :class:`tiercache.Lease`)."""

    def __init__(self, cache: "AsyncTierCache", key: str, reply: LeaseReply, conn: Any, raw: bool) -> None:
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

    async def fill(self, value: Any, *, ttl: Optional[Duration] = None, stale: Optional[Duration] = None,
                   tags: Optional[Tags] = None) -> None:
        if not self.held:
            raise TierCacheError(f"no lease held on {self.key!r} (status {self.status})")
        c = self._cache
        o = c._core.options(ttl, stale, tags)
        full = c._core.full(self.key)
        data = _codec.encode(value, self._raw)
        ticket = c._core.ticket(full, o)
        try:
            await c._write(c._core.set_args(full, data, o, self.token))
            c._core.l1_put(self.key, _codec.decode(data, self._raw), data, self._raw, o, ticket)
        except FencedError:
            c._core.m.fenced += 1
            raise
        finally:
            conn, self._conn = self._conn, None
            await c._give_back(conn)

    async def release(self, pass_: bool = False) -> bool:
        if not self.held:
            return False
        conn, self._conn = self._conn, None
        return await self._cache._release_on(conn, self._cache._core.full(self.key), cast(bytes, self.token), pass_)

    async def __aenter__(self) -> "AsyncLease":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.held:
            await self.release()
        elif self._conn is not None:
            conn, self._conn = self._conn, None
            await self._cache._give_back(conn)


class AsyncTierCache:
    """The asyncio twin of :class:`tiercache.TierCache`, over a ``redis.asyncio.Redis``. Connections are
    opened on first use (or ``await cache.connect()``); close with ``await cache.aclose()`` or
    ``async with``."""

    def __init__(
        self,
        redis_client: "redis.asyncio.Redis",
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
        ping_interval: Duration = 5,
    ) -> None:
        if on_busy not in ("load", "raise"):
            raise ValueError("on_busy must be 'load' (load without caching) or 'raise' (LeaseTimeout)")
        self.redis = redis_client
        self._ping_interval = seconds(ping_interval)
        self._cls, base, self._protocol = _conn.derive(redis_client.connection_pool, asyncio=True)
        self._core = Core(
            db=int(base.get("db") or 0), namespace=namespace, schema_version=schema_version,
            l1_max_bytes=l1_max_bytes, l1_ttl=l1_ttl, default_ttl=default_ttl, stale=stale,
            lease_timeout=lease_timeout, wait_timeout=wait_timeout, compress_min_size=compress_min_size,
            ttl_jitter=ttl_jitter, op_timeout=op_timeout, breaker_failures=breaker_failures,
            breaker_cooldown=breaker_cooldown, invalidation_channel=invalidation_channel, beta=beta,
            registry=registry, metric_labels=metric_labels,
        )
        c = self._core
        self._on_busy = on_busy
        self._kw_plain = _conn.kwargs_for(base, self._protocol, c.op_timeout, c.op_timeout, True)
        self._kw_listen = _conn.kwargs_for(base, 3, None, c.op_timeout, True)
        self._kw_lease = _conn.kwargs_for(base, self._protocol, c.wait_ms / 1000.0 + c.op_timeout, c.op_timeout, True)
        self._sess: Optional[_Session] = None
        self._sess_lock: Optional[asyncio.Lock] = None
        self._lease_pool: List[Any] = []
        self._flights: Dict[str, List[Any]] = {}
        self._tasks: Set["asyncio.Task[Any]"] = set()
        self._closed = False

    # ---- public API ------------------------------------------------------------------------------
    @property
    def namespace(self) -> str:
        return self._core.namespace

    @property
    def namespace_tag(self) -> str:
        return self._core.ns_tag.decode()

    def redis_key(self, key: str) -> str:
        return self._core.full(key)

    def stats(self) -> Dict[str, int]:
        return self._core.stats()

    async def connect(self) -> bool:
        """Opens the coherence connections now; False if Redis is unreachable (the cache then runs
        degraded and keeps trying)."""
        return await self._session() is not None

    def get_l1(self, key: str, default: Any = None, *, raw: bool = False) -> Any:
        """The in-process (L1) read alone, without a Redis call: the value on an L1 hit (what ``get``
        would answer, counted as a hit), ``default`` on a miss, and ``default`` while invalidations are
        not flowing (Redis away or reconnecting; ``get`` then tries to reconnect first and serves L1
        through an outage). For hot paths that fall back to ``get_or_load`` on a miss, and for code
        that cannot await."""
        return self._core.l1_only(key, raw, default)

    async def get(self, key: str, default: Any = None, *, raw: bool = False) -> Any:
        c = self._core
        await self._resume()
        v = c.l1_get(key, raw)
        if v is not MISS:
            return v
        if c.circuit_open():
            return default
        conn = self._take_conn(plain=True)
        try:
            reply = await self._roundtrip(conn, ["TIERCACHE.GET", c.full(key), "ENCODED"])
        except (RedisUnavailable,):
            return default
        await self._give_back(conn, plain=True)
        if not isinstance(reply, list) or len(reply) < 2:
            return default
        return _codec.decode(_codec.read_encoded(reply[0], reply[1]), raw)

    async def set(self, key: str, value: Any, *, ttl: Optional[Duration] = None, stale: Optional[Duration] = None,
                  tags: Optional[Tags] = None, raw: bool = False) -> None:
        c = self._core
        o = c.options(ttl, stale, tags)
        full = c.full(key)
        data = _codec.encode(value, raw)
        await self._write(c.set_args(full, data, o, None))
        c.drop_key(full.encode())
        c.l1_put(key, _codec.decode(data, raw), data, raw, o, c.ticket(full, o))

    async def delete(self, key: str) -> int:
        c = self._core
        full = c.full(key).encode()
        c.drop_key(full)
        try:
            return int(await self._write(["TIERCACHE.DEL", full]))
        finally:
            c.drop_key(full)

    async def invalidate_tags(self, tags: Union[str, Sequence[Union[str, bytes]]]) -> int:
        c = self._core
        tag_list = [tags] if isinstance(tags, str) else list(tags)
        tb = [t if isinstance(t, bytes) else t.encode() for t in tag_list]
        if not tb:
            return 0
        for t in tb:
            c.drop_tag(t)
        try:
            return int(await self._write(["TIERCACHE.INVALIDATE", *tb]))
        finally:
            for t in tb:
                c.drop_tag(t)

    async def flush_namespace(self) -> int:
        return await self.invalidate_tags([self._core.ns_tag])

    async def get_or_load(self, key: str, loader: Loader, *, ttl: Optional[Duration] = None,
                          stale: Optional[Duration] = None, tags: Optional[Tags] = None, raw: bool = False) -> Any:
        """See :meth:`tiercache.TierCache.get_or_load`; ``loader`` is an async callable (a plain callable
        works too)."""
        c = self._core
        if not c.tracking:
            await self._session()
        v = c.l1_get(key, raw)
        if v is not MISS:
            return v
        o = c.options(ttl, stale, tags)
        full = c.full(key)
        flight = self._flights.get(full)
        if flight is None:
            flight = self._flights[full] = [asyncio.Lock(), 0]
        flight[1] += 1
        lock: asyncio.Lock = flight[0]
        waited = lock.locked()
        try:
            async with lock:
                if waited:
                    c.m.coalesced_local += 1
                    v = c.l1_get(key, raw)
                    if v is not MISS:
                        return v
                return await self._load_through_redis(key, full, o, loader, raw)
        finally:
            flight[1] -= 1
            if flight[1] == 0 and self._flights.get(full) is flight:
                del self._flights[full]

    async def lease(self, key: str, *, raw: bool = False, wait: bool = True) -> AsyncLease:
        c = self._core
        args = c.lease_args(c.full(key))
        if not wait:
            i = args.index("WAIT")
            del args[i:i + 2]
        conn = self._take_conn()
        out = await self._roundtrip(conn, args)
        try:
            reply = LeaseReply(out)
        except (ValueError, CodecError):
            await _close(conn)
            raise
        if reply.status == b"BUSY":
            await self._give_back(conn)
            raise LeaseTimeout(key)
        if reply.token is None:
            await self._give_back(conn)
            conn = None
        return AsyncLease(self, key, reply, conn, raw)

    def cached(self, ttl: Optional[Duration] = None, stale: Optional[Duration] = None, key: Optional[str] = None,
               tags: Sequence[str] = (), raw: bool = False) -> Callable[[F], F]:
        """Decorator for coroutine functions; see :meth:`tiercache.TierCache.cached`. ``invalidate`` is a
        coroutine here."""

        def deco(fn: F) -> F:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is not a coroutine function: decorate it with a TierCache")
            b = Binder(fn, key, tags)

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                k, t = b.for_call(args, kwargs)
                return await self.get_or_load(k, lambda: fn(*args, **kwargs), ttl=ttl, stale=stale, tags=t, raw=raw)

            def cache_key(*args: Any, **kwargs: Any) -> str:
                return b.render(b.key, b.arguments(args, kwargs, partial=True))

            async def invalidate(*args: Any, **kwargs: Any) -> int:
                return await self.delete(cache_key(*args, **kwargs))

            w = cast(Any, wrapper)
            w.cache_key = cache_key
            w.invalidate = invalidate
            w.cache = self
            return cast(F, wrapper)

        return deco

    async def aclose(self) -> None:
        self._closed = True
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        sess, self._sess = self._sess, None
        if sess is not None:
            await sess.close()
        pool, self._lease_pool = self._lease_pool, []
        for conn in pool:
            await _close(conn)

    async def __aenter__(self) -> "AsyncTierCache":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    # ---- the read path ---------------------------------------------------------------------------
    async def _load_through_redis(self, key: str, full: str, o: Options, loader: Loader, raw: bool) -> Any:
        c = self._core
        ticket = c.ticket(full, o)
        got: Optional[Tuple[LeaseReply, Any]] = None
        if not c.circuit_open() and await self._session() is not None:
            got = await self._lease_get(full)
        if got is None:
            c.m.degraded_loads += 1
            return await self._run_loader(key, full, o, loader, raw, None, None, ticket, store=False)
        lr, conn = got
        st = lr.status
        if st in (b"HIT", b"STALE") and lr.data is None:
            if conn is not None:
                await self._release_on(conn, full, cast(bytes, lr.token), False)
            raise CodecError("unreadable value from Redis")
        if st == b"HIT":
            c.m.l2_hits += 1
            v = _codec.decode(cast(bytes, lr.data), raw)
            if lr.token is not None:
                self._refresh_in_background(key, full, o, loader, raw, lr.token, conn)
            c.l1_put(key, v, cast(bytes, lr.data), raw, o, ticket, lr.ttl_ms)
            return v
        if st == b"STALE":
            c.m.l2_stale += 1
            v = _codec.decode(cast(bytes, lr.data), raw)
            if lr.token is not None:
                self._refresh_in_background(key, full, o, loader, raw, lr.token, conn)
            return v
        c.m.l2_misses += 1
        if st == b"FILL" and lr.token is not None:
            return await self._run_loader(key, full, o, loader, raw, lr.token, conn, ticket, store=True)
        if st == b"PASS":
            return await self._run_loader(key, full, o, loader, raw, None, None, ticket, store=False, keep=False)
        if self._on_busy == "raise":
            raise LeaseTimeout(key)
        return await self._run_loader(key, full, o, loader, raw, None, None, ticket, store=False)

    async def _run_loader(self, key: str, full: str, o: Options, loader: Loader, raw: bool,
                          token: Optional[bytes], conn: Any, ticket: Ticket, store: bool,
                          served_stale: bool = False, keep: bool = True) -> Any:
        c = self._core
        c.m.loads += 1
        t0 = time.perf_counter()
        try:
            try:
                v = loader()
                if inspect.isawaitable(v):
                    v = await v
                c.m.observe_load(time.perf_counter() - t0)
            except Exception:
                c.m.observe_load(time.perf_counter() - t0)
                if served_stale:
                    c.m.fail_safe += 1
                c.m.load_errors += 1
                if token is not None and conn is not None:
                    await self._release_on(conn, full, token, False)
                    conn = None
                s = c.l1_stale(key, raw)
                if s is not MISS:
                    c.m.fail_safe += 1
                    return s
                raise
            data = _codec.encode(v, raw)
            value = _codec.decode(data, raw)
            if store and token is not None:
                if c.circuit_open():
                    await self._release_on(conn, full, token, False)
                    conn = None
                else:
                    try:
                        await self._write(c.set_args(full, data, o, token))
                        c.l1_put(key, value, data, raw, o, ticket)
                    except FencedError:
                        c.m.fenced += 1
                    except TierCacheError as e:
                        # Refused for another reason (OOM, too many tags...): count it, say it, and let the
                        # readers parked on this lease load for themselves.
                        c.m.fill_errors += 1
                        _log.warning("tiercache: fill of %r refused: %s", full, e)
                        await self._release_on(conn, full, token, True)
                        conn = None
            elif keep:
                c.l1_put(key, value, data, raw, o, ticket)
            return value
        finally:
            if conn is not None:
                await self._give_back(conn)

    def _refresh_in_background(self, key: str, full: str, o: Options, loader: Loader, raw: bool,
                               token: bytes, conn: Any) -> None:
        async def job() -> None:
            ticket = self._core.ticket(full, o)
            try:
                await self._run_loader(key, full, o, loader, raw, token, conn, ticket, store=True, served_stale=True)
            except Exception:
                pass

        t = asyncio.get_running_loop().create_task(job())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # ---- connections -----------------------------------------------------------------------------
    async def _resume(self) -> None:
        if not self._core.tracking:
            await self._session()

    async def _session(self) -> Optional[_Session]:
        s = self._sess
        if s is not None and not s.closed:
            return s
        if self._sess_lock is None:
            self._sess_lock = asyncio.Lock()
        c = self._core
        async with self._sess_lock:
            s = self._sess
            if s is not None and not s.closed:
                return s
            if c.circuit_open() or self._closed:
                return None
            listener = self._cls(**self._kw_listen)
            writer = self._cls(**self._kw_plain)
            try:
                async with _timeout(c.op_timeout * 4):
                    await listener.connect()
                    _conn.install_push_handlers(listener._parser)
                    await listener.send_command("CLIENT", "ID")
                    lid = await listener.read_response(timeout=c.op_timeout)
                    await listener.send_command("SUBSCRIBE", c.channel)
                    await listener.read_response(timeout=c.op_timeout, push_request=True)
                    await writer.connect()
                    await writer.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", lid, "BCAST", "PREFIX",
                                              c.prefix, "NOLOOP")
                    await writer.read_response()
            except Exception:
                await _close(listener)
                await _close(writer)
                c.record(False)
                return None
            c.record(True)
            s = _Session(listener, writer)
            self._sess = s
            c.set_tracking(True)
            s.task = asyncio.get_running_loop().create_task(self._listen(s))
            return s

    async def _listen(self, s: _Session) -> None:
        c = self._core
        pinger = asyncio.get_running_loop().create_task(self._ping(s))
        try:
            while not s.closed:
                try:
                    push = await s.listener.read_response(push_request=True)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    break
                s.last_seen = time.monotonic()
                if isinstance(push, list):
                    try:
                        c.on_push(push)
                    except Exception:
                        c.reset_l1()
        finally:
            pinger.cancel()
            await self._lost(s)

    async def _ping(self, s: _Session) -> None:
        """PINGs the listener connection when it is quiet; closes the session after two unanswered PINGs
        (a peer that vanished without closing the connection would otherwise keep L1 trusted forever)."""
        interval = self._ping_interval
        while not s.closed:
            await asyncio.sleep(interval)
            idle = time.monotonic() - s.last_seen
            if idle > 3 * interval:
                break
            if idle >= interval:
                try:
                    await s.listener.send_command("PING", check_health=False)
                except Exception:
                    break
        # Closing the socket ends the listener's read; the listener then drops the session.
        await _close(s.listener)

    async def _lost(self, s: _Session) -> None:
        if self._sess is s:
            self._sess = None
            self._core.set_tracking(False)
        if not s.closed:
            await s.close()
        pool, self._lease_pool = self._lease_pool, []
        for conn in pool:
            await _close(conn)

    async def _write(self, args: List[Any]) -> Any:
        c = self._core
        s = await self._session()
        if s is None:
            raise RedisUnavailable("tiercache: Redis unreachable (or circuit open)")
        async with s.wlock:
            try:
                await s.writer.send_command(*args)
                out = await s.writer.read_response()
            except redis.ResponseError as e:
                c.record(True)
                raise map_redis_error(e) from None
            except Exception as e:
                c.record(False)
                err = map_redis_error(e)
                await self._lost(s)
                raise err from None
        c.record(True)
        return out

    def _take_conn(self, plain: bool = False) -> Any:
        if self._lease_pool:
            return self._lease_pool.pop()
        return self._cls(**self._kw_lease)

    async def _give_back(self, conn: Any, plain: bool = False) -> None:
        if conn is None:
            return
        if len(self._lease_pool) < _POOL_MAX and not self._closed:
            self._lease_pool.append(conn)
        else:
            await _close(conn)

    async def _roundtrip(self, conn: Any, args: List[Any]) -> Any:
        c = self._core
        try:
            await conn.send_command(*args)
            out = await conn.read_response()
        except redis.ResponseError as e:
            c.record(True)
            await self._give_back(conn)
            raise map_redis_error(e) from None
        except asyncio.CancelledError:
            await _close(conn)
            raise
        except Exception as e:
            c.record(False)
            await _close(conn)
            raise map_redis_error(e) from None
        c.record(True)
        return out

    async def _lease_get(self, full: str) -> Optional[Tuple[LeaseReply, Any]]:
        conn = self._take_conn()
        try:
            out = await self._roundtrip(conn, self._core.lease_args(full))
        except TierCacheError:
            return None
        try:
            reply = LeaseReply(out)
        except (ValueError, CodecError):
            await _close(conn)
            return None
        if reply.token is None:
            await self._give_back(conn)
            return reply, None
        return reply, conn

    async def _release_on(self, conn: Any, full: Union[str, bytes], token: bytes, pass_: bool) -> bool:
        args: List[Any] = ["TIERCACHE.RELEASE", full, token]
        if pass_:
            args.append("PASS")
        try:
            out = await self._roundtrip(conn, args)
        except TierCacheError:
            return False
        await self._give_back(conn)
        return bool(out)


def _timeout(seconds: float) -> Any:
    """The timeout context manager redis-py itself uses (asyncio.timeout on 3.11+, else async_timeout)."""
    from redis.asyncio.connection import async_timeout  # type: ignore[attr-defined]

    return async_timeout(seconds)
