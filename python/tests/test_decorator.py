"""@cache.cached: key and tag templates bound from the signature, invalidate() and cache_key()."""

from __future__ import annotations

import pytest

from conftest import wait_for


def test_cached_function(make_cache, r):
    cache = make_cache()
    calls = []

    @cache.cached(ttl="30m", stale="1h", key="user:{user_id}:profile", tags=["user:{user_id}"])
    def user_profile(user_id: int, lang: str = "en") -> dict:
        calls.append(user_id)
        return {"id": user_id, "lang": lang}

    assert user_profile(42) == {"id": 42, "lang": "en"}
    assert user_profile(user_id=42) == {"id": 42, "lang": "en"}
    assert calls == [42]
    assert user_profile.cache_key(user_id=42) == "user:42:profile"
    assert user_profile.cache_key(42) == "user:42:profile"
    m = r.execute_command("TIERCACHE.META", "t:v1:user:42:profile")
    m = dict(zip(m[::2], m[1::2]))
    assert m[b"tags"] == [b"ns:t:v1", b"user:42"]
    assert 1_799_000 < m[b"fresh_ttl_ms"] <= 1_800_000
    assert m[b"stale_ttl_ms"] > 5_000_000
    assert user_profile.invalidate(user_id=42) == 1
    assert user_profile(42) == {"id": 42, "lang": "en"}
    assert calls == [42, 42]
    cache.invalidate_tags(["user:42"])
    user_profile(42)
    assert calls == [42, 42, 42]
    assert user_profile.__name__ == "user_profile"


def test_default_key_uses_every_argument(make_cache):
    cache = make_cache()

    @cache.cached(ttl=60)
    def add(a: int, b: int = 2) -> int:
        return a + b

    assert add(1) == 3
    assert add.cache_key(1) == f"{__name__}.test_default_key_uses_every_argument.<locals>.add:1:2"
    assert add(1, b=5) == 6


def test_template_errors_are_clear(make_cache):
    cache = make_cache()
    with pytest.raises(ValueError, match=r"uses \{uid\}, but f\(\) has no parameter 'uid'"):
        @cache.cached(key="user:{uid}")
        def f(user_id: int) -> int:
            return user_id

    @cache.cached(key="user:{user_id}:{section}")
    def g(user_id: int, section: str) -> str:
        return section

    with pytest.raises(TypeError, match=r"needs argument 'section'"):
        g.cache_key(user_id=1)
    with pytest.raises(TypeError, match=r"g\(\): missing a required argument: 'section'"):
        g(1)
    with pytest.raises(ValueError, match="argument names"):
        cache.cached(key="user:{}")(lambda x: x)


def test_attribute_and_index_fields(make_cache):
    cache = make_cache()

    class User:
        id = 7

    @cache.cached(key="u:{user.id}:{ids[0]}", tags=["user:{user.id}"])
    def f(user: User, ids: list) -> int:
        return user.id

    assert f.cache_key(User(), [3]) == "u:7:3"
    assert f(User(), [3]) == 7


def test_async_function_needs_the_async_cache(make_cache):
    cache = make_cache()
    with pytest.raises(TypeError, match="AsyncTierCache"):
        @cache.cached()
        async def f() -> int:
            return 1


def test_invalidate_reaches_other_processes(make_cache):
    a, b = make_cache(), make_cache()
    n = []

    def define(cache):
        @cache.cached(key="item:{item_id}")
        def item(item_id: int) -> int:
            n.append(1)
            return len(n)

        return item

    ia, ib = define(a), define(b)
    assert ia(1) == 1
    assert ib(1) == 1
    ia.invalidate(item_id=1)
    wait_for(lambda: "item:1" not in b._core._l1, what="the DEL push")
    assert ib(1) == 2
