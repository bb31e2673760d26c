"""Exceptions. Server errors keep the server's text (``str(e)`` is what Redis answered)."""

from __future__ import annotations

from typing import Optional

import redis


class TierCacheError(Exception):
    """Base class of every tiercache error."""


class RedisUnavailable(TierCacheError):
    """Redis could not be reached or timed out (a direct call: set, delete, invalidate_tags)."""


class CommandError(TierCacheError):
    """Redis refused a command; the message is the server's error text."""


class FencedError(CommandError):
    """``TIERCACHE.SET ... LEASE`` was refused (``FENCED ...``): the key or one of its tags changed
    while the value was loading, or the lease is no longer held. The loaded value must not be cached."""


class WrongTypeError(CommandError):
    """The key holds another Redis type (``WRONGTYPE ...``)."""


class LeaseTimeout(TierCacheError):
    """Another client held the fill lease for the whole ``WAIT`` (the server answered ``BUSY``)."""

    def __init__(self, key: str, message: Optional[str] = None) -> None:
        super().__init__(message or f"BUSY: another client is still loading {key!r} after the wait deadline")
        self.key = key


class CodecError(TierCacheError):
    """A value could not be encoded or decoded (MessagePack or the lz4 frame)."""


def map_redis_error(e: BaseException) -> TierCacheError:
    """The tiercache exception for a redis-py exception, keeping the server's text."""
    if isinstance(e, TierCacheError):
        return e
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return RedisUnavailable(str(e) or type(e).__name__)
    text = str(e)
    if text.startswith("FENCED"):
        return FencedError(text)
    if text.startswith("WRONGTYPE"):
        return WrongTypeError(text)
    return CommandError(text)
