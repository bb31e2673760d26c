"""tiercache: the Python client of the tiercache Redis module.

An in-process cache (L1) kept coherent by the server (RESP3 key tracking and the module's invalidation
messages) in front of Redis (L2), with one database load per miss across the fleet (local
single-flight, then a fill lease with readers parked in Redis). Entries are shared with the Rust client
``tiercache-client``: same key namespacing, MessagePack values, client-side lz4 frame.

    import redis
    from tiercache import TierCache

    cache = TierCache(redis.Redis(host="127.0.0.1", port=6379), namespace="app")

    @cache.cached(ttl="30m", stale="1h", key="user:{user_id}:profile", tags=["user:{user_id}"])
    def user_profile(user_id: int) -> dict: ...

    cache.invalidate_tags(["user:42"])      # after the database commit
"""

from ._durations import Duration, seconds
from ._errors import (
    CodecError,
    CommandError,
    FencedError,
    LeaseTimeout,
    RedisUnavailable,
    TierCacheError,
    WrongTypeError,
)
from .aio import AsyncLease, AsyncTierCache
from .client import Lease, TierCache

__version__ = "0.1.0"

__all__ = [
    "AsyncLease",
    "AsyncTierCache",
    "CodecError",
    "CommandError",
    "Duration",
    "FencedError",
    "Lease",
    "LeaseTimeout",
    "RedisUnavailable",
    "TierCache",
    "TierCacheError",
    "WrongTypeError",
    "seconds",
]
