"""Module configs tiercache.compress-min-size, tiercache.max-tags and tiercache.max-value-size: defaults,
CONFIG GET/SET with bounds, their effect, and setting them as loadmodule args, on the command line and in
redis.conf."""

import pytest
import redis

from helpers import (
    compressible,
    config_get,
    lz4_frame,
    meta,
    normalise,
    raw_command,
    raises_exact,
    tc_get,
    tc_set,
)

CMS = "tiercache.compress-min-size"
MAX_TAGS = "tiercache.max-tags"
MVS = "tiercache.max-value-size"
DEFAULTS = {CMS: 1024, MAX_TAGS: 32, MVS: 64 << 20}


def too_large(n, limit):
    return f"ERR value too large: {n} bytes decoded, more than tiercache.max-value-size ({limit})"


def tags(n):
    return [f"t{i}".encode() for i in range(n)]


def test_defaults(r):
    assert config_get(r, CMS) == b"1024"
    assert config_get(r, MAX_TAGS) == b"32"
    assert config_get(r, MVS) == b"67108864"


def test_config_get_pattern_lists_all(r):
    d = normalise(raw_command(r, "CONFIG", "GET", "tiercache.*"))
    assert d == {
        CMS: b"1024",
        MAX_TAGS: b"32",
        MVS: b"67108864",
        "tiercache.reclaim-budget": b"1000",
        "tiercache.max-lease-ms": b"60000",
        "tiercache.max-wait-ms": b"60000",
        "tiercache.cluster-timeout-ms": b"5000",
        "tiercache.invalidation-channel": b"tiercache:invalidations",
    }


@pytest.mark.parametrize(
    "name,values",
    [(CMS, [0, 1, 4096, 536870912]), (MAX_TAGS, [0, 1, 8, 1024]), (MVS, [1024, 4096, 536870912])],
    ids=["compress-min-size", "max-tags", "max-value-size"],
)
def test_config_set_within_bounds(r, name, values):
    try:
        for v in values:
            assert r.config_set(name, v)
            assert config_get(r, name) == str(v).encode()
    finally:
        r.config_set(name, DEFAULTS[name])


@pytest.mark.parametrize(
    "name,bad",
    [
        (CMS, [-1, 536870913, "abc", "1.5", ""]),
        (MAX_TAGS, [-1, 1025, "many", "99999999999999999999"]),
        (MVS, [0, 1023, 536870913, "64mb", ""]),
    ],
    ids=["compress-min-size", "max-tags", "max-value-size"],
)
def test_config_set_out_of_range_is_refused(r, name, bad):
    keep = 2000 if name == MVS else 77
    try:
        r.config_set(name, keep)
        for v in bad:
            with pytest.raises(redis.ResponseError):
                r.config_set(name, v)
            assert config_get(r, name) == str(keep).encode(), v
    finally:
        r.config_set(name, DEFAULTS[name])


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


def test_max_value_size_refuses_a_decompression_bomb(r):
    """A 2 MiB lz4 frame announcing 512 MiB is refused by its header before anything is decoded, and
    the key keeps its old value."""
    bomb = lz4_frame(bytes(512 << 20))
    assert len(bomb) < 3 << 20
    tc_set(r, b"k", b"old")
    with raises_exact(too_large(512 << 20, 64 << 20)):
        tc_set(r, b"k", bomb, "ENCODING", "lz4")
    assert tc_get(r, b"k") == b"old"


def test_max_value_size_config_applies(r):
    try:
        r.config_set(MVS, 1024)
        assert tc_set(r, b"ok", b"x" * 1024, "NOCOMPRESS") == b"OK"
        assert tc_set(r, b"okz", lz4_frame(b"z" * 1024), "ENCODING", "lz4") == b"OK"
        for value, opts in [
            (compressible(1025), ()),
            (b"x" * 1025, ("NOCOMPRESS",)),
            (b"x" * 1025, ("ENCODING", "raw")),
            (lz4_frame(b"z" * 1025), ("ENCODING", "lz4")),
        ]:
            with raises_exact(too_large(1025, 1024)):
                tc_set(r, b"bad", value, *opts)
            assert r.exists(b"bad") == 0, opts
    finally:
        r.config_set(MVS, DEFAULTS[MVS])
    assert tc_set(r, b"bad", compressible(1025)) == b"OK"


def test_max_value_size_on_the_command_line_and_in_redis_conf(start_server, module, tmp_path):
    conf = tmp_path / "redis.conf"
    conf.write_text(f"loadmodule {module}\ntiercache.max-value-size 2048\n")
    for srv in [
        start_server(args=["--tiercache.max-value-size", "2048"], name="mvs-cmdline"),
        start_server(module_args=["max-value-size", "2048"], name="mvs-modargs"),
        start_server(name="mvs-conf", load_module=False, config_file=conf),
    ]:
        c = srv.client(protocol=3)
        assert config_get(c, MVS) == b"2048"
        assert tc_set(c, b"k", b"x" * 2048) == b"OK"
        with raises_exact(too_large(2049, 2048)):
            tc_set(c, b"k", b"x" * 2049)


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
        ["max-value-size", "1023"],
        ["max-value-size", "536870913"],
    ],
    ids=["unknown-name", "max-tags-too-big", "max-tags-negative", "cms-too-big", "cms-not-int", "mvs-too-small", "mvs-too-big"],
)
def test_bad_loadmodule_args_refuse_to_load(start_server, module_args):
    srv = start_server(module_args=module_args, name="badargs", start=False)
    srv.spawn()
    code = srv.wait_exit(timeout=15)
    assert code is not None, f"redis-server kept running with module args {module_args}"
    assert code != 0


def test_cluster_timeout_config_bounds(r):
    name = "tiercache.cluster-timeout-ms"
    try:
        for v in (1, 300, 600000):
            assert r.config_set(name, v)
            assert config_get(r, name) == str(v).encode()
        for bad in (0, -1, 600001, "5s", ""):
            with pytest.raises(redis.ResponseError):
                r.config_set(name, bad)
            assert config_get(r, name) == b"600000", bad
    finally:
        r.config_set(name, 5000)
