"""Module configs tiercache.compress-min-size and tiercache.max-tags: defaults, CONFIG GET/SET with bounds,
their effect, and setting them as loadmodule args, on the command line and in redis.conf."""

import pytest
import redis

from helpers import compressible, config_get, meta, normalise, raw_command, raises_exact, tc_get, tc_set

CMS = "tiercache.compress-min-size"
MAX_TAGS = "tiercache.max-tags"


def tags(n):
    return [f"t{i}".encode() for i in range(n)]


def test_defaults(r):
    assert config_get(r, CMS) == b"1024"
    assert config_get(r, MAX_TAGS) == b"32"


def test_config_get_pattern_lists_all(r):
    d = normalise(raw_command(r, "CONFIG", "GET", "tiercache.*"))
    assert d == {
        CMS: b"1024",
        MAX_TAGS: b"32",
        "tiercache.reclaim-budget": b"1000",
        "tiercache.max-lease-ms": b"60000",
        "tiercache.max-wait-ms": b"60000",
        "tiercache.invalidation-channel": b"tiercache:invalidations",
    }


@pytest.mark.parametrize(
    "name,values",
    [(CMS, [0, 1, 4096, 536870912]), (MAX_TAGS, [0, 1, 8, 1024])],
    ids=["compress-min-size", "max-tags"],
)
def test_config_set_within_bounds(r, name, values):
    try:
        for v in values:
            assert r.config_set(name, v)
            assert config_get(r, name) == str(v).encode()
    finally:
        r.config_set(name, 1024 if name == CMS else 32)


@pytest.mark.parametrize(
    "name,bad",
    [(CMS, [-1, 536870913, "abc", "1.5", ""]), (MAX_TAGS, [-1, 1025, "many", "99999999999999999999"])],
    ids=["compress-min-size", "max-tags"],
)
def test_config_set_out_of_range_is_refused(r, name, bad):
    try:
        r.config_set(name, 77)
        for v in bad:
            with pytest.raises(redis.ResponseError):
                r.config_set(name, v)
            assert config_get(r, name) == b"77", v
    finally:
        r.config_set(name, 1024 if name == CMS else 32)


def test_unknown_config_is_refused(r):
    with pytest.raises(redis.ResponseError):
        r.config_set("tiercache.no-such-option", 1)


def test_max_tags_config_applies(r):
    try:
        r.config_set(MAX_TAGS, 2)
        assert tc_set(r, b"ok", b"v", "TAGS", 2, b"a", b"b") == b"OK"
        with raises_exact("ERR too many tags: at most 2 per entry (see tiercache.max-tags)"):
            tc_set(r, b"bad", b"v", "TAGS", 3, b"a", b"b", b"c")
        assert r.exists(b"bad") == 0
        r.config_set(MAX_TAGS, 0)
        assert tc_set(r, b"none", b"v", "TAGS", 0) == b"OK"
        assert tc_set(r, b"none2", b"v") == b"OK"
        with raises_exact("ERR too many tags: at most 0 per entry (see tiercache.max-tags)"):
            tc_set(r, b"bad", b"v", "TAGS", 1, b"a")
        # entries stored under the old limit keep their tags
        assert meta(r, b"ok")["tags"] == [b"a", b"b"]
        r.config_set(MAX_TAGS, 40)
        assert tc_set(r, b"forty", b"v", "TAGS", 40, *tags(40)) == b"OK"
        assert meta(r, b"forty")["tags"] == tags(40)
    finally:
        r.config_set(MAX_TAGS, 32)


def test_compress_min_size_max_never_compresses_normal_values(r):
    try:
        r.config_set(CMS, 536870912)
        tc_set(r, b"k", compressible(100_000))
        assert meta(r, b"k")["encoding"] == b"raw"
    finally:
        r.config_set(CMS, 1024)


@pytest.mark.parametrize(
    "module_args",
    [
        ["compress-min-size", "64", "max-tags", "8"],
        ["tiercache.compress-min-size", "64", "tiercache.max-tags", "8"],
        ["max-tags", "8", "tiercache.compress-min-size", "64"],
    ],
    ids=["short-names", "full-names", "mixed"],
)
def test_loadmodule_args(start_server, module_args):
    srv = start_server(module_args=module_args, name="modargs")
    c = srv.client(protocol=2)
    assert config_get(c, CMS) == b"64"
    assert config_get(c, MAX_TAGS) == b"8"
    tc_set(c, b"k", b"x" * 64)
    assert meta(c, b"k")["encoding"] == b"lz4"
    tc_set(c, b"j", b"x" * 63)
    assert meta(c, b"j")["encoding"] == b"raw"
    with raises_exact("ERR too many tags: at most 8 per entry (see tiercache.max-tags)"):
        tc_set(c, b"t", b"v", "TAGS", 9, *tags(9))


def test_command_line_config(start_server):
    srv = start_server(args=["--tiercache.compress-min-size", "10", "--tiercache.max-tags", "3"], name="cmdline")
    c = srv.client(protocol=3)
    assert config_get(c, CMS) == b"10"
    assert config_get(c, MAX_TAGS) == b"3"
    with raises_exact("ERR too many tags: at most 3 per entry (see tiercache.max-tags)"):
        tc_set(c, b"t", b"v", "TAGS", 4, *tags(4))


def test_redis_conf_config(start_server, module, tmp_path):
    conf = tmp_path / "redis.conf"
    conf.write_text(f"loadmodule {module}\ntiercache.max-tags 7\ntiercache.compress-min-size 2048\n")
    srv = start_server(name="conf", load_module=False, config_file=conf)
    c = srv.client(protocol=2)
    assert config_get(c, MAX_TAGS) == b"7"
    assert config_get(c, CMS) == b"2048"
    tc_set(c, b"k", compressible(2047))
    assert meta(c, b"k")["encoding"] == b"raw"
    tc_set(c, b"k", compressible(2048))
    assert meta(c, b"k")["encoding"] == b"lz4"
    assert tc_get(c, b"k") == compressible(2048)


@pytest.mark.parametrize(
    "module_args",
    [
        ["no-such-config", "1"],
        ["max-tags", "1025"],
        ["max-tags", "-1"],
        ["compress-min-size", "536870913"],
        ["compress-min-size", "lots"],
    ],
    ids=["unknown-name", "max-tags-too-big", "max-tags-negative", "cms-too-big", "cms-not-int"],
)
def test_bad_loadmodule_args_refuse_to_load(start_server, module_args):
    srv = start_server(module_args=module_args, name="badargs", start=False)
    srv.spawn()
    code = srv.wait_exit(timeout=15)
    assert code is not None, f"redis-server kept running with module args {module_args}"
    assert code != 0
