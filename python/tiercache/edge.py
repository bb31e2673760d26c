"""Surrogate keys for the CDN tier: a response built from cached entries carries their tags, so that
`tiercache purge` (which hears every TIERCACHE.INVALIDATE) can purge exactly those responses at the edge.

The encoding is the Rust client's (`tiercache_client::edge`), byte for byte, and the purger's: a tag of
printable ASCII other than ``,`` and ``%`` passes unchanged, any other byte is written ``%XX``, and a tag
that would be longer than 1024 bytes (or is empty) becomes ``tc~`` + its 64-bit FNV-1a hash in hex.

- :func:`surrogate_key` (Fastly ``Surrogate-Key``), :func:`cache_tag` (Cloudflare ``Cache-Tag``) and
  :func:`xkey` (Varnish ``xkey``) build a header value; a value longer than the CDN takes raises
  :class:`HeaderTooLong` instead of dropping tags silently.
- :class:`EdgeTagsMiddleware` is ASGI middleware: code handling a request calls :func:`add_tags` (for
  example with the tags of the entries it read) and the response leaves with the CDN's header.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Dict, Iterable, List, MutableMapping, Optional, Tuple, Union

TagLike = Union[str, bytes]

MAX_KEY_LEN = 1024

#: header name, separator, longest header value the CDN accepts
CDNS: Dict[str, Tuple[str, str, int]] = {
    "fastly": ("Surrogate-Key", " ", 16_384),
    "cloudflare": ("Cache-Tag", ",", 16_384),
    "varnish": ("xkey", " ", 8_000),
}

_KEEP = frozenset(b for b in range(0x21, 0x7F) if b not in (ord(","), ord("%")))


class HeaderTooLong(ValueError):
    """The tags do not fit in one header value of this CDN."""


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def _bytes(tag: TagLike) -> bytes:
    return tag.encode() if isinstance(tag, str) else bytes(tag)


def edge_key(tag: TagLike) -> str:
    """The CDN key of one tag (see the module docs)."""
    b = _bytes(tag)
    escapes = sum(1 for x in b if x not in _KEEP)
    if not b or len(b) + 2 * escapes > MAX_KEY_LEN:
        return "tc~%016x" % fnv1a64(b)
    if escapes == 0:
        return b.decode("ascii")
    return "".join(chr(x) if x in _KEEP else "%%%02X" % x for x in b)


def header_value(cdn: str, tags: Iterable[TagLike]) -> str:
    """The header value for `cdn` ("fastly", "cloudflare" or "varnish"): each tag's key once, in order."""
    name, sep, limit = CDNS[cdn]
    seen: Dict[str, None] = {}
    for t in tags:
        seen.setdefault(edge_key(t), None)
    out = sep.join(seen)
    if len(out) > limit:
        raise HeaderTooLong(f"{name} header of {len(out)} bytes is longer than the {limit} bytes {cdn} takes")
    return out


def surrogate_key(tags: Iterable[TagLike]) -> str:
    return header_value("fastly", tags)


def cache_tag(tags: Iterable[TagLike]) -> str:
    return header_value("cloudflare", tags)


def xkey(tags: Iterable[TagLike]) -> str:
    return header_value("varnish", tags)


_current: ContextVar[Optional[List[TagLike]]] = ContextVar("tiercache_edge_tags", default=None)


def add_tags(*tags: TagLike) -> None:
    """Adds tags to the response of the request being handled (no-op outside EdgeTagsMiddleware)."""
    current = _current.get()
    if current is not None:
        current.extend(tags)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class EdgeTagsMiddleware:
    """ASGI middleware: the tags added with :func:`add_tags` while a request is handled go out as the
    CDN's tag header (``cdn`` = "fastly", "cloudflare" or "varnish"), after ``always`` (e.g. the cache's
    namespace tag, so that a full purge of the namespace reaches every page)."""

    def __init__(self, app: ASGIApp, cdn: str = "varnish", always: Iterable[TagLike] = ()) -> None:
        if cdn not in CDNS:
            raise ValueError(f"unknown CDN {cdn!r}: one of {sorted(CDNS)}")
        self.app = app
        self.cdn = cdn
        self.always = list(always)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        tags: List[TagLike] = list(self.always)
        token = _current.set(tags)

        async def send_with_tags(message: Message) -> None:
            if message.get("type") == "http.response.start" and tags:
                name = CDNS[self.cdn][0].lower().encode()
                headers = [h for h in message.get("headers", []) if h[0].lower() != name]
                headers.append((name, header_value(self.cdn, tags).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_tags)
        finally:
            _current.reset(token)
