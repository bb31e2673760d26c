"""CDN tag headers: the same keys as the Rust client's edge module and the purger (the vectors below are
client/src/edge.rs's unit-test vectors), and the ASGI middleware end to end on a bare ASGI app."""

from __future__ import annotations

import asyncio
from typing import Any, Dict, List

import pytest

from tiercache import edge


def test_keys_match_the_rust_client():
    assert edge.edge_key("user:42") == "user:42"
    assert edge.edge_key(b"a-b_c.d/e~!\"#$&'()*+;<=>?@[\\]^`{|}") == "a-b_c.d/e~!\"#$&'()*+;<=>?@[\\]^`{|}"
    assert edge.edge_key("a b") == "a%20b"
    assert edge.edge_key("a,b") == "a%2Cb"
    assert edge.edge_key("50%") == "50%25"
    assert edge.edge_key(b"\0\xff\n") == "%00%FF%0A"
    assert edge.edge_key("é") == "%C3%A9"
    assert edge.edge_key("a%2Cb") != edge.edge_key("a,b")
    assert edge.edge_key(b"") == "tc~%016x" % 0xCBF29CE484222325
    assert edge.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert edge.fnv1a64(b"foobar") == 0x85944171F73967E8
    long = b"x" * (edge.MAX_KEY_LEN + 1)
    assert edge.edge_key(long).startswith("tc~") and len(edge.edge_key(long)) == 19
    assert len(edge.edge_key(b"x" * edge.MAX_KEY_LEN)) == edge.MAX_KEY_LEN
    assert edge.edge_key(b" " * 400).startswith("tc~")


def test_header_values_per_cdn():
    tags = ["user:42", "team 7", "user:42", "ns:app:v1"]
    assert edge.surrogate_key(tags) == "user:42 team%207 ns:app:v1"
    assert edge.cache_tag(tags) == "user:42,team%207,ns:app:v1"
    assert edge.xkey(tags) == "user:42 team%207 ns:app:v1"
    assert edge.xkey([b"\x01", b"ok"]) == "%01 ok"
    many = ["tag:%05d" % i for i in range(1000)]
    assert len(edge.surrogate_key(many)) == 9999
    with pytest.raises(edge.HeaderTooLong, match="xkey header of 9999 bytes"):
        edge.xkey(many)


async def _app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    edge.add_tags("user:42", "team 7")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def _run(mw: edge.EdgeTagsMiddleware) -> List[Dict[str, Any]]:
    sent: List[Dict[str, Any]] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(dict(message))

    asyncio.run(mw({"type": "http", "method": "GET", "path": "/"}, receive, send))
    return sent


@pytest.mark.parametrize(
    "cdn,name,value",
    [
        ("varnish", b"xkey", b"ns:app:v1 user:42 team%207"),
        ("fastly", b"surrogate-key", b"ns:app:v1 user:42 team%207"),
        ("cloudflare", b"cache-tag", b"ns:app:v1,user:42,team%207"),
    ],
)
def test_asgi_middleware_sets_the_header(cdn, name, value):
    sent = _run(edge.EdgeTagsMiddleware(_app, cdn=cdn, always=["ns:app:v1"]))
    start = sent[0]
    assert (name, value) in start["headers"], start["headers"]
    assert (b"content-type", b"text/plain") in start["headers"]
    assert sent[1]["body"] == b"hello"
    # Outside a request, add_tags does nothing (and leaks nothing into the next request).
    edge.add_tags("stray")
    sent = _run(edge.EdgeTagsMiddleware(_app, cdn=cdn))
    assert not any(b"stray" in v for _, v in sent[0]["headers"])


def test_unknown_cdn_is_refused():
    with pytest.raises(ValueError, match="unknown CDN"):
        edge.EdgeTagsMiddleware(_app, cdn="akamai")
