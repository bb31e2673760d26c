"""Fill leases for stampede protection (spec/LEASES.md): TIERCACHE.GET ... LEASE ms [WAIT ms] [BETA b],
TIERCACHE.SET ... LEASE token, TIERCACHE.RELEASE key token [PASS]: one fill per miss across processes,
parked waiters and their wake-ups (fill, hand-off on disconnect/expiry/release/fence, PASS, timeout),
stale-while-revalidate, fencing, MULTI/Lua, replicas, ENCODED, reply shapes, errors, counters, no leaks.

A lease ends when its holder's connection closes, so holders and parked readers each use a dedicated
LeaseConn (one redis.Connection, replies read explicitly); `r` (pooled) is only used for commands whose
connection identity does not matter."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import re
import socket
import threading
import time

import pytest
import redis

from helpers import (
    BAD_BETA,
    BAD_LEASE,
    BAD_TOKEN,
    BAD_WAIT,
    FENCED_KEY,
    FENCED_NOT_HELD,
    FENCED_TAG,
    LEASE_COUNTERS,
    LEASE_GAUGES,
    LEASE_ON_REPLICA,
    LeaseConn,
    assert_no_lease_leak,
    blocked_clients,
    check_lease_reply,
    compressible,
    counter_delta,
    get_encoded,
    info_section,
    info_text,
    lease_args,
    lease_counters,
    lease_get,
    lz4_unframe,
    meta,
    normalise,
    raw_command,
    protocol_of,
    raises_exact,
    stats,
    tc_get,
    tc_invalidate,
    tc_release,
    tc_set,
    wait_for,
    wait_lease_waiters,
)

WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


@pytest.fixture
def conns(r):
    """Factory of dedicated connections like `r` (conns() or conns(db=1)); all closed at teardown."""
    made: list[LeaseConn] = []

    def factory(db=None) -> LeaseConn:
        c = LeaseConn(r, db=db)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


def fill(c, key, lease=5000) -> bytes:
    """A lease read that must be granted FILL; returns the token."""
    reply = lease_get(c, key, lease)
    assert reply[0] == b"FILL" and reply[1] is None and reply[2] is not None, reply
    return reply[2]


def park_all(r, waiters, key, lease=5000, wait=5000, encoded=False, already=0):
    """Parks each waiter in turn (so their FIFO order is the list order)."""
    for i, w in enumerate(waiters):
        w.park(key, lease, wait, encoded)
        wait_lease_waiters(r, already + i + 1)


def assert_still_parked(waiters, for_s=0.1):
    time.sleep(for_s)
    for w in waiters:
        assert not w.ready(0), "this waiter should still be parked"


# ---- the stampede: one fill for 200 concurrent readers in 4 processes ------------------------------------


def _stampede_worker(port, protocol, key, value, n, total, barrier, results):
    """One process: n threads, each on its own connection, sends one `GET key LEASE 5000 WAIT 5000` at the
    barrier. The one thread granted FILL waits until the total-1 others are parked, then fills."""
    out = []
    lock = threading.Lock()

    def one(i):
        conn = None
        rec = {"pid": os.getpid(), "i": i}
        try:
            conn = redis.Connection(host="127.0.0.1", port=port, protocol=protocol, socket_timeout=30)
            conn.connect()
            barrier.wait(60)
            t0 = time.monotonic()
            conn.send_command(*lease_args(key, 5000, 5000))
            reply = conn.read_response()
            rec["took"] = time.monotonic() - t0
            rec["reply"] = reply
            if isinstance(reply, list) and reply and reply[0] == b"FILL":
                deadline = time.monotonic() + 20
                while True:
                    conn.send_command("TIERCACHE.STATS")
                    seen = normalise(conn.read_response())["lease_waiters"]
                    if seen >= total - 1 or time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
                rec["parked_before_fill"] = seen
                conn.send_command("TIERCACHE.SET", key, value, "LEASE", reply[2])
                try:
                    rec["set"] = conn.read_response()
                except redis.ResponseError as e:
                    rec["set"] = f"error: {e}"
        except Exception as e:  # reported to the test, which fails on it
            rec["exception"] = repr(e)
        finally:
            if conn is not None:
                conn.disconnect()
            with lock:
                out.append(rec)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    results.put(out)


def test_stampede_four_processes_one_fill(r, server):
    procs_n, per_proc = 4, 50
    total = procs_n * per_proc
    value = b"the one loaded value \x00\xff"
    before = stats(r)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(total)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_stampede_worker,
                    args=(server.port, protocol_of(r), b"hot", value, per_proc, total, barrier, results))
        for _ in range(procs_n)
    ]
    for p in procs:
        p.start()
    recs = []
    try:
        for _ in procs:
            recs += results.get(timeout=120)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert len(recs) == total
    errors = [x for x in recs if "exception" in x]
    assert not errors, errors[:5]
    for x in recs:
        check_lease_reply(x["reply"])
    fills = [x for x in recs if x["reply"][0] == b"FILL"]
    assert len(fills) == 1, f"exactly one FILL in total, got {[x['reply'] for x in fills]}"
    holder = fills[0]
    assert holder["parked_before_fill"] == total - 1, holder
    assert holder["set"] == b"OK", holder
    others = [x for x in recs if x is not holder]
    bad = [x["reply"] for x in others if x["reply"] != [b"HIT", value, None]]
    assert not bad, f"{len(bad)} of {total - 1} readers did not get [HIT, value, nil]: {bad[:5]}"
    assert tc_get(r, b"hot") == value
    d = counter_delta(stats(r), before)
    assert d.get("leases_granted") == 1, d
    assert d.get("waiters_parked") == total - 1, d
    assert d.get("waiters_woken") == total - 1, d
    assert d.get("misses") == total, d  # FILL and every park count as a miss
    for name in ("handoffs", "lease_timeouts", "wait_timeouts", "passes", "fenced"):
        assert name not in d, d
    assert_no_lease_leak(r)


# ---- basic replies, ENCODED, reply shapes ------------------------------------------------------------------


def test_fill_busy_hit_and_set_lease(r, conns):
    a, b = conns(), conns()
    before = stats(r)
    tok = fill(a, b"k")
    assert lease_get(b, b"k") == [b"BUSY", None, None]
    assert lease_get(b, b"k", encoded=True) == [b"BUSY", None, None, None]
    assert tc_get(r, b"k") is None  # plain GET unchanged
    s = stats(r)
    assert s["leases"] == 1 and s["lease_waiters"] == 0
    assert a.call("TIERCACHE.SET", b"k", b"v1", "PX", 100_000, "LEASE", tok) == b"OK"
    assert lease_get(b, b"k") == [b"HIT", b"v1", None]
    assert lease_get(a, b"k", 7) == [b"HIT", b"v1", None]
    assert tc_get(r, b"k") == b"v1"
    assert 99_000 < r.pttl(b"k") <= 100_000
    d = counter_delta(stats(r), before)
    assert d == {"leases_granted": 1, "misses": 4, "hits": 3}, d  # FILL, 2 BUSY, plain miss; 3 HIT
    # the token is spent
    with raises_exact(FENCED_NOT_HELD):
        a.call("TIERCACHE.SET", b"k", b"v2", "LEASE", tok)
    assert tc_get(r, b"k") == b"v1"
    assert_no_lease_leak(r)


def test_tokens_differ_per_grant(r, conns):
    a = conns()
    tokens = set()
    for i in range(20):
        tok = fill(a, b"k%d" % i)
        assert tc_release(a, b"k%d" % i, tok) == 1
        tokens.add(tok)
    tok = fill(a, b"k0")
    tokens.add(tok)
    assert len(tokens) == 21


def test_encoded_lease_replies(r, conns):
    a, b, w_enc, w_plain = conns(), conns(), conns(), conns()
    # FILL with ENCODED: [FILL, nil, token, nil]
    reply = lease_get(a, b"big", encoded=True)
    assert reply[0] == b"FILL" and reply[1] is None and reply[2] is not None and reply[3] is None
    tok = reply[2]
    assert lease_get(b, b"big", encoded=True) == [b"BUSY", None, None, None]
    park_all(r, [w_enc], b"big", encoded=True)
    park_all(r, [w_plain], b"big", already=1)
    value = compressible(5000)
    assert a.call("TIERCACHE.SET", b"big", value, "LEASE", tok) == b"OK"
    frame = get_encoded(r, b"big")
    assert frame[0] == b"lz4"
    stored = frame[1]
    assert lz4_unframe(stored) == value and len(stored) < len(value)
    assert w_enc.read_lease(encoded=True) == [b"HIT", stored, None, b"lz4"]
    assert w_plain.read_lease() == [b"HIT", value, None]
    # HIT ENCODED: stored bytes undecoded + "lz4"; plain: decoded
    assert lease_get(b, b"big", encoded=True) == [b"HIT", stored, None, b"lz4"]
    assert lease_get(b, b"big") == [b"HIT", value, None]
    tc_set(r, b"small", b"raw value")
    assert lease_get(b, b"small", encoded=True) == [b"HIT", b"raw value", None, b"raw"]
    # STALE ENCODED: old stored bytes, token, encoding
    tc_set(r, b"st", value, "PX", 50, "STALE", 10)
    st_stored = get_encoded(r, b"st")
    wait_for(lambda: meta(r, b"st")["state"] == b"stale", timeout=2, what="stale")
    reply = lease_get(a, b"st", encoded=True)
    assert reply[0] == b"STALE" and reply[1] == st_stored[1] and reply[3] == b"lz4" and reply[2] is not None
    assert lease_get(b, b"st", encoded=True) == [b"STALE", st_stored[1], None, b"lz4"]
    assert tc_release(a, b"st", reply[2]) == 1
    # WAIT deadline with ENCODED: [BUSY, nil, nil, nil]
    tok2 = fill(a, b"other")
    assert lease_get(b, b"other", 5000, wait=50, encoded=True) == [b"BUSY", None, None, None]
    assert tc_release(a, b"other", tok2) == 1
    assert_no_lease_leak(r, timeout=1)


def test_encoded_lz4_fill_stored_verbatim(r, conns):
    """A fill with ENCODING lz4 stores the frame; lease reads return it (ENCODED) or decode it."""
    from helpers import lz4_frame

    a, b = conns(), conns()
    value = compressible(3000)
    frame = lz4_frame(value)
    tok = fill(a, b"f")
    assert a.call("TIERCACHE.SET", b"f", frame, "ENCODING", "lz4", "LEASE", tok) == b"OK"
    assert lease_get(b, b"f", encoded=True) == [b"HIT", frame, None, b"lz4"]
    assert lease_get(b, b"f") == [b"HIT", value, None]


def _raw_reply(sock: socket.socket, quiet: float = 0.05, timeout: float = 5.0) -> bytes:
    """Bytes read from the socket until it stays quiet for `quiet` seconds after the first byte."""
    data = b""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        data += chunk
        sock.settimeout(quiet)
    return data


def _resp_cmd(*args) -> bytes:
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def test_raw_reply_shapes(r, server):
    """On the wire: an array (`*`) of bulk strings in RESP2 and RESP3, nil as `$-1` (RESP2) or `_` (RESP3)."""
    proto = protocol_of(r)
    nil = rb"\$-1\r\n" if proto == 2 else rb"_\r\n"
    tok = rb"\$\d+\r\n[1-9][0-9]*\r\n"

    def open_sock():
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        if proto == 3:
            s.sendall(_resp_cmd("HELLO", 3))
            assert _raw_reply(s).startswith(b"%")
        return s

    holder, other = open_sock(), open_sock()
    try:
        holder.sendall(_resp_cmd("TIERCACHE.GET", "k", "LEASE", 5000))
        got = _raw_reply(holder)
        assert re.fullmatch(rb"\*3\r\n\$4\r\nFILL\r\n" + nil + tok, got), got
        token = re.search(rb"\r\n([1-9][0-9]*)\r\n$", got).group(1)
        other.sendall(_resp_cmd("TIERCACHE.GET", "k", "LEASE", 5000))
        got = _raw_reply(other)
        assert re.fullmatch(rb"\*3\r\n\$4\r\nBUSY\r\n" + nil + nil, got), got
        other.sendall(_resp_cmd("TIERCACHE.GET", "k", "ENCODED", "LEASE", 5000))
        got = _raw_reply(other)
        assert re.fullmatch(rb"\*4\r\n\$4\r\nBUSY\r\n" + nil + nil + nil, got), got
        holder.sendall(_resp_cmd("TIERCACHE.SET", "k", "val", "PX", 600, "STALE", 10, "LEASE", token))
        assert _raw_reply(holder) == b"+OK\r\n"
        other.sendall(_resp_cmd("TIERCACHE.GET", "k", "LEASE", 5000))
        got = _raw_reply(other)
        assert re.fullmatch(rb"\*3\r\n\$3\r\nHIT\r\n\$3\r\nval\r\n" + nil, got), got
        other.sendall(_resp_cmd("TIERCACHE.GET", "k", "ENCODED", "LEASE", 5000))
        got = _raw_reply(other)
        assert re.fullmatch(rb"\*4\r\n\$3\r\nHIT\r\n\$3\r\nval\r\n" + nil + rb"\$3\r\nraw\r\n", got), got
        wait_for(lambda: meta(r, b"k")["state"] == b"stale", timeout=3, what="stale")
        other.sendall(_resp_cmd("TIERCACHE.GET", "k", "LEASE", 5000))
        got = _raw_reply(other)
        assert re.fullmatch(rb"\*3\r\n\$5\r\nSTALE\r\n\$3\r\nval\r\n" + tok, got), got
        holder.sendall(_resp_cmd("TIERCACHE.GET", "k", "LEASE", 5000))
        got = _raw_reply(holder)
        assert re.fullmatch(rb"\*3\r\n\$5\r\nSTALE\r\n\$3\r\nval\r\n" + nil, got), got
    finally:
        holder.close()
        other.close()


def test_reply_types_through_redis_py(r, conns):
    """redis-py sees a list under both protocols (not a set/map/push)."""
    a = conns()
    for reply in (r.execute_command("TIERCACHE.GET", b"x", "LEASE", 100),
                  a.call("TIERCACHE.GET", b"y", "LEASE", 5000),
                  a.call("TIERCACHE.GET", b"y", "ENCODED", "LEASE", 5000)):
        assert type(reply) is list, reply


def test_get_lease_stays_readonly_command(r):
    info = raw_command(r, "COMMAND", "INFO", "tiercache.get")
    flags = {f.decode() if isinstance(f, bytes) else f for f in info[0][2]}
    assert "readonly" in flags, flags


# ---- waiting: fill, hand-offs, timeouts ------------------------------------------------------------------


def test_holder_disconnect_hands_off_to_first_waiter(r, conns):
    holder = conns()
    waiters = [conns() for _ in range(3)]
    tok = fill(holder, b"k")
    park_all(r, waiters, b"k")
    before = stats(r)
    assert before["leases"] == 1 and before["lease_waiters"] == 3
    holder.close()
    t0 = time.monotonic()
    assert waiters[0].ready(0.2), "first waiter should get FILL within 200 ms of the holder's disconnect"
    took = time.monotonic() - t0
    reply = waiters[0].read_lease()
    assert reply[0] == b"FILL" and reply[1] is None and reply[2] not in (None, tok), reply
    assert took < 0.2
    assert_still_parked(waiters[1:])
    s = stats(r)
    assert s["leases"] == 1 and s["lease_waiters"] == 2
    d = counter_delta(s, before)
    assert d == {"handoffs": 1, "leases_granted": 1, "waiters_woken": 1}, d
    # the old token is dead; the new holder fills and the others get HIT
    with raises_exact(FENCED_NOT_HELD):
        tc_set(r, b"k", b"late", "LEASE", tok)
    assert waiters[0].call("TIERCACHE.SET", b"k", b"v", "LEASE", reply[2]) == b"OK"
    for w in waiters[1:]:
        assert w.read_lease() == [b"HIT", b"v", None]
    assert_no_lease_leak(r)


def test_handoff_chain_through_successive_disconnects(r, conns):
    holder = conns()
    waiters = [conns() for _ in range(3)]
    fill(holder, b"k")
    park_all(r, waiters, b"k")
    holder.close()
    for i, w in enumerate(waiters):
        reply = w.read_lease(timeout=1)
        assert reply[0] == b"FILL", (i, reply)
        for later in waiters[i + 1:]:
            assert not later.ready(0.05)
        w.close()
    assert_no_lease_leak(r)
    assert lease_get(r, b"k")[0] == b"FILL"


def test_lease_expiry_with_waiters_hands_off(r, conns):
    holder = conns()
    w1, w2 = conns(), conns()
    before = stats(r)
    t_grant = time.monotonic()
    tok = fill(holder, b"k", lease=300)
    # w1 asks for a 300 ms lease of its own; w2 for 5 s
    park_all(r, [w1], b"k", lease=300, wait=5000)
    park_all(r, [w2], b"k", lease=5000, wait=5000, already=1)
    reply = w1.read_lease(timeout=3)
    t_handoff = time.monotonic()
    assert reply[0] == b"FILL" and reply[2] not in (None, tok), reply
    assert 0.25 <= t_handoff - t_grant < 1.0, t_handoff - t_grant
    assert not w2.ready(0)
    d = counter_delta(stats(r), before)
    assert d.get("lease_timeouts") == 1 and d.get("handoffs") == 1, d
    # the expired holder is fenced, nothing stored, w2 still parked
    with raises_exact(FENCED_NOT_HELD):
        holder.call("TIERCACHE.SET", b"k", b"late", "LEASE", tok)
    assert tc_get(r, b"k") is None and r.exists(b"k") == 0
    assert not w2.ready(0.02)
    # w1's lease lasts the 300 ms it asked for: it expires too and w2 gets the lease
    reply2 = w2.read_lease(timeout=3)
    t2 = time.monotonic()
    assert reply2[0] == b"FILL" and reply2[2] not in (None, tok, reply[2]), reply2
    assert 0.25 <= t2 - t_handoff < 1.0, t2 - t_handoff
    with raises_exact(FENCED_NOT_HELD):
        w1.call("TIERCACHE.SET", b"k", b"late", "LEASE", reply[2])
    assert w2.call("TIERCACHE.SET", b"k", b"v2", "LEASE", reply2[2]) == b"OK"
    assert lease_get(holder, b"k") == [b"HIT", b"v2", None]
    d = counter_delta(stats(r), before)
    assert d.get("lease_timeouts") == 2 and d.get("handoffs") == 2 and d.get("leases_granted") == 3, d
    assert_no_lease_leak(r)


def test_lease_expiry_without_waiters_next_get_fills(r, conns):
    holder, other = conns(), conns()
    before = stats(r)
    tok = fill(holder, b"k", lease=300)
    assert lease_get(other, b"k") == [b"BUSY", None, None]
    t0 = time.monotonic()
    wait_for(lambda: stats(r)["leases"] == 0, timeout=2, interval=0.01, what="lease expired")
    assert time.monotonic() - t0 < 1.0
    reply = lease_get(other, b"k")
    assert reply[0] == b"FILL" and reply[2] != tok, reply
    with raises_exact(FENCED_NOT_HELD):
        holder.call("TIERCACHE.SET", b"k", b"late", "LEASE", tok)
    assert other.call("TIERCACHE.SET", b"k", b"v", "LEASE", reply[2]) == b"OK"
    d = counter_delta(stats(r), before)
    assert d.get("lease_timeouts") == 1 and d.get("fenced") == 1 and "handoffs" not in d, d
    assert_no_lease_leak(r)


def test_handoff_lease_runs_for_the_waiters_ms(r, conns):
    holder, w, other = conns(), conns(), conns()
    fill(holder, b"k", lease=60_000)
    park_all(r, [w], b"k", lease=250, wait=5000)
    holder.close()
    reply = w.read_lease(timeout=1)
    assert reply[0] == b"FILL"
    t0 = time.monotonic()
    assert lease_get(other, b"k")[0] == b"BUSY"
    wait_for(lambda: lease_get(other, b"k", lease=5000)[0] == b"FILL", timeout=3, interval=0.02,
             what="the handed-off 250 ms lease to expire")
    assert 0.15 < time.monotonic() - t0 < 1.0


def test_wait_deadline_gives_busy(r, conns):
    holder, w = conns(), conns()
    tok = fill(holder, b"k")
    before = stats(r)
    t0 = time.monotonic()
    w.park(b"k", 5000, 200)
    wait_lease_waiters(r, 1)
    reply = w.read_lease(timeout=3)
    took = time.monotonic() - t0
    assert reply == [b"BUSY", None, None]
    assert 0.18 <= took < 1.0, took
    s = stats(r)
    assert s["lease_waiters"] == 0 and s["leases"] == 1
    assert blocked_clients(r) == 0
    d = counter_delta(s, before)
    assert d.get("wait_timeouts") == 1 and d.get("waiters_parked") == 1 and "waiters_woken" not in d, d
    # the holder is unaffected
    assert lease_get(w, b"k") == [b"BUSY", None, None]
    assert holder.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok) == b"OK"
    assert_no_lease_leak(r)


def test_plain_set_wakes_waiters_with_its_value_and_fences_holder(r, conns):
    holder, other = conns(), conns()
    waiters = [conns() for _ in range(3)]
    tok = fill(holder, b"k")
    park_all(r, waiters, b"k")
    before = stats(r)
    assert other.call("TIERCACHE.SET", b"k", b"theirs", "EX", 100) == b"OK"
    for w in waiters:
        assert w.read_lease(timeout=1) == [b"HIT", b"theirs", None]
    with raises_exact(FENCED_KEY):
        holder.call("TIERCACHE.SET", b"k", b"mine", "LEASE", tok)
    assert tc_get(r, b"k") == b"theirs"
    d = counter_delta(stats(r), before)
    assert d.get("waiters_woken") == 3 and d.get("fenced") == 1, d
    assert_no_lease_leak(r)


def test_flushall_and_flushdb_pass_waiters(r, conns):
    holder = conns()
    waiters = [conns() for _ in range(2)]
    fill(holder, b"k")
    park_all(r, waiters, b"k")
    r.flushall()
    for w in waiters:
        assert w.read_lease(timeout=1) == [b"PASS", None, None]
    assert_no_lease_leak(r)
    holder2 = conns()
    w = conns()
    fill(holder2, b"k2")
    park_all(r, [w], b"k2", encoded=True)
    r.flushdb()
    assert w.read_lease(timeout=1, encoded=True) == [b"PASS", None, None, None]
    assert_no_lease_leak(r)


def test_flushdb_of_another_db_leaves_leases_alone(r, conns):
    """LEASES.md: FLUSHALL/FLUSHDB -> waiters get PASS. Leases, like tags, live per database: flushing db 1
    must not end a lease (or answer its waiters) in db 0."""
    holder, w = conns(), conns()
    other_db = conns(db=1)
    tok = fill(holder, b"k")
    park_all(r, [w], b"k")
    assert other_db.call("FLUSHDB") == b"OK"
    assert not w.ready(0.1), f"db 0 waiter answered by FLUSHDB of db 1: {w.read_lease()}"
    assert holder.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok) == b"OK"
    assert w.read_lease() == [b"HIT", b"v", None]


def test_leases_are_per_database(r, conns):
    a0, a1 = conns(), conns(db=1)
    tok0 = fill(a0, b"k")
    tok1 = fill(a1, b"k")  # same key name, other db: its own lease
    assert tok0 != tok1
    with raises_exact(FENCED_NOT_HELD):
        a1.call("TIERCACHE.SET", b"k", b"x", "LEASE", tok0)
    assert a0.call("TIERCACHE.SET", b"k", b"zero", "LEASE", tok0) == b"OK"
    assert a1.call("TIERCACHE.SET", b"k", b"one", "LEASE", tok1) == b"OK"
    assert tc_get(r, b"k") == b"zero"
    assert a1.call("TIERCACHE.GET", b"k") == b"one"


# ---- stale-while-revalidate -------------------------------------------------------------------------------


def test_stale_window_one_refresher(r, conns):
    tc_set(r, b"k", b"old", "PX", 100, "STALE", 10)
    time.sleep(0.15)
    assert tc_get(r, b"k") is None  # plain GET: stale is a miss
    readers = [conns() for _ in range(8)]
    before = stats(r)
    # all at once: every read is sent before any reply is read
    for c in readers:
        c.send(*lease_args(b"k", 5000, 5000))
    replies = [c.read_lease(timeout=2) for c in readers]
    assert all(x[0] == b"STALE" and x[1] == b"old" for x in replies), replies
    tokens = [x[2] for x in replies if x[2] is not None]
    assert len(tokens) == 1, replies
    refresher = readers[[x[2] for x in replies].index(tokens[0])]
    # while it refreshes, everyone still gets the stale value without a token (no parking)
    again = [lease_get(c, b"k", wait=5000) for c in readers]
    assert again == [[b"STALE", b"old", None]] * 8
    s = stats(r)
    assert s["leases"] == 1 and s["lease_waiters"] == 0
    d = counter_delta(s, before)
    assert d.get("stale_served") == 16 and d.get("leases_granted") == 1 and "waiters_parked" not in d, d
    assert refresher.call("TIERCACHE.SET", b"k", b"new", "PX", 10_000, "STALE", 10, "LEASE", tokens[0]) == b"OK"
    assert [lease_get(c, b"k") for c in readers] == [[b"HIT", b"new", None]] * 8
    assert_no_lease_leak(r)


def test_stale_refresher_disconnect_lets_next_reader_refresh(r, conns):
    tc_set(r, b"k", b"old", "PX", 50, "STALE", 10)
    time.sleep(0.1)
    a, b = conns(), conns()
    tok = lease_get(a, b"k")[2]
    assert tok is not None
    assert lease_get(b, b"k") == [b"STALE", b"old", None]
    a.close()
    wait_for(lambda: stats(r)["leases"] == 0, timeout=1, what="lease gone with its holder")
    reply = lease_get(b, b"k")
    assert reply[0] == b"STALE" and reply[1] == b"old" and reply[2] not in (None, tok), reply


# ---- fencing ----------------------------------------------------------------------------------------------


def test_fenced_by_tag_invalidation(r, conns):
    a, b = conns(), conns()
    tok = fill(a, b"k")
    before = stats(r)
    assert b.call("TIERCACHE.INVALIDATE", b"t2") == 0  # no entry carries it yet
    with raises_exact(FENCED_TAG):
        a.call("TIERCACHE.SET", b"k", b"v", "TAGS", 2, b"t1", b"t2", "LEASE", tok)
    assert r.exists(b"k") == 0 and tc_get(r, b"k") is None
    assert counter_delta(stats(r), before).get("fenced") == 1
    # the lease ended with the refusal
    assert stats(r)["leases"] == 0
    with raises_exact(FENCED_NOT_HELD):
        a.call("TIERCACHE.SET", b"k", b"v", "TAGS", 1, b"t1", "LEASE", tok)
    assert r.exists(b"k") == 0


def test_tag_fence_is_per_tag_and_per_db(r, conns):
    a = conns()
    other_db = conns(db=1)
    # an invalidated tag the fill does not carry, and the fill's tag invalidated in another db: stored
    tok = fill(a, b"k")
    tc_invalidate(r, b"unrelated")
    other_db.call("TIERCACHE.INVALIDATE", b"t")
    assert a.call("TIERCACHE.SET", b"k", b"v", "TAGS", 1, b"t", "LEASE", tok) == b"OK"
    assert tc_get(r, b"k") == b"v"
    # the same tag invalidated before the grant: stored
    tc_invalidate(r, b"early")
    tok = fill(a, b"k2")
    assert a.call("TIERCACHE.SET", b"k2", b"v", "TAGS", 1, b"early", "LEASE", tok) == b"OK"
    assert meta(r, b"k2")["tags"] == [b"early"]
    # an untagged fill is not fenced by invalidations
    tok = fill(a, b"k3")
    tc_invalidate(r, b"t", b"early")
    assert a.call("TIERCACHE.SET", b"k3", b"v", "LEASE", tok) == b"OK"


def test_fill_after_invalidation_is_not_fenced_by_reclaim(r, conns):
    """FILL is given for an entry invalidated by a tag (LEASES.md). The reclaim timer deleting that dead
    entry later is not a write after the grant: the invalidation came before it, so the fill must be
    stored. (MULTI keeps the reclaim timer from running between INVALIDATE and the grant.)"""
    a = conns()
    tc_set(r, b"k", b"v1", "TAGS", 1, b"t")
    a.send("MULTI")
    assert a.read() == b"OK"
    a.send("TIERCACHE.INVALIDATE", b"t")
    a.send(*lease_args(b"k", 5000))
    assert a.read() == b"QUEUED" and a.read() == b"QUEUED"
    inv, reply = a.call("EXEC")
    assert inv == 1
    check_lease_reply(reply)
    assert reply[0] == b"FILL", reply
    wait_for(lambda: stats(r)["reclaim_pending"] == 0 and r.exists(b"k") == 0, timeout=3, what="reclaimed")
    assert a.call("TIERCACHE.SET", b"k", b"v2", "TAGS", 1, b"t", "LEASE", reply[2]) == b"OK"
    assert tc_get(r, b"k") == b"v2"


def _stale(r, key=b"k"):
    tc_set(r, key, b"old", "PX", 50, "STALE", 10)
    time.sleep(0.08)


def _src(r):
    tc_set(r, b"src", b"from src")


def _op_del(r, db1):
    r.delete(b"k")


def _op_unlink(r, db1):
    r.unlink(b"k")


def _op_rename_away(r, db1):
    r.rename(b"k", b"elsewhere")


def _op_move_away(r, db1):
    assert r.move(b"k", 1)


def _op_rename(r, db1):
    _src(r)
    r.rename(b"src", b"k")


def _op_copy(r, db1):
    _src(r)
    r.copy(b"src", b"k")


def _op_move(r, db1):
    tc_set(db1, b"k", b"from db1")
    assert db1.move(b"k", 0)


def _op_restore(r, db1):
    _src(r)
    r.restore(b"k", 0, r.dump(b"src"))


def _op_plain_set(r, db1):
    tc_set(r, b"k", b"theirs")


FENCE_OPS = {
    # (needs an existing entry: lease granted through STALE, op)
    "del": (True, _op_del),
    "unlink": (True, _op_unlink),
    "rename-away": (True, _op_rename_away),
    "move-away": (True, _op_move_away),
    "rename": (False, _op_rename),
    "copy": (False, _op_copy),
    "move": (False, _op_move),
    "restore": (False, _op_restore),
    "plain-set": (False, _op_plain_set),
    "plain-set-on-stale": (True, _op_plain_set),
}


@pytest.mark.parametrize("op", list(FENCE_OPS))
def test_fenced_by_key_change(r, r_db1, conns, op):
    stale_first, fn = FENCE_OPS[op]
    a = conns()
    if stale_first:
        _stale(r)
        reply = lease_get(a, b"k")
        assert reply[0] == b"STALE" and reply[2] is not None, reply
        tok = reply[2]
    else:
        tok = fill(a, b"k")
    before_value = None
    fn(r, r_db1)
    if r.exists(b"k"):
        before_value = r.execute_command("TIERCACHE.GET", b"k", "ENCODED")
    fenced = stats(r)["fenced"]
    with raises_exact(FENCED_KEY):
        a.call("TIERCACHE.SET", b"k", b"fill", "EX", 100, "LEASE", tok)
    assert stats(r)["fenced"] == fenced + 1
    after = r.execute_command("TIERCACHE.GET", b"k", "ENCODED") if r.exists(b"k") else None
    assert after == before_value, "nothing stored by a fenced fill"
    assert_no_lease_leak(r)


@pytest.fixture
def active_expire_back_on(r):
    yield
    r.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 1)


def expired_keys(r) -> int:
    return int(info_section(r, "stats")["expired_keys"])


@pytest.mark.parametrize("path", ["active", "lazy-exists", "lazy-in-set"])
def test_expiry_does_not_fence(r, conns, active_expire_back_on, path):
    """LEASES.md: expiry and eviction do NOT fence: a stale entry that runs out while its refresh is loading
    must not refuse the refresh."""
    a, w = conns(), conns()
    _stale(r)
    reply = lease_get(a, b"k")
    assert reply[0] == b"STALE" and reply[2] is not None, reply
    base = expired_keys(r)
    if path != "active":
        r.execute_command("DEBUG", "SET-ACTIVE-EXPIRE", 0)
    assert r.pexpire(b"k", 20)
    if path == "active":
        wait_for(lambda: expired_keys(r) > base, timeout=5, what="active expiry of the key")
    else:
        time.sleep(0.06)
        if path == "lazy-exists":
            assert r.exists(b"k") == 0
            assert expired_keys(r) == base + 1
    fenced = stats(r)["fenced"]
    if path == "lazy-in-set":
        # nothing touched the key since it ran out: the SET ... LEASE itself finds it expired
        assert expired_keys(r) == base
        assert a.call("TIERCACHE.SET", b"k", b"new", "EX", 100, "LEASE", reply[2]) == b"OK"
        assert expired_keys(r) == base + 1
    else:
        # with the entry gone, other lease reads are BUSY (the refresh is still loading) or wait for it
        assert lease_get(w, b"k") == [b"BUSY", None, None]
        park_all(r, [w], b"k")
        assert a.call("TIERCACHE.SET", b"k", b"new", "EX", 100, "LEASE", reply[2]) == b"OK"
        assert w.read_lease() == [b"HIT", b"new", None]
    assert tc_get(r, b"k") == b"new"
    assert stats(r)["fenced"] == fenced
    assert_no_lease_leak(r)


def test_wrong_or_other_keys_token_is_not_held(r, conns):
    a, b = conns(), conns()
    tok = fill(a, b"k")
    tok_b = fill(b, b"other")
    before = stats(r)
    wrong = str(int(tok) + 1 if int(tok) < 2**64 - 1 else int(tok) - 1).encode()
    for t in (wrong, tok_b, b"1", b"18446744073709551615"):
        with raises_exact(FENCED_NOT_HELD):
            a.call("TIERCACHE.SET", b"k", b"v", "LEASE", t)
    assert r.exists(b"k") == 0
    # a NOT-held refusal does not end the real lease
    assert lease_get(b, b"k") == [b"BUSY", None, None]
    assert counter_delta(stats(r), before).get("fenced") == 4
    assert a.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok) == b"OK"
    # the token of another key's lease, from its holder, on the wrong key
    with raises_exact(FENCED_NOT_HELD):
        b.call("TIERCACHE.SET", b"k", b"x", "LEASE", tok_b)
    assert tc_get(r, b"k") == b"v"
    # tokens work from any connection (the token, not the connection, proves the lease)
    assert a.call("TIERCACHE.SET", b"other", b"o", "LEASE", tok_b) == b"OK"


def test_released_token_is_not_held(r, conns):
    a = conns()
    tok = fill(a, b"k")
    assert tc_release(a, b"k", tok) == 1
    with raises_exact(FENCED_NOT_HELD):
        a.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok)
    assert r.exists(b"k") == 0


@pytest.mark.parametrize("why", ["tag", "rename"])
def test_waiter_gets_fill_after_fenced_fill(r, conns, why):
    holder = conns()
    waiters = [conns() for _ in range(2)]
    tok = fill(holder, b"k")
    park_all(r, waiters, b"k")
    tags = ["TAGS", 1, b"t"]
    if why == "tag":
        tc_invalidate(r, b"t")
        expected = FENCED_TAG
    else:
        tc_set(r, b"src", b"s")
        r.rename(b"src", b"k")
        expected = FENCED_KEY
    assert not waiters[0].ready(0.02)
    before = stats(r)
    with raises_exact(expected):
        holder.call("TIERCACHE.SET", b"k", b"mine", *tags, "LEASE", tok)
    reply = waiters[0].read_lease(timeout=0.5)
    assert reply[0] == b"FILL" and reply[2] not in (None, tok), reply
    assert not waiters[1].ready(0.05)
    d = counter_delta(stats(r), before)
    assert d.get("fenced") == 1 and d.get("handoffs") == 1, d
    assert waiters[0].call("TIERCACHE.SET", b"k", b"fresh", *tags, "LEASE", reply[2]) == b"OK"
    assert waiters[1].read_lease() == [b"HIT", b"fresh", None]
    assert_no_lease_leak(r)


# ---- RELEASE ----------------------------------------------------------------------------------------------


def test_release_hands_off_then_pass(r, conns):
    holder = conns()
    w1, w2 = conns(), conns()
    tok = fill(holder, b"k")
    park_all(r, [w1, w2], b"k")
    before = stats(r)
    assert tc_release(holder, b"k", tok) == 1
    reply = w1.read_lease(timeout=0.5)
    assert reply[0] == b"FILL" and reply[2] not in (None, tok), reply
    assert not w2.ready(0.05)
    assert tc_release(holder, b"k", tok) == 0  # no longer held
    assert not w2.ready(0.02)
    assert tc_release(w1, b"k", reply[2], "PASS") == 1
    assert w2.read_lease(timeout=0.5) == [b"PASS", None, None]
    d = counter_delta(stats(r), before)
    assert d == {"handoffs": 1, "leases_granted": 1, "waiters_woken": 2, "passes": 1}, d
    assert r.exists(b"k") == 0
    assert_no_lease_leak(r)
    assert lease_get(holder, b"k")[0] == b"FILL"


def test_release_pass_answers_every_waiter(r, conns):
    holder = conns()
    waiters = [conns() for _ in range(4)]
    tok = fill(holder, b"k")
    park_all(r, waiters[:2], b"k")
    park_all(r, waiters[2:], b"k", encoded=True, already=2)
    before = stats(r)
    assert tc_release(r, b"k", tok, "PASS") == 1  # any connection may release with the token
    for w in waiters[:2]:
        assert w.read_lease(timeout=0.5) == [b"PASS", None, None]
    for w in waiters[2:]:
        assert w.read_lease(timeout=0.5, encoded=True) == [b"PASS", None, None, None]
    d = counter_delta(stats(r), before)
    assert d.get("passes", 0) >= 1 and d.get("waiters_woken") == 4 and "handoffs" not in d, d
    assert_no_lease_leak(r)
    with raises_exact(FENCED_NOT_HELD):
        holder.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok)


def test_release_without_waiters_and_unknown_tokens(r, conns):
    a, b = conns(), conns()
    tok = fill(a, b"k")
    assert tc_release(b, b"k", b"12345") == 0
    assert tc_release(b, b"nolease", b"12345") == 0
    assert tc_release(b, b"nolease", b"12345", "PASS") == 0
    assert tc_release(b, b"k", tok + b"1" if len(tok) < 19 else b"7") == 0
    assert lease_get(b, b"k") == [b"BUSY", None, None]  # still held
    assert tc_release(a, b"k", tok) == 1
    assert stats(r)["leases"] == 0
    assert lease_get(b, b"k")[0] == b"FILL"
    tok2 = fill(a, b"p")
    assert tc_release(a, b"p", tok2, "PASS") == 1
    assert tc_release(a, b"p", tok2, "PASS") == 0
    assert stats(r)["leases"] == 1  # only b's lease on k


def test_release_errors(r):
    with raises_exact("ERR wrong number of arguments for 'tiercache.release' command"):
        r.execute_command("TIERCACHE.RELEASE", b"k")
    with raises_exact("ERR wrong number of arguments for 'tiercache.release' command"):
        r.execute_command("TIERCACHE.RELEASE")
    with raises_exact("ERR wrong number of arguments for 'tiercache.release' command"):
        r.execute_command("TIERCACHE.RELEASE", b"k", b"5", "PASS", "PASS")
    for bad in (b"abc", b"0", b"-5", b"", b"1.5", b"18446744073709551616", b" 5"):
        with raises_exact(BAD_TOKEN):
            r.execute_command("TIERCACHE.RELEASE", b"k", bad)
    with raises_exact("ERR syntax error"):
        r.execute_command("TIERCACHE.RELEASE", b"k", b"5", "FOO")


# ---- MULTI, Lua, replicas -------------------------------------------------------------------------------


def test_multi_never_blocks(r, conns):
    holder = conns()
    fill(holder, b"k")
    before = stats(r)
    t0 = time.monotonic()
    p = r.pipeline(transaction=True)
    p.execute_command(*lease_args(b"k", 5000, 5000))
    p.execute_command(*lease_args(b"k", 5000, 5000, encoded=True))
    p.execute_command(*lease_args(b"m", 5000, 5000))
    res = p.execute()
    assert time.monotonic() - t0 < 1.0
    assert res[0] == [b"BUSY", None, None]
    assert res[1] == [b"BUSY", None, None, None]
    check_lease_reply(res[2])
    assert res[2][0] == b"FILL" and res[2][2] is not None
    d = counter_delta(stats(r), before)
    assert "waiters_parked" not in d and "wait_timeouts" not in d, d
    assert blocked_clients(r) == 0
    assert tc_release(r, b"m", res[2][2]) == 1


def test_eval_never_blocks(r, conns):
    holder = conns()
    fill(holder, b"k")
    script = ("local x = redis.call('TIERCACHE.GET', KEYS[1], 'LEASE', 5000, 'WAIT', 5000) "
              "return {x[1], type(x[2]), type(x[3])}")
    t0 = time.monotonic()
    assert r.eval(script, 1, b"k") == [b"BUSY", b"boolean", b"boolean"]
    res = r.eval(script, 1, b"free")
    assert time.monotonic() - t0 < 1.0
    assert res == [b"FILL", b"boolean", b"string"]
    assert stats(r)["lease_waiters"] == 0 and blocked_clients(r) == 0
    tok = r.eval("return redis.call('TIERCACHE.GET', KEYS[1], 'LEASE', 5000)[3]", 1, b"lua")
    assert tc_release(r, b"lua", tok) == 1


def test_replica_refuses_lease(start_server, protocol):
    master = start_server(name="lease-master")
    replica = start_server(name="lease-replica")
    m = master.client(protocol=protocol)
    rep = replica.client(protocol=protocol)
    rep.replicaof("127.0.0.1", master.port)
    wait_for(lambda: info_section(rep, "replication").get("master_link_status") == "up", timeout=20,
             interval=0.05, what="link up")
    # a lease fill on the master replicates as a plain SET (no LEASE): the replica stores it
    holder = LeaseConn(m)
    try:
        tok = fill(holder, b"k")
        assert holder.call("TIERCACHE.SET", b"k", b"v", "TAGS", 1, b"t", "LEASE", tok) == b"OK"
    finally:
        holder.close()
    assert m.execute_command("WAIT", 1, 5000) == 1
    wait_for(lambda: rep.execute_command("TIERCACHE.GET", b"k") == b"v", timeout=5, what="replicated fill")
    assert meta(rep, b"k")["tags"] == [b"t"]
    for args in (lease_args(b"k"), lease_args(b"missing", 100, 100), lease_args(b"k", 100, None, 1.0, True)):
        with raises_exact(LEASE_ON_REPLICA):
            rep.execute_command(*args)
    assert rep.execute_command("TIERCACHE.GET", b"k") == b"v"
    assert rep.execute_command("TIERCACHE.GET", b"k", "ENCODED") == [b"raw", b"v"]
    assert lease_get(m, b"k") == [b"HIT", b"v", None]
    assert stats(rep)["leases_granted"] == 0


# ---- XFetch (BETA) ----------------------------------------------------------------------------------------


def test_beta_early_refresh_only_for_lease_filled_entries(r, conns):
    a, b = conns(), conns()
    tc_set(r, b"plain", b"v", "PX", 200)
    before = stats(r)
    # not written through a lease fill: never early, whatever beta
    for _ in range(20):
        assert lease_get(a, b"plain", beta=1e12) == [b"HIT", b"v", None]
    # a fill that took ~50 ms: with a huge beta, now - delta*beta*ln(rand) is far past fresh_until
    tok = fill(a, b"x")
    time.sleep(0.05)
    assert a.call("TIERCACHE.SET", b"x", b"v", "EX", 1000, "LEASE", tok) == b"OK"
    assert lease_get(b, b"x", beta=1e-9) == [b"HIT", b"v", None]  # tiny beta: not early
    reply = lease_get(b, b"x", beta=1e12)
    assert reply[0] == b"HIT" and reply[1] == b"v" and reply[2] is not None, reply
    # the early refresher holds the lease: others get HIT without a token, plain lease reads too
    assert lease_get(a, b"x", beta=1e12) == [b"HIT", b"v", None]
    assert lease_get(a, b"x") == [b"HIT", b"v", None]
    d = counter_delta(stats(r), before)
    assert d.get("early_refreshes") == 1 and d.get("leases_granted") == 2, d
    assert b.call("TIERCACHE.SET", b"x", b"v2", "EX", 1000, "LEASE", reply[2]) == b"OK"
    assert lease_get(a, b"x") == [b"HIT", b"v2", None]
    # fresh forever: no deadline to refresh ahead of
    tok = fill(a, b"forever")
    time.sleep(0.03)
    assert a.call("TIERCACHE.SET", b"forever", b"v", "LEASE", tok) == b"OK"
    assert lease_get(b, b"forever", beta=1e12) == [b"HIT", b"v", None]
    assert_no_lease_leak(r)


# ---- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts,message",
    [
        (["LEASE", 0], BAD_LEASE),
        (["LEASE", -5], BAD_LEASE),
        (["LEASE", 10, "WAIT", 0], BAD_WAIT),
        (["LEASE", 10, "WAIT", -1], BAD_WAIT),
        (["LEASE", 10, "BETA", 0], BAD_BETA),
        (["LEASE", 10, "BETA", -1.5], BAD_BETA),
        (["LEASE", 10, "BETA", "nan"], BAD_BETA),
        (["LEASE", 10, "BETA", "abc"], BAD_BETA),
        (["WAIT", 10], "ERR syntax error"),
        (["BETA", 1], "ERR syntax error"),
        (["ENCODED", "WAIT", 10], "ERR syntax error"),
        (["LEASE", 10, "LEASE", 10], "ERR syntax error"),
        (["LEASE", 10, "WAIT", 10, "WAIT", 10], "ERR syntax error"),
        (["LEASE", 10, "BETA", 1, "BETA", 1], "ERR syntax error"),
        (["ENCODED", "LEASE", 10, "ENCODED"], "ERR syntax error"),
        (["LEASE", 10, "FOO"], "ERR syntax error"),
        (["LEASE", 10, "NOWAIT", 5], "ERR syntax error"),
        (["LEASE", "abc"], "ERR value is not an integer or out of range"),
        (["LEASE", "1.5"], "ERR value is not an integer or out of range"),
        (["LEASE", 10, "WAIT", "x"], "ERR value is not an integer or out of range"),
        (["LEASE", "99999999999999999999"], "ERR value is not an integer or out of range"),
    ],
)
def test_get_lease_errors(r, opts, message):
    before = stats(r)
    with raises_exact(message):
        r.execute_command("TIERCACHE.GET", b"k", *opts)
    s = stats(r)
    assert s["leases"] == 0 and s["leases_granted"] == before["leases_granted"]


def test_get_lease_wrongtype(r):
    r.set(b"str", b"x")
    with raises_exact(WRONGTYPE):
        r.execute_command(*lease_args(b"str"))
    with raises_exact(WRONGTYPE):
        r.execute_command(*lease_args(b"str", 100, 100))
    assert stats(r)["leases"] == 0


@pytest.mark.parametrize("bad", [b"abc", b"0", b"-1", b"", b"1.0", b"18446744073709551616", b"12a"])
def test_set_lease_bad_token(r, conns, bad):
    a = conns()
    fill(a, b"k")
    with raises_exact(BAD_TOKEN):
        a.call("TIERCACHE.SET", b"k", b"v", "LEASE", bad)
    assert r.exists(b"k") == 0
    assert lease_get(r, b"k")[0] == b"BUSY"  # the lease is untouched


def test_set_lease_syntax(r, conns):
    a = conns()
    tok = fill(a, b"k")
    with raises_exact("ERR syntax error"):
        a.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok, "LEASE", tok)
    with raises_exact("ERR syntax error"):
        a.call("TIERCACHE.SET", b"k", b"v", "LEASE")
    # another error in the same SET: that error, nothing stored, the lease still usable
    with raises_exact("ERR invalid expire time in 'tiercache.set' command"):
        a.call("TIERCACHE.SET", b"k", b"v", "PX", 0, "LEASE", tok)
    assert r.exists(b"k") == 0
    assert a.call("TIERCACHE.SET", b"k", b"v", "lease", tok) == b"OK"  # case-insensitive option
    assert tc_get(r, b"k") == b"v"


def test_set_lease_wrongtype_keeps_lease(r, conns):
    a = conns()
    tok = fill(a, b"k")
    r.set(b"k", b"native")
    with raises_exact(WRONGTYPE):
        a.call("TIERCACHE.SET", b"k", b"v", "LEASE", tok)
    assert r.get(b"k") == b"native"


# ---- counters ---------------------------------------------------------------------------------------------


def info_lease_counters(r) -> dict:
    info = info_section(r, "tiercache")
    return {k: int(info["tiercache_" + k]) for k in LEASE_GAUGES + LEASE_COUNTERS}


def test_counters_move_as_expected_in_stats_and_info(r, conns):
    base = lease_counters(r)
    assert info_lease_counters(r) == base

    def delta():
        now = lease_counters(r)
        assert info_lease_counters(r) == now, "INFO tiercache and TIERCACHE.STATS disagree"
        return {k: now[k] - base[k] for k in LEASE_COUNTERS if now[k] != base[k]}, now

    a, b, w1, w2, w3 = (conns() for _ in range(5))
    # grant, busy, park, fill wakes
    tok = fill(a, b"c1")
    assert lease_get(b, b"c1")[0] == b"BUSY"
    park_all(r, [w1], b"c1")
    d, now = delta()
    assert d == {"leases_granted": 1, "waiters_parked": 1}, d
    assert now["leases"] == 1 and now["lease_waiters"] == 1
    a.call("TIERCACHE.SET", b"c1", b"v", "LEASE", tok)
    assert w1.read_lease()[0] == b"HIT"
    d, now = delta()
    assert d == {"leases_granted": 1, "waiters_parked": 1, "waiters_woken": 1}, d
    assert now["leases"] == 0 and now["lease_waiters"] == 0
    # expiry with a waiter: timeout + hand-off (a new lease granted to the waiter)
    fill(a, b"c2", lease=150)
    park_all(r, [w2], b"c2")
    tok2 = w2.read_lease(timeout=2)[2]
    d, _ = delta()
    assert d == {"leases_granted": 3, "waiters_parked": 2, "waiters_woken": 2, "lease_timeouts": 1,
                 "handoffs": 1}, d
    # RELEASE PASS with one waiter
    park_all(r, [w3], b"c2")
    assert tc_release(w2, b"c2", tok2, "PASS") == 1
    assert w3.read_lease()[0] == b"PASS"
    d, _ = delta()
    assert d == {"leases_granted": 3, "waiters_parked": 3, "waiters_woken": 3, "lease_timeouts": 1,
                 "handoffs": 1, "passes": 1}, d
    # fenced fill, wait timeout
    tok3 = fill(a, b"c3")
    tc_set(r, b"c3", b"other")
    with raises_exact(FENCED_KEY):
        a.call("TIERCACHE.SET", b"c3", b"v", "LEASE", tok3)
    tok4 = fill(a, b"c4")
    assert lease_get(b, b"c4", wait=50) == [b"BUSY", None, None]
    d, _ = delta()
    assert d == {"leases_granted": 5, "waiters_parked": 4, "waiters_woken": 3, "lease_timeouts": 1,
                 "handoffs": 1, "passes": 1, "fenced": 1, "wait_timeouts": 1}, d
    tc_release(a, b"c4", tok4)
    # stale served (one token), early refresh
    tc_set(r, b"c5", b"old", "PX", 30, "STALE", 10)
    time.sleep(0.06)
    assert lease_get(a, b"c5")[2] is not None
    assert lease_get(b, b"c5")[2] is None
    tok6 = fill(a, b"c6")
    time.sleep(0.03)
    a.call("TIERCACHE.SET", b"c6", b"v", "EX", 100, "LEASE", tok6)
    assert lease_get(b, b"c6", beta=1e12)[2] is not None
    d, now = delta()
    assert d == {"leases_granted": 8, "waiters_parked": 4, "waiters_woken": 3, "lease_timeouts": 1,
                 "handoffs": 1, "passes": 1, "fenced": 1, "wait_timeouts": 1, "stale_served": 2,
                 "early_refreshes": 1}, d
    assert now["leases"] == 2 and now["lease_waiters"] == 0


def test_info_field_names_and_order(r):
    names = [ln.split(":", 1)[0] for ln in info_text(r, "tiercache").splitlines() if ":" in ln]
    want = ["tiercache_" + f for f in ["reclaim_max_tick_us", "stale_served", "leases", "lease_waiters", "lease_timers",
                                      "leases_granted", "waiters_parked", "waiters_woken", "wait_timeouts",
                                      "handoffs", "lease_timeouts", "passes", "fenced", "early_refreshes"]]
    start = names.index(want[0])
    assert names[start:start + len(want)] == want, names


# ---- no leak ----------------------------------------------------------------------------------------------


def _resolve_chain(waiters, key, rng):
    """The lease just ended without a value: the first waiter holds it (FILL) and fills, releases, passes
    or disconnects, and so on until every waiter is answered."""
    rest = list(waiters)
    while rest:
        # waiters sent back to back may have been parked in any order: take the one that was answered
        w = wait_for(lambda: next((x for x in rest if x.ready(0)), None), timeout=3, interval=0.002,
                     what="a waiter to be handed the lease")
        rest.remove(w)
        got = w.read_lease()
        assert got[0] == b"FILL", got
        how = rng.choice(["set", "release", "pass", "close"])
        if how == "set":
            assert w.call("TIERCACHE.SET", key, b"v", "PX", 5, "LEASE", got[2]) == b"OK"
            for o in rest:
                assert o.read_lease()[0] == b"HIT"
            return
        if how == "pass":
            assert tc_release(w, key, got[2], "PASS") == 1
            for o in rest:
                assert o.read_lease()[0] == b"PASS"
            return
        if how == "release":
            assert tc_release(w, key, got[2]) == 1
        else:
            w.close()


def test_no_leak_after_mixed_cycles(r, conns):
    rng = random.Random(4242)
    before = lease_counters(r)
    disconnected_parked = 0
    live: list[LeaseConn] = []

    def new():
        c = conns()
        live.append(c)
        return c

    kinds = ["fill", "holder-gone", "release", "pass", "waiter-gone", "timeout", "fenced", "fenced-tag",
             "stale", "expiry"]
    for i in range(300):
        key = b"m%d" % (i % 7)
        kind = rng.choice(kinds)
        holder = new()
        tok = fill(holder, key, lease=100 if kind == "expiry" else 5000)
        n = rng.randint(0, 3)
        waiters = [new() for _ in range(n)]
        for w in waiters:
            w.park(key, 5000, 30 if kind == "timeout" else 5000)
        wait_lease_waiters(r, n)
        if kind == "waiter-gone" and waiters:
            waiters.pop(rng.randrange(len(waiters))).close()
            disconnected_parked += 1
            wait_lease_waiters(r, len(waiters))
            kind = rng.choice(["fill", "holder-gone"])
        if kind == "fill":
            assert holder.call("TIERCACHE.SET", key, b"v", "PX", 5, "LEASE", tok) == b"OK"
            for w in waiters:
                assert w.read_lease()[0] == b"HIT"
        elif kind == "holder-gone":
            holder.close()
            _resolve_chain(waiters, key, rng)
        elif kind == "release":
            assert tc_release(holder, key, tok) == 1
            _resolve_chain(waiters, key, rng)
        elif kind == "pass":
            assert tc_release(holder, key, tok, "PASS") == 1
            for w in waiters:
                assert w.read_lease()[0] == b"PASS"
        elif kind == "timeout":
            for w in waiters:
                assert w.read_lease(timeout=2) == [b"BUSY", None, None]
            assert tc_release(holder, key, tok) == 1
        elif kind == "fenced":
            tc_set(r, key, b"other", "PX", 5)
            for w in waiters:
                assert w.read_lease()[0] == b"HIT"
            with raises_exact(FENCED_KEY):
                holder.call("TIERCACHE.SET", key, b"v", "LEASE", tok)
        elif kind == "fenced-tag":
            tc_invalidate(r, b"tag%d" % i)
            with raises_exact(FENCED_TAG):
                holder.call("TIERCACHE.SET", key, b"v", "TAGS", 1, b"tag%d" % i, "LEASE", tok)
            _resolve_chain(waiters, key, rng)
        elif kind == "stale":
            assert holder.call("TIERCACHE.SET", key, b"v", "PX", 5, "STALE", 1, "LEASE", tok) == b"OK"
            for w in waiters:
                assert w.read_lease()[0] == b"HIT"
            time.sleep(0.01)
            got = lease_get(holder, key)
            assert got[0] == b"STALE" and got[2] is not None, got
            if rng.random() < 0.5:
                holder.close()
            else:
                assert tc_release(holder, key, got[2]) == 1
        elif kind == "expiry":
            _resolve_chain(waiters, key, rng)
        for c in live:
            c.close()
        live.clear()
        r.delete(key)
    assert_no_lease_leak(r, timeout=5)
    after = lease_counters(r)
    parked = after["waiters_parked"] - before["waiters_parked"]
    woken = after["waiters_woken"] - before["waiters_woken"]
    timeouts = after["wait_timeouts"] - before["wait_timeouts"]
    # every parked read ends exactly one way: woken (HIT/FILL/PASS), timed out, or its client left
    assert parked == woken + timeouts + disconnected_parked, (parked, woken, timeouts, disconnected_parked)
    assert parked > 200


def test_tiercache_del_fences_a_fill_of_a_missing_key(r):
    """Plain DEL of a missing key does not fence a fill; TIERCACHE.DEL does (cache-aside delete)."""
    holder = LeaseConn(r)
    try:
        status, _, token = lease_get(holder, b"plain")
        assert status == b"FILL"
        assert r.delete(b"plain") == 0
        assert holder.call("TIERCACHE.SET", b"plain", b"old", "LEASE", token) in (b"OK", "OK")
        status, _, token = lease_get(holder, b"k")
        assert status == b"FILL"
        assert r.execute_command("TIERCACHE.DEL", b"k") == 0
        with pytest.raises(redis.ResponseError, match="^FENCED the key was written or deleted after the lease was granted$"):
            reply = holder.call("TIERCACHE.SET", b"k", b"old", "LEASE", token)
            if isinstance(reply, redis.ResponseError):
                raise reply
        assert r.exists(b"k") == 0
        r.set(b"native", b"x")
        tc_set(r, b"entry", b"v")
        assert r.execute_command("TIERCACHE.DEL", b"entry", b"native", b"missing") == 2
        assert r.exists(b"entry", b"native") == 0
    finally:
        holder.close()


def test_withttl_appends_the_fresh_time_left(r):
    tc_set(r, b"k", b"v", "PX", 5000)
    reply = r.execute_command("TIERCACHE.GET", b"k", "WITHTTL", "LEASE", 1000)
    assert reply[:3] == [b"HIT", b"v", None]
    assert 4000 < reply[3] <= 5000
    reply = r.execute_command("TIERCACHE.GET", b"k", "ENCODED", "WITHTTL", "LEASE", 1000)
    assert reply[:4] == [b"HIT", b"v", None, b"raw"] and 4000 < reply[4] <= 5000
    tc_set(r, b"forever", b"v")
    assert r.execute_command("TIERCACHE.GET", b"forever", "WITHTTL", "LEASE", 1000)[3] == -1
    assert r.execute_command("TIERCACHE.GET", b"missing", "WITHTTL", "LEASE", 1000)[3] is None
    with raises_exact("ERR syntax error"):
        r.execute_command("TIERCACHE.GET", b"k", "WITHTTL")


# ---- hardening: caps, the holder's own parked read, one reply when a fill meets the deadline ----------


def test_lease_and_wait_caps(r):
    assert r.config_get("tiercache.max-lease-ms") == {"tiercache.max-lease-ms": "60000"}
    raises_exact(lambda: lease_get(r, "cap", lease=60001), "ERR LEASE is above tiercache.max-lease-ms (60000)")
    raises_exact(lambda: lease_get(r, "cap", lease=10, wait=60001), "ERR WAIT is above tiercache.max-wait-ms (60000)")
    try:
        r.config_set("tiercache.max-lease-ms", 100)
        r.config_set("tiercache.max-wait-ms", 50)
        raises_exact(lambda: lease_get(r, "cap", lease=101), "ERR LEASE is above tiercache.max-lease-ms (100)")
        raises_exact(lambda: lease_get(r, "cap", lease=100, wait=51), "ERR WAIT is above tiercache.max-wait-ms (50)")
        assert stats(r)["leases"] == 0, "a refused read takes no lease"
    finally:
        r.config_set("tiercache.max-lease-ms", 60000)
        r.config_set("tiercache.max-wait-ms", 60000)


def test_holder_parked_on_own_key_disconnects_hands_off_to_live_waiter(r, conns):
    holder, waiter = conns(), conns()
    fill(holder, "own-key", lease=10000)
    holder.park("own-key", 10000, 8000, False)
    wait_lease_waiters(r, 1)
    waiter.park("own-key", 10000, 8000, False)
    wait_lease_waiters(r, 2)
    holder.close()
    reply = waiter.read_lease(timeout=3)
    assert reply[0] == b"FILL", reply
    assert tc_release(waiter, "own-key", reply[2], "PASS") == 1
    assert_no_lease_leak(r)


def test_fill_in_the_deadline_iteration_still_replies(r, conns):
    """The holder pipelines a 300 ms busy script and its fill in one write; the reader's WAIT 100 passes
    during the script. Redis 7.0 used to drop the reader's reply; it must get exactly one (HIT)."""
    holder, reader = conns(), conns()
    token = fill(holder, "race-key", lease=10000)
    reader.park("race-key", 10000, 100, False)
    wait_lease_waiters(r, 1)
    script = (
        "local t = redis.call('TIME'); local s = t[1] * 1000000 + t[2]; "
        "repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - s >= 300000; return 1"
    )
    pipe_conn = holder.conn
    pipe_conn.send_packed_command(
        pipe_conn.pack_commands([("EVAL", script, 0), ("TIERCACHE.SET", "race-key", "v", "LEASE", token)])
    )
    assert pipe_conn.read_response() == 1
    assert pipe_conn.read_response() in (b"OK", "OK")
    reply = reader.read_lease(timeout=5)
    assert reply[0] == b"HIT" and reply[1] == b"v", reply
    assert not reader.ready(0.05), "a second reply to one read"
    assert_no_lease_leak(r)
