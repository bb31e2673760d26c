"""Shared helpers for the tiercache integration tests (imported by the test modules)."""

from __future__ import annotations

import re
import struct
import time
from contextlib import contextmanager

import lz4.block
import pytest
import redis

# Field names and their order, exactly as SPEC.md lists them.
META_FIELDS = [
    "state",
    "fresh_ttl_ms",
    "stale_ttl_ms",
    "fresh_until_ms",
    "expire_at_ms",
    "tags",
    "encoding",
    "size",
    "stored_size",
    "created_ms",
]
STATS_FIELDS = [
    "entries",
    "compressed_entries",
    "bytes_original",
    "bytes_stored",
    "hits",
    "misses",
    "sets",
    "tags",
    "tag_index_entries",
    "index_longest_op_us",
    "index_longest_op_steps",
    "invalidations",
    "invalidation_messages",
    "reclaim_pending",
    "reclaimed",
    "reclaim_ticks",
    "reclaim_max_tick_us",
    "stale_served",
    "leases",
    "lease_waiters",
    "lease_timers",
    "leases_granted",
    "waiters_parked",
    "waiters_woken",
    "wait_timeouts",
    "handoffs",
    "lease_timeouts",
    "passes",
    "fenced",
    "early_refreshes",
    "cluster_pending",
    "cluster_timeouts",
]
# META fields that do not move with the clock (the *_ttl_ms fields count down).
STABLE_META_FIELDS = [f for f in META_FIELDS if f not in ("fresh_ttl_ms", "stale_ttl_ms")]

DEFAULT_COMPRESS_MIN_SIZE = 1024
DEFAULT_MAX_TAGS = 32


def now_ms() -> int:
    return int(time.time() * 1000)


def lz4_frame(value: bytes) -> bytes:
    """The tiercache lz4 frame: 4-byte little-endian original length + one raw lz4 block."""
    return struct.pack("<I", len(value)) + lz4.block.compress(value, store_size=False)


def lz4_unframe(frame: bytes) -> bytes:
    (size,) = struct.unpack("<I", frame[:4])
    return lz4.block.decompress(frame[4:], uncompressed_size=size)


def protocol_of(r: redis.Redis) -> int:
    return int(r.connection_pool.connection_kwargs.get("protocol") or 2)


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def pairs_to_dict(reply, fields: list[str], protocol: int) -> dict:
    """Checks the raw shape of a name/value reply (flat array under RESP2, map under RESP3, names in
    `fields` order) and returns it as a dict with str keys (values untouched)."""
    if protocol == 3:
        assert isinstance(reply, dict), f"RESP3 reply should be a map, got {type(reply).__name__}: {reply!r}"
        names = [_text(k) for k in reply.keys()]
        assert names == fields, f"field names/order: {names}"
        return {_text(k): v for k, v in reply.items()}
    assert isinstance(reply, list), f"RESP2 reply should be a flat array, got {type(reply).__name__}: {reply!r}"
    assert len(reply) == 2 * len(fields), f"flat array of {len(reply)} elements: {reply!r}"
    names = [_text(k) for k in reply[0::2]]
    assert names == fields, f"field names/order: {names}"
    return dict(zip(names, reply[1::2]))


def normalise(reply) -> dict | None:
    """Turns a name/value reply (flat list or map) into a dict with str keys, without shape checks."""
    if reply is None:
        return None
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(k): v for k, v in zip(reply[0::2], reply[1::2])}


def meta(r: redis.Redis, key) -> dict | None:
    """TIERCACHE.META as a dict (None for a missing key), after checking the raw shape for the client's
    protocol and the type of every field."""
    raw = r.execute_command("TIERCACHE.META", key)
    if raw is None:
        return None
    m = pairs_to_dict(raw, META_FIELDS, protocol_of(r))
    assert m["state"] in (b"fresh", b"stale"), m
    assert m["encoding"] in (b"raw", b"lz4"), m
    for f in ("fresh_ttl_ms", "stale_ttl_ms", "fresh_until_ms", "expire_at_ms", "size", "stored_size", "created_ms"):
        assert isinstance(m[f], int) and not isinstance(m[f], bool), (f, m[f])
    assert isinstance(m["tags"], list), m
    assert all(isinstance(t, bytes) for t in m["tags"]), m
    return m


def stable(m: dict | None) -> dict | None:
    """The META fields that must survive a reload/restart/replication unchanged."""
    if m is None:
        return None
    return {k: m[k] for k in STABLE_META_FIELDS}


def stats(r: redis.Redis) -> dict:
    raw = r.execute_command("TIERCACHE.STATS")
    s = pairs_to_dict(raw, STATS_FIELDS, protocol_of(r))
    for k, v in s.items():
        assert isinstance(v, int) and v >= 0, (k, v)
    return s


def raw_command(r: redis.Redis, *args):
    """Sends a command on a pool connection and returns the parser's reply, bypassing redis-py's
    per-command response callbacks (INFO, CONFIG GET, ... are otherwise post-processed)."""
    conn = r.connection_pool.get_connection()
    try:
        conn.send_command(*args)
        return conn.read_response()
    finally:
        r.connection_pool.release(conn)


def info_text(r: redis.Redis, section: str) -> str:
    reply = raw_command(r, "INFO", section)
    if hasattr(reply, "decode"):
        return reply.decode()
    return str(reply)


def info_section(r: redis.Redis, section: str) -> dict[str, str]:
    out = {}
    for line in info_text(r, section).splitlines():
        if line and not line.startswith("#") and ":" in line:
            k, v = line.split(":", 1)
            out[k] = v
    return out


def tc_set(r: redis.Redis, key, value, *opts):
    return r.execute_command("TIERCACHE.SET", key, value, *opts)


def tc_get(r: redis.Redis, key, *opts):
    return r.execute_command("TIERCACHE.GET", key, *opts)


def get_encoded(r: redis.Redis, key):
    reply = r.execute_command("TIERCACHE.GET", key, "ENCODED")
    if reply is None:
        return None
    assert isinstance(reply, list) and len(reply) == 2, reply
    return reply


def config_get(r: redis.Redis, name: str) -> bytes:
    reply = raw_command(r, "CONFIG", "GET", name)
    d = normalise(reply)
    assert name in d, d
    return d[name]


def err_re(message: str) -> str:
    """An anchored regex for an error line as redis-py reports it (redis-py strips the 'ERR ' code)."""
    if message.startswith("ERR "):
        message = message[4:]
    return "^" + re.escape(message) + "$"


@contextmanager
def raises_exact(message: str, exc=redis.ResponseError):
    with pytest.raises(exc, match=err_re(message)) as info:
        yield info


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def compressible(n: int) -> bytes:
    """n bytes of JSON-ish text that lz4 shrinks well."""
    chunk = b'{"id":12345,"name":"tiercache","tags":["a","b"],"active":true},'
    return (chunk * (n // len(chunk) + 1))[:n]


def incompressible(n: int, seed: int = 1) -> bytes:
    """n deterministic pseudo-random bytes (xorshift) that lz4 cannot shrink."""
    x = (0x9E3779B97F4A7C15 ^ seed) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while len(out) < n:
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        out += x.to_bytes(8, "little")
    return bytes(out[:n])


def pexpiretime(r: redis.Redis, key) -> int:
    return r.execute_command("PEXPIRETIME", key)


def populate(r, r_db1):
    """A varied set of entries; returns the keys per db."""
    at = now_ms() + 3_600_000
    tc_set(r, b"plain", b"hello")
    tc_set(r, b"tagged", b"v", "TAGS", 3, b"a", b"\x00b", b"\xff")
    tc_set(r, b"ttl", b"v", "EX", 1000, "STALE", 60)
    tc_set(r, b"pxat", b"v", "PXAT", at, "STALE", 5, "CREATED", 1234)
    tc_set(r, b"comp", compressible(5000), "TAGS", 1, b"c")
    tc_set(r, b"frame", lz4_frame(compressible(3000)), "ENCODING", "lz4")
    tc_set(r, b"nocomp", compressible(5000), "NOCOMPRESS")
    tc_set(r, b"noise", incompressible(3000))
    tc_set(r, b"bin\x00key\xff", b"\x00\xff\x00", "TAGS", 1, b"\x00")
    tc_set(r, b"empty", b"")
    tc_set(r, b"stale", b"old", "PX", 50, "STALE", 100)
    tc_set(r, b"keep", b"v1", "EX", 500)
    tc_set(r, b"keep", b"v2", "PX", 200_000, "KEEPTTL")
    tc_set(r, b"expired-later", b"v")
    r.expire(b"expired-later", 900)
    tc_set(r, b"persisted", b"v", "EX", 900, "STALE", 10)
    r.persist(b"persisted")
    tc_set(r_db1, b"db1", b"in db 1", "TAGS", 1, b"one", "EX", 800)
    r.set(b"native", b"string")
    time.sleep(0.1)  # b"stale" is now stale
    return {0: [b"plain", b"tagged", b"ttl", b"pxat", b"comp", b"frame", b"nocomp", b"noise", b"bin\x00key\xff",
                b"empty", b"stale", b"keep", b"expired-later", b"persisted"],
            1: [b"db1"]}


def capture(clients: dict, keys: dict):
    """Everything that must survive a reload: stable META fields, GET, GET ENCODED, TTL, per key."""
    out = {}
    for db, ks in keys.items():
        c = clients[db]
        for k in ks:
            m = meta(c, k)
            assert m is not None, f"db {db} key {k!r} is missing"
            out[(db, k)] = {
                "meta": stable(m),
                "get": tc_get(c, k, "ENCODED"),
                "value": c.execute_command("TIERCACHE.GET", k),
                "pexpiretime": pexpiretime(c, k),
                "type": c.type(k),
            }
    return out




# ---- tag invalidation (TAGS.md) -----------------------------------------------------------------------

DEFAULT_RECLAIM_BUDGET = 1000
DEFAULT_INVALIDATION_CHANNEL = b"tiercache:invalidations"


def tc_invalidate(r: redis.Redis, *tags):
    """TIERCACHE.INVALIDATE: the reply is the sum over the distinct tags of the entries indexed under each
    (an entry under two of the tags counts twice), not the number of distinct entries."""
    return r.execute_command("TIERCACHE.INVALIDATE", *tags)


def tc_tagcount(r: redis.Redis, tag):
    return r.execute_command("TIERCACHE.TAGCOUNT", tag)


def tc_tagkeys(r: redis.Redis, tag, *opts):
    return r.execute_command("TIERCACHE.TAGKEYS", tag, *opts)


def wait_reclaim_done(r: redis.Redis, timeout: float = 15.0) -> dict:
    """Polls TIERCACHE.STATS until reclaim_pending is 0; returns those stats."""
    last = {}

    def done():
        last["s"] = stats(r)
        return last["s"]["reclaim_pending"] == 0

    wait_for(done, timeout=timeout, interval=0.02, what="reclaim_pending == 0")
    return last["s"]


def db_count(r: redis.Redis) -> int:
    return int(config_get(r, "databases"))


def db_client(r: redis.Redis, db: int) -> redis.Redis:
    """A new client like `r` (same server and protocol) on database `db`; the caller closes it."""
    kw = dict(r.connection_pool.connection_kwargs)
    kw["db"] = db
    return redis.Redis(connection_pool=redis.ConnectionPool(**kw))


def live_tag_index(r: redis.Redis) -> dict[int, dict[bytes, set]]:
    """What the tag index should hold, computed from the keyspace: per db, tag -> keys of the live
    tiercache entries (SCAN every db, TIERCACHE.META non-nil) carrying it."""
    out: dict[int, dict[bytes, set]] = {}
    for db in range(db_count(r)):
        c = db_client(r, db)
        try:
            keys = list(c.scan_iter(count=1000))
            index: dict[bytes, set] = {}
            if keys:
                p = c.pipeline(transaction=False)
                for k in keys:
                    p.execute_command("TIERCACHE.META", k)
                for k, raw in zip(keys, p.execute(raise_on_error=False)):
                    if raw is None or isinstance(raw, redis.ResponseError):  # invalidated / other type
                        continue
                    for t in normalise(raw)["tags"]:
                        index.setdefault(t, set()).add(k)
            if index:
                out[db] = index
        finally:
            c.close()
    return out


def assert_tag_index_exact(r: redis.Redis, also_tags=(), timeout: float = 15.0) -> dict[int, dict[bytes, set]]:
    """Waits for reclaim_pending == 0, then checks TAGS.md "Index must stay exact": TAGCOUNT/TAGKEYS of
    every live tag (and of `also_tags`, e.g. tags that should be gone) in every db agree with the keys,
    tag_index_entries == sum over live entries of their number of tags, tags == number of distinct tags
    on live entries (over all dbs). Returns the computed index."""
    wait_reclaim_done(r, timeout=timeout)
    expected = live_tag_index(r)
    for db in range(db_count(r)):
        want = expected.get(db, {})
        tags = set(want) | set(also_tags)
        if not tags:
            continue
        c = db_client(r, db)
        try:
            for t in sorted(tags):
                keys = want.get(t, set())
                assert tc_tagcount(c, t) == len(keys), f"TAGCOUNT {t!r} in db {db}: want {len(keys)}"
                got = tc_tagkeys(c, t, "COUNT", len(keys) + 100)
                assert isinstance(got, list), got
                assert sorted(got) == sorted(keys), f"TAGKEYS {t!r} in db {db}"
        finally:
            c.close()
    s = stats(r)
    summary = {db: {t: len(ks) for t, ks in index.items()} for db, index in expected.items()}
    entries = sum(len(ks) for index in expected.values() for ks in index.values())
    assert s["tag_index_entries"] == entries, f"tag_index_entries {s['tag_index_entries']} != {entries}: {summary}"
    # A tag is indexed per database: `tags` counts (db, tag) pairs.
    pairs = sum(len(index) for index in expected.values())
    assert s["tags"] == pairs, f"tags {s['tags']} != {pairs} (db, tag) pairs: {summary}"
    return expected


# ---- fill leases (LEASES.md) ---------------------------------------------------------------------------

LEASE_STATUSES = (b"HIT", b"STALE", b"FILL", b"BUSY", b"PASS")
# The lease counters of TIERCACHE.STATS / INFO tiercache (gauges first).
LEASE_GAUGES = ["leases", "lease_waiters", "lease_timers"]
# The lease part of STATS_FIELDS (from stale_served on), without the gauges.
LEASE_COUNTERS = [f for f in STATS_FIELDS[STATS_FIELDS.index("stale_served"):STATS_FIELDS.index("cluster_pending")] if f not in LEASE_GAUGES]
FENCED_NOT_HELD = "FENCED the lease is not held by this token (expired, released or re-granted)"
FENCED_KEY = "FENCED the key was written or deleted after the lease was granted"
FENCED_TAG = "FENCED a tag of this entry was invalidated after the lease was granted"
LEASE_ON_REPLICA = "ERR leases are granted by the master: send TIERCACHE.GET ... LEASE to the master"
BAD_LEASE = "ERR LEASE must be a positive number of milliseconds"
BAD_WAIT = "ERR WAIT must be a positive number of milliseconds"
BAD_BETA = "ERR BETA must be a positive number"
BAD_TOKEN = "ERR invalid lease token"

_TOKEN_RE = re.compile(rb"[1-9][0-9]*")


def lease_args(key, lease=5000, wait=None, beta=None, encoded=False) -> list:
    """The arguments of `TIERCACHE.GET key [ENCODED] LEASE ms [WAIT ms] [BETA b]`."""
    args = ["TIERCACHE.GET", key]
    if encoded:
        args.append("ENCODED")
    args += ["LEASE", lease]
    if wait is not None:
        args += ["WAIT", wait]
    if beta is not None:
        args += ["BETA", beta]
    return args


def check_lease_reply(reply, encoded=False) -> list:
    """Checks the shape of a lease read's reply: a list (RESP2 and RESP3) of [status, value, token] (+ the
    encoding with ENCODED); value/token bulk or nil, a token a positive decimal u64. Returns the reply."""
    n = 4 if encoded else 3
    assert isinstance(reply, list) and len(reply) == n, f"want a {n}-element list, got {reply!r}"
    status, value, token = reply[:3]
    assert status in LEASE_STATUSES, reply
    assert value is None or isinstance(value, bytes), reply
    if token is not None:
        assert isinstance(token, bytes) and _TOKEN_RE.fullmatch(token) and int(token) < 2**64, reply
    if encoded:
        assert reply[3] in (None, b"raw", b"lz4"), reply
        assert (reply[3] is None) == (value is None), f"encoding must be nil exactly when there is no value: {reply!r}"
    return reply


def lease_get(c, key, lease=5000, wait=None, beta=None, encoded=False) -> list:
    """A lease read on `c` (redis.Redis or LeaseConn); the reply after check_lease_reply."""
    args = lease_args(key, lease, wait, beta, encoded)
    reply = c.call(*args) if isinstance(c, LeaseConn) else c.execute_command(*args)
    return check_lease_reply(reply, encoded)


def tc_release(c, key, token, *opts):
    args = ["TIERCACHE.RELEASE", key, token, *opts]
    return c.call(*args) if isinstance(c, LeaseConn) else c.execute_command(*args)


class LeaseConn:
    """One dedicated connection to the server of `r` (same protocol, db unless given): its own client id,
    so a lease granted on it lives until it is released, filled, expires or close() drops the connection.
    send() does not wait for the reply, so a parked read does not block the test thread: read() later."""

    def __init__(self, r: redis.Redis, db: int | None = None, socket_timeout: float = 30):
        kw = dict(r.connection_pool.connection_kwargs)
        kw["socket_timeout"] = socket_timeout
        if db is not None:
            kw["db"] = db
        self.protocol = int(kw.get("protocol") or 2)
        self.conn = redis.Connection(**kw)
        self.conn.connect()
        self.closed = False

    def send(self, *args):
        self.conn.send_command(*args)

    def ready(self, timeout: float = 0.0) -> bool:
        """True when a reply is waiting (within `timeout` seconds)."""
        return bool(self.conn.can_read(timeout=timeout))

    def read(self, timeout: float = 10.0):
        if not self.conn.can_read(timeout=timeout):
            raise AssertionError(f"no reply within {timeout}s")
        return self.conn.read_response()

    def read_lease(self, timeout: float = 10.0, encoded: bool = False) -> list:
        return check_lease_reply(self.read(timeout), encoded)

    def call(self, *args, timeout: float = 10.0):
        self.send(*args)
        return self.read(timeout)

    def park(self, key, lease=5000, wait=5000, encoded=False):
        """Sends a lease read with WAIT without reading the reply."""
        self.send(*lease_args(key, lease, wait, None, encoded))

    def client_id(self) -> int:
        return self.call("CLIENT", "ID")

    def close(self):
        if not self.closed:
            self.closed = True
            self.conn.disconnect()


def lease_counters(r: redis.Redis) -> dict:
    s = stats(r)
    return {k: s[k] for k in LEASE_GAUGES + LEASE_COUNTERS}


def counter_delta(after: dict, before: dict) -> dict:
    """Per counter of LEASE_COUNTERS (plus hits/misses when present): after - before, zeros dropped."""
    names = LEASE_COUNTERS + [k for k in ("hits", "misses") if k in after and k in before]
    return {k: after[k] - before[k] for k in names if after[k] != before[k]}


def blocked_clients(r: redis.Redis) -> int:
    return int(info_section(r, "clients")["blocked_clients"])


def wait_lease_waiters(r: redis.Redis, n: int, timeout: float = 5.0):
    """Waits until exactly `n` reads are parked (lease_waiters gauge and INFO blocked_clients)."""
    last = {}

    def ok():
        last["w"] = stats(r)["lease_waiters"]
        last["b"] = blocked_clients(r)
        return last["w"] == n and last["b"] == n

    try:
        wait_for(ok, timeout=timeout, interval=0.005, what=f"{n} parked waiters")
    except AssertionError as e:
        raise AssertionError(f"{e}: lease_waiters={last.get('w')} blocked_clients={last.get('b')}") from None


def assert_no_lease_leak(r: redis.Redis, timeout: float = 5.0):
    """LEASES.md "No leak": once settled, leases == 0, lease_waiters == 0, lease_timers == 0 (no timer
    outlives its lease or its parked read) and blocked_clients == 0."""
    last = {}

    def settled():
        s = stats(r)
        last.update(
            leases=s["leases"],
            lease_waiters=s["lease_waiters"],
            lease_timers=s["lease_timers"],
            blocked_clients=blocked_clients(r),
        )
        return all(v == 0 for v in last.values())

    try:
        wait_for(settled, timeout=timeout, interval=0.02, what="no leases, no waiters, no blocked clients")
    except AssertionError as e:
        raise AssertionError(f"{e}: {last}") from None
