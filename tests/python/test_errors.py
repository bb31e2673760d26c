"""Every error of SPEC.md, with its exact text, and that nothing is written when a command is refused."""

import pytest
import redis

from helpers import err_re, lz4_frame, meta, raises_exact, stable, stats, tc_get, tc_set

I64_MAX = "9223372036854775807"

WRONG_ARITY = "ERR wrong number of arguments for 'tiercache.set' command"
SYNTAX = "ERR syntax error"
NOT_INT = "ERR value is not an integer or out of range"
BAD_EXPIRE = "ERR invalid expire time in 'tiercache.set' command"
BAD_STALE = "ERR invalid stale time in 'tiercache.set' command"
STALE_NEEDS = "ERR STALE needs a fresh period: add EX, PX, EXAT or PXAT"
NUMTAGS_NEG = "ERR numtags must be a non-negative integer"
NUMTAGS_BIG = "ERR numtags is larger than the number of tags given"
TOO_MANY_TAGS = "ERR too many tags: at most 32 per entry (see tiercache.max-tags)"
EMPTY_TAG = "ERR tags must not be empty strings"
BAD_ENCODING = "ERR unknown encoding: expected raw or lz4"
BAD_CREATED = "ERR invalid CREATED time"
BAD_FRAME = "ERR invalid lz4 frame header"
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"

TAGS33 = [f"t{i}" for i in range(33)]

# (id, options after `key value`, error)
SET_OPTION_ERRORS = [
    # syntax: unknown / repeated / conflicting options, missing arguments, extra arguments
    ("unknown-option", ["BOGUS"], SYNTAX),
    ("get-option-on-set", ["ENCODED"], SYNTAX),
    ("ex-and-px", ["EX", 10, "PX", 10000], SYNTAX),
    ("ex-twice", ["EX", 10, "EX", 10], SYNTAX),
    ("exat-and-pxat", ["EXAT", 9999999999, "PXAT", 9999999999000], SYNTAX),
    ("px-and-exat", ["PX", 10, "EXAT", 9999999999], SYNTAX),
    ("stale-twice", ["EX", 10, "STALE", 1, "STALE", 1], SYNTAX),
    ("keepttl-twice", ["KEEPTTL", "KEEPTTL"], SYNTAX),
    ("keepttl-and-stale", ["EX", 10, "KEEPTTL", "STALE", 5], SYNTAX),
    ("stale-and-keepttl", ["EX", 10, "STALE", 5, "KEEPTTL"], SYNTAX),
    ("nocompress-and-encoding", ["NOCOMPRESS", "ENCODING", "raw"], SYNTAX),
    ("encoding-and-nocompress", ["ENCODING", "raw", "NOCOMPRESS"], SYNTAX),
    ("nocompress-twice", ["NOCOMPRESS", "NOCOMPRESS"], SYNTAX),
    ("encoding-twice", ["ENCODING", "raw", "ENCODING", "raw"], SYNTAX),
    ("tags-twice", ["TAGS", 1, "a", "TAGS", 1, "b"], SYNTAX),
    ("created-twice", ["CREATED", 1, "CREATED", 2], SYNTAX),
    ("extra-arg-after-tags", ["TAGS", 1, "a", "b"], SYNTAX),
    ("ex-missing-arg", ["EX"], SYNTAX),
    ("px-missing-arg", ["PX"], SYNTAX),
    ("exat-missing-arg", ["EXAT"], SYNTAX),
    ("pxat-missing-arg", ["PXAT"], SYNTAX),
    ("stale-missing-arg", ["EX", 10, "STALE"], SYNTAX),
    ("tags-missing-numtags", ["TAGS"], SYNTAX),
    ("encoding-missing-arg", ["ENCODING"], SYNTAX),
    ("created-missing-arg", ["CREATED"], SYNTAX),
    # not an integer
    ("ex-not-int", ["EX", "ten"], NOT_INT),
    ("px-float", ["PX", "1.5"], NOT_INT),
    ("exat-not-int", ["EXAT", "soon"], NOT_INT),
    ("pxat-empty", ["PXAT", ""], NOT_INT),
    ("ex-beyond-i64", ["EX", "9223372036854775808"], NOT_INT),
    ("stale-not-int", ["EX", 10, "STALE", "x"], NOT_INT),
    ("numtags-not-int", ["TAGS", "two", "a", "b"], NOT_INT),
    ("created-not-int", ["CREATED", "yesterday"], NOT_INT),
    # invalid expire time
    ("ex-zero", ["EX", 0], BAD_EXPIRE),
    ("px-zero", ["PX", 0], BAD_EXPIRE),
    ("ex-negative", ["EX", -1], BAD_EXPIRE),
    ("px-negative", ["PX", -5], BAD_EXPIRE),
    ("exat-zero", ["EXAT", 0], BAD_EXPIRE),
    ("pxat-negative", ["PXAT", -1], BAD_EXPIRE),
    ("ex-overflow", ["EX", I64_MAX], BAD_EXPIRE),
    ("exat-overflow", ["EXAT", I64_MAX], BAD_EXPIRE),
    ("px-overflow", ["PX", I64_MAX], BAD_EXPIRE),
    # invalid stale time
    ("stale-negative", ["EX", 10, "STALE", -1], BAD_STALE),
    ("stale-overflow", ["EX", 10, "STALE", I64_MAX], BAD_STALE),
    # STALE without a fresh period
    ("stale-without-fresh", ["STALE", 5], STALE_NEEDS),
    ("stale-without-fresh-with-tags", ["TAGS", 1, "t", "STALE", 1], STALE_NEEDS),
    # tags
    ("numtags-negative", ["TAGS", -1], NUMTAGS_NEG),
    ("numtags-too-large", ["TAGS", 3, "a", "b"], NUMTAGS_BIG),
    ("numtags-no-tags", ["TAGS", 1], NUMTAGS_BIG),
    ("too-many-tags", ["TAGS", 33, *TAGS33], TOO_MANY_TAGS),
    ("empty-tag", ["TAGS", 2, "a", ""], EMPTY_TAG),
    ("only-empty-tag", ["TAGS", 1, ""], EMPTY_TAG),
    # encoding
    ("encoding-gzip", ["ENCODING", "gzip"], BAD_ENCODING),
    ("encoding-empty", ["ENCODING", ""], BAD_ENCODING),
    # created
    ("created-negative", ["CREATED", -1], BAD_CREATED),
]


def snapshot(r):
    return {
        "dbsize": r.dbsize(),
        "k": stable(meta(r, b"k")),
        "k_value": tc_get(r, b"k", "ENCODED"),
        "k_pexpiretime": r.execute_command("PEXPIRETIME", b"k"),
        "entries": stats(r)["entries"],
    }


@pytest.mark.parametrize("opts,error", [c[1:] for c in SET_OPTION_ERRORS], ids=[c[0] for c in SET_OPTION_ERRORS])
def test_set_option_errors_write_nothing(r, opts, error):
    # on a missing key: stays missing
    with raises_exact(error):
        tc_set(r, b"new", b"value", *opts)
    assert r.exists(b"new") == 0
    # on an existing entry: left exactly as it was
    tc_set(r, b"k", b"old", "EX", 1000, "TAGS", 1, b"orig", "CREATED", 7)
    before = snapshot(r)
    with raises_exact(error):
        tc_set(r, b"k", b"value", *opts)
    assert snapshot(r) == before
    assert tc_get(r, b"k") == b"old"


@pytest.mark.parametrize("name", ["tiercache.set", "TIERCACHE.SET"])
@pytest.mark.parametrize("args", [[], [b"k"]], ids=["no-args", "key-only"])
def test_set_wrong_arity(r, name, args):
    with raises_exact(WRONG_ARITY):
        r.execute_command(name, *args)
    assert r.dbsize() == 0


@pytest.mark.parametrize(
    "bad",
    [b"", b"xy", b"\x05\x00\x00", b"\x05\x00\x00\x00", b"\x00\x10\x00\x00\x00"],
    ids=["empty", "2-bytes", "3-bytes", "header-no-payload", "4KiB-from-1-byte"],
)
def test_set_encoding_lz4_bad_frame_header(r, bad):
    with raises_exact(BAD_FRAME):
        tc_set(r, b"new", bad, "ENCODING", "lz4")
    assert r.exists(b"new") == 0
    tc_set(r, b"k", b"old")
    before = snapshot(r)
    with raises_exact(BAD_FRAME):
        tc_set(r, b"k", bad, "ENCODING", "lz4")
    assert snapshot(r) == before


def test_too_many_tags_counts_32_exactly(r):
    assert tc_set(r, b"k", b"v", "TAGS", 32, *TAGS33[:32]) == b"OK"
    with raises_exact(TOO_MANY_TAGS):
        tc_set(r, b"k2", b"v", "TAGS", 33, *TAGS33)
    assert r.exists(b"k2") == 0


def test_set_over_other_type_is_wrongtype(r):
    r.set(b"str", b"native")
    r.rpush(b"list", b"a")
    with raises_exact(WRONGTYPE):
        tc_set(r, b"str", b"v")
    with raises_exact(WRONGTYPE):
        tc_set(r, b"list", b"v", "EX", 10, "TAGS", 1, b"t")
    assert r.get(b"str") == b"native"
    assert r.type(b"str") == b"string"
    assert r.pttl(b"str") == -1
    assert r.lrange(b"list", 0, -1) == [b"a"]
    assert stats(r)["entries"] == 0


def test_set_wrongtype_keeps_ttl_of_other_key(r):
    r.set(b"str", b"native", ex=100)
    with raises_exact(WRONGTYPE):
        tc_set(r, b"str", b"v", "KEEPTTL")
    assert r.get(b"str") == b"native"
    assert 99 <= r.ttl(b"str") <= 100


def test_get_and_meta_on_other_type_are_wrongtype(r):
    r.set(b"str", b"native")
    r.hset(b"h", b"f", b"v")
    for key in (b"str", b"h"):
        with raises_exact(WRONGTYPE):
            tc_get(r, key)
        with raises_exact(WRONGTYPE):
            tc_get(r, key, "ENCODED")
        with raises_exact(WRONGTYPE):
            r.execute_command("TIERCACHE.META", key)


@pytest.mark.parametrize("opts", [["BOGUS"], ["ENCODED", "x"], ["NOCOMPRESS"]], ids=["bogus", "encoded-extra", "set-option"])
def test_get_unknown_option_is_syntax_error(r, opts):
    tc_set(r, b"k", b"v")
    with raises_exact(SYNTAX):
        tc_get(r, b"k", *opts)
    with raises_exact(SYNTAX):
        tc_get(r, b"missing", *opts)


def test_get_and_meta_wrong_arity(r):
    with pytest.raises(redis.ResponseError, match=r"^wrong number of arguments for 'tiercache\.get' command$"):
        r.execute_command("TIERCACHE.GET")
    with pytest.raises(redis.ResponseError, match=r"^wrong number of arguments for 'tiercache\.meta' command$"):
        r.execute_command("TIERCACHE.META")


def test_errors_are_exact_error_replies(r):
    """The raw error line (with its code) as the server sends it."""
    conn = r.connection_pool.get_connection()
    try:
        conn.send_command("TIERCACHE.SET", b"k", b"v", "EX", 0)
        with pytest.raises(redis.ResponseError) as e:
            conn.read_response()
    finally:
        r.connection_pool.release(conn)
    assert str(e.value) == BAD_EXPIRE[4:]
    assert e.type is redis.ResponseError


def test_valid_frame_still_accepted_after_errors(r):
    """Sanity check that the error cases above are errors because of the option, not the frame."""
    frame = lz4_frame(b"payload" * 100)
    assert tc_set(r, b"k", frame, "ENCODING", "lz4") == b"OK"
    assert tc_get(r, b"k") == b"payload" * 100


def test_err_re_helper():
    import re

    assert re.search(err_re("ERR syntax error"), "syntax error")
    assert not re.search(err_re("ERR syntax error"), "syntax error!")
