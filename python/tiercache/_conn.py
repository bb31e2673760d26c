"""Connection settings derived from the caller's redis-py client."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Tuple, Type

from redis._parsers import _AsyncRESP2Parser, _AsyncRESP3Parser, _RESP2Parser, _RESP3Parser
from redis.backoff import NoBackoff

_DROP = ("retry", "retry_on_error", "retry_on_timeout", "health_check_interval", "cache", "cache_config",
         "parser_class", "protocol", "decode_responses", "socket_timeout", "socket_connect_timeout",
         "redis_connect_func", "connection_pool")


def protocol_of(kwargs: Dict[str, Any]) -> int:
    p = kwargs.get("protocol") or 2
    try:
        return 3 if int(p) == 3 else 2
    except (TypeError, ValueError):
        return 2


def derive(pool: Any, asyncio: bool) -> Tuple[Type[Any], Dict[str, Any], int]:
    """(connection class, base kwargs without retries or decoding, the caller's protocol)."""
    kwargs = dict(pool.connection_kwargs)
    proto = protocol_of(kwargs)
    for k in _DROP:
        kwargs.pop(k, None)
    if asyncio:
        from redis.asyncio.retry import Retry as ARetry

        kwargs["retry"] = ARetry(NoBackoff(), 0)
    else:
        from redis.retry import Retry

        kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["decode_responses"] = False
    return pool.connection_class, kwargs, proto


def kwargs_for(base: Dict[str, Any], protocol: int, timeout: Any, connect_timeout: float, asyncio: bool) -> Dict[str, Any]:
    kw = dict(base)
    kw["protocol"] = protocol
    kw["socket_timeout"] = timeout
    kw["socket_connect_timeout"] = connect_timeout
    if asyncio:
        kw["parser_class"] = _AsyncRESP3Parser if protocol == 3 else _AsyncRESP2Parser
    else:
        kw["parser_class"] = _RESP3Parser if protocol == 3 else _RESP2Parser
    return kw


def _identity(r: Any) -> Any:
    return r


async def _async_identity(r: Any) -> Any:
    return r


def install_push_handlers(parser: Any) -> None:
    """Makes ``read_response(push_request=True)`` return RESP3 pushes (messages and key invalidations)
    as lists. redis-py >= 5.1 has separate pub/sub and invalidation handlers, awaited by the asyncio
    parser from 6.0; 5.0 has one handler, always called synchronously."""
    awaits = inspect.iscoroutinefunction(getattr(type(parser), "handle_push_response", None))
    h = _async_identity if awaits else _identity
    if hasattr(parser, "set_pubsub_push_handler"):
        parser.set_pubsub_push_handler(h)
        if hasattr(parser, "set_invalidation_push_handler"):
            parser.set_invalidation_push_handler(h)
    else:
        parser.set_push_handler(h)
