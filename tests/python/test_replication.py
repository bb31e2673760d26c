"""A real replica (REPLICAOF) answers TIERCACHE.GET/META exactly like its master: after the initial full
sync (disk-based and diskless, with diskless load), for streamed writes (absolute times and stored
bytes), and after a later full resync."""

import threading
import time

import pytest
import redis

from helpers import (
    capture,
    compressible,
    info_section,
    lz4_frame,
    meta,
    populate,
    stats,
    tc_get,
    tc_set,
    wait_for,
)

# The gauges that describe the data itself (counters of activity differ between servers).
SIZE_FIELDS = ["entries", "compressed_entries", "bytes_original", "bytes_stored", "tags", "tag_index_entries"]

MODES = {
    "disk": (["--repl-diskless-sync", "no"], ["--repl-diskless-load", "disabled"]),
    "diskless": (["--repl-diskless-sync", "yes"], ["--repl-diskless-load", "disabled"]),
    "diskless-swapdb": (["--repl-diskless-sync", "yes"], ["--repl-diskless-load", "swapdb"]),
}


def sizes(c):
    s = stats(c)
    return {f: s[f] for f in SIZE_FIELDS}


def attach(replica_client, master):
    replica_client.replicaof("127.0.0.1", master.port)
    wait_link_up(replica_client)


def wait_link_up(replica_client):
    wait_for(
        lambda: info_section(replica_client, "replication").get("master_link_status") == "up",
        timeout=20,
        interval=0.05,
        what="master_link_status:up",
    )


def sync_full_count(master_client) -> int:
    return int(info_section(master_client, "stats")["sync_full"])


def start_pair(start_server, mode):
    margs, rargs = MODES[mode]
    master = start_server(args=["--repl-diskless-sync-delay", "0", *margs], name="master")
    replica = start_server(args=list(rargs), name="replica")
    return master, replica


def streamed_writes(m0, m1):
    """Writes after the link is up; returns the keys to compare per db."""
    tc_set(m0, b"s-px", b"v", "PX", 100_000, "STALE", 7, "TAGS", 2, b"a", b"b")
    tc_set(m0, b"s-comp", compressible(6000))
    tc_set(m0, b"s-frame", lz4_frame(b"frame me" * 50), "ENCODING", "lz4", "EX", 300)
    tc_set(m0, b"s-bin\x00", b"\x00\xff", "TAGS", 1, b"\xff\x00")
    tc_set(m0, b"plain", b"overwritten")  # overwrite of a synced key
    tc_set(m0, b"keep", b"kept", "PX", 50_000, "KEEPTTL")
    m0.delete(b"noise")
    m0.pexpire(b"empty", 555_000)
    m0.persist(b"ttl")
    m0.rename(b"tagged", b"s-renamed")
    m0.copy(b"comp", b"s-copied")
    tc_set(m1, b"s-db1", b"db one", "EX", 100)
    return {
        0: [b"s-px", b"s-comp", b"s-frame", b"s-bin\x00", b"plain", b"keep", b"empty", b"ttl", b"s-renamed",
            b"s-copied", b"comp", b"pxat", b"stale", b"persisted"],
        1: [b"s-db1", b"db1"],
    }


@pytest.mark.parametrize("mode", list(MODES))
def test_replica_matches_master(start_server, mode):
    master, replica = start_pair(start_server, mode)
    m = {0: master.client(protocol=2), 1: master.client(protocol=2, db=1)}
    rep = {0: replica.client(protocol=3), 1: replica.client(protocol=3, db=1)}
    keys = populate(m[0], m[1])

    # initial full sync
    attach(rep[0], master)
    assert m[0].wait(1, 5000) == 1
    assert capture(rep, keys) == capture(m, keys)
    assert sizes(rep[0]) == sizes(m[0])
    assert rep[0].get(b"native") == b"string"
    assert tc_get(rep[0], b"stale") is None
    assert meta(rep[0], b"stale")["state"] == b"stale"

    # streamed writes, applied by the replica 300 ms late: relative times would drift
    sleeper = replica.client(protocol=2)
    t = threading.Thread(target=lambda: sleeper.execute_command("DEBUG", "SLEEP", "0.3"))
    t.start()
    time.sleep(0.05)
    keys2 = streamed_writes(m[0], m[1])
    t.join()
    assert m[0].wait(1, 5000) == 1
    assert capture(rep, keys2) == capture(m, keys2)
    assert rep[0].exists(b"noise", b"tagged") == 0
    assert sizes(rep[0]) == sizes(m[0])
    for k in (b"s-px", b"plain", b"s-comp"):
        assert meta(rep[0], k)["created_ms"] == meta(m[0], k)["created_ms"]


def test_replica_full_resync_replaces_replica_data(start_server):
    master, replica = start_pair(start_server, "diskless")
    m = {0: master.client(protocol=3), 1: master.client(protocol=3, db=1)}
    rep = {0: replica.client(protocol=2), 1: replica.client(protocol=2, db=1)}
    keys = populate(m[0], m[1])
    attach(rep[0], master)
    assert m[0].wait(1, 5000) == 1
    syncs = sync_full_count(m[0])

    # detach, diverge on the replica, and the master moves on
    rep[0].replicaof("NO", "ONE")
    tc_set(rep[0], b"replica-only", b"junk", "TAGS", 1, b"junk")
    tc_set(rep[0], b"plain", b"replica version")
    tc_set(m[0], b"master-later", compressible(3000), "EX", 1000, "STALE", 2)
    keys[0].append(b"master-later")

    # re-attach: the diverged history forces a full resync
    attach(rep[0], master)
    assert m[0].wait(1, 5000) == 1
    assert sync_full_count(m[0]) == syncs + 1
    assert capture(rep, keys) == capture(m, keys)
    assert rep[0].exists(b"replica-only") == 0
    assert tc_get(rep[0], b"plain") == b"hello"
    assert sizes(rep[0]) == sizes(m[0])


def test_replica_is_read_only_and_follows_expiry(start_server):
    master, replica = start_pair(start_server, "diskless")
    m0 = master.client(protocol=2)
    r0 = replica.client(protocol=3)
    attach(r0, master)
    # after a diskless sync the master counts the replica only once it has ACKed (up to 1 s): do that
    # before the short-lived writes
    tc_set(m0, b"warm-up", b"x")
    assert m0.wait(1, 5000) == 1
    m0.delete(b"warm-up")
    tc_set(m0, b"k", b"v", "PX", 200, "STALE", 1)
    tc_set(m0, b"short", b"v", "PX", 100)
    assert m0.wait(1, 5000) == 1
    assert tc_get(r0, b"k") == b"v"
    with pytest.raises(redis.exceptions.ReadOnlyError):
        tc_set(r0, b"k", b"replica write")
    assert tc_get(r0, b"k") == b"v"
    # stale on both, then gone on both
    wait_for(lambda: meta(m0, b"k")["state"] == b"stale", timeout=2, what="stale on master")
    assert tc_get(r0, b"k") is None
    assert meta(r0, b"k")["state"] == b"stale"
    assert tc_get(r0, b"short") is None
    wait_for(lambda: m0.exists(b"k", b"short") == 0, timeout=3, what="expiry on master")
    assert m0.wait(1, 5000) == 1
    wait_for(lambda: r0.execute_command("TIERCACHE.META", b"k") is None, timeout=3, what="expiry on replica")
    wait_for(lambda: stats(r0)["entries"] == 0, timeout=3, what="replica stats after expiry")


def test_replica_of_restarted_master_with_rdb(start_server):
    """Full sync from a master that itself loaded its data from RDB."""
    master, replica = start_pair(start_server, "disk")
    m = {0: master.client(protocol=2), 1: master.client(protocol=2, db=1)}
    keys = populate(m[0], m[1])
    m[0].save()
    master.restart()
    m = {0: master.client(protocol=2), 1: master.client(protocol=2, db=1)}
    rep = {0: replica.client(protocol=3), 1: replica.client(protocol=3, db=1)}
    attach(rep[0], master)
    assert m[0].wait(1, 5000) == 1
    assert capture(rep, keys) == capture(m, keys)


def test_replica_receives_stored_bytes_not_its_own_compression(start_server):
    """Master and replica with different compress-min-size: the replica keeps the master's stored
    bytes (replication sends the stored, already compressed bytes)."""
    master = start_server(args=["--repl-diskless-sync-delay", "0", "--tiercache.compress-min-size", "16"], name="master")
    replica = start_server(args=["--tiercache.compress-min-size", "1000000"], name="replica")
    m0 = master.client(protocol=2)
    r0 = replica.client(protocol=2)
    tc_set(m0, b"before-sync", b"ab" * 100)
    attach(r0, master)
    tc_set(m0, b"streamed", b"cd" * 100, "TAGS", 1, b"t")
    tc_set(m0, b"raw", compressible(5000), "NOCOMPRESS")
    assert m0.wait(1, 5000) == 1
    for k in (b"before-sync", b"streamed", b"raw"):
        assert tc_get(r0, k, "ENCODED") == tc_get(m0, k, "ENCODED"), k
    assert tc_get(r0, b"streamed", "ENCODED")[0] == b"lz4"
    assert tc_get(r0, b"raw", "ENCODED")[0] == b"raw"
    assert tc_get(r0, b"streamed") == b"cd" * 100
