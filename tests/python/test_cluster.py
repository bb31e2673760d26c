"""Redis Cluster: cross-shard TIERCACHE.INVALIDATE / TAGCOUNT / TAGKEYS from every master over RESP2 and
RESP3, replicas receiving the invalidation, LOCAL, the timeout error naming a stopped master, MULTI, and
the commands through redis-py's RedisCluster client.

One cluster (3 masters + 3 replicas, each with the module) for the whole module: the `cluster` fixture
(module scope) starts it with `redis-cli --cluster create` and stops it at teardown. Tests use their own
key and tag names.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis
from redis.cluster import ClusterNode, RedisCluster

from conftest import RedisServer, module_path  # noqa: F401  (module_path checks the build)

NODE_TIMEOUT_MS = 3000


def _pair_free(p: int) -> bool:
    for port in (p, p + 10000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _ports(n: int) -> list[int]:
    p = 20000 + (os.getpid() * 7919 + int(time.time())) % 20000
    out: list[int] = []
    while len(out) < n:
        p = 20000 if p >= 39990 else p + 1
        if _pair_free(p):
            out.append(p)
    return out


class Cluster:
    def __init__(self, base: Path):
        self.base = base
        self.nodes: list[subprocess.Popen] = []
        self.ports = _ports(6)
        for port in self.ports:
            d = base / str(port)
            d.mkdir(parents=True)
            args = [
                os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "redis-server",
                "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                "--appendonly", "no", "--logfile", str(d / "redis.log"), "--daemonize", "no",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "no",
                # No automatic failover: a CPU-starved node missing the node timeout must not fail over.
                "--cluster-replica-no-failover", "yes",
                "--loadmodule", str(module_path()),
            ]
            self.nodes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            self._wait_ping(port)
        cli = os.environ.get("REDIS_CLI") or "redis-cli"
        create = [cli, "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                  "--cluster-replicas", "1", "--cluster-yes"]
        out = subprocess.run(create, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        self.wait_ok()

    def _wait_ping(self, port: int):
        deadline = time.time() + 15
        while True:
            try:
                if redis.Redis(port=port, host="127.0.0.1", socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            assert time.time() < deadline, f"node {port} did not start"
            time.sleep(0.05)

    def conn(self, port: int, protocol: int = 2) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, protocol=protocol, socket_timeout=20)

    def topology(self) -> list[dict]:
        text = self.conn(self.ports[0]).execute_command("CLUSTER", "NODES").decode()
        out = []
        for line in text.splitlines():
            f = line.split()
            port = int(f[1].split("@")[0].rsplit(":", 1)[1])
            out.append({"id": f[0], "port": port, "master": "master" in f[2].split(","),
                        "master_id": None if f[3] == "-" else f[3], "slots": f[8:]})
        return out

    def masters(self) -> list[int]:
        return sorted(n["port"] for n in self.topology() if n["master"] and n["slots"])

    def id_of(self, port: int) -> str:
        return self.conn(port).execute_command("CLUSTER", "MYID").decode()

    def replica_of(self, port: int) -> int:
        topo = self.topology()
        mid = next(n["id"] for n in topo if n["port"] == port)
        return next(n["port"] for n in topo if n["master_id"] == mid)

    def master_for(self, key: str) -> int:
        slot = self.conn(self.ports[0]).execute_command("CLUSTER", "KEYSLOT", key)
        for n in self.topology():
            if not n["master"]:
                continue
            for s in n["slots"]:
                if s.startswith("["):
                    continue
                a, _, b = s.partition("-")
                if int(a) <= slot <= int(b or a):
                    return n["port"]
        raise AssertionError(f"no master for slot {slot}")

    def wait_ok(self, timeout: float = 60):
        deadline = time.time() + timeout
        while True:
            ok = True
            for p in self.ports:
                info = self.conn(p).execute_command("CLUSTER", "INFO").decode()
                repl = self.conn(p).info("replication")
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    ok = False
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    ok = False
            if ok:
                return
            assert time.time() < deadline, "cluster not ok"
            time.sleep(0.1)

    def stop(self):
        for p in self.nodes:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="tiercache-cluster-"))
    c = Cluster(base)
    try:
        yield c
    finally:
        c.stop()
        if not os.environ.get("TIERCACHE_KEEP_DIRS"):
            shutil.rmtree(base, ignore_errors=True)


def keys_on_every_master(c: Cluster, prefix: str, per_master: int) -> list[tuple[str, int]]:
    counts: dict[int, int] = {}
    out = []
    masters = c.masters()
    n = 0
    while any(counts.get(m, 0) < per_master for m in masters):
        k = f"{prefix}:{n}"
        n += 1
        m = c.master_for(k)
        if counts.get(m, 0) < per_master:
            counts[m] = counts.get(m, 0) + 1
            out.append((k, m))
    return out


def tset(c: Cluster, port: int, key: str, value: str, *tags: str):
    args = ["TIERCACHE.SET", key, value, "EX", 600]
    if tags:
        args += ["TAGS", len(tags), *tags]
    assert c.conn(port).execute_command(*args) in (b"OK", "OK", True)


def replica_get(c: Cluster, master: int, key: str):
    assert c.conn(master).execute_command("WAIT", 1, 5000) == 1
    r = c.conn(c.replica_of(master))
    r.execute_command("READONLY")
    return r.execute_command("TIERCACHE.GET", key)


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_invalidate_from_every_master(cluster, protocol):
    for i, origin in enumerate(cluster.masters()):
        tag = f"py-inv-{protocol}-{i}"
        keys = keys_on_every_master(cluster, f"pyinv:{protocol}:{i}", 2)
        for k, m in keys:
            tset(cluster, m, k, "v", tag)
        assert cluster.conn(origin, protocol).execute_command("TIERCACHE.TAGCOUNT", tag) == len(keys)
        assert cluster.conn(origin, protocol).execute_command("TIERCACHE.INVALIDATE", tag) == len(keys)
        for k, m in keys:
            assert cluster.conn(m).execute_command("TIERCACHE.GET", k) is None, (k, m, origin)
            assert replica_get(cluster, m, k) is None, (k, m, origin)
        assert cluster.conn(origin, protocol).execute_command("TIERCACHE.TAGCOUNT", tag) == 0


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_local_and_tagkeys(cluster, protocol):
    tag = f"py-local-{protocol}"
    keys = keys_on_every_master(cluster, f"pylocal:{protocol}", 2)
    for k, m in keys:
        tset(cluster, m, k, "v", tag)
    m0 = cluster.masters()[0]
    r = cluster.conn(m0, protocol)
    got = sorted(k.decode() for k in r.execute_command("TIERCACHE.TAGKEYS", tag))
    assert got == sorted(k for k, _ in keys)
    assert len(r.execute_command("TIERCACHE.TAGKEYS", tag, "COUNT", 3)) == 3
    local = sorted(k.decode() for k in r.execute_command("TIERCACHE.TAGKEYS", tag, "LOCAL"))
    assert local == sorted(k for k, m in keys if m == m0)
    assert r.execute_command("TIERCACHE.INVALIDATE", "LOCAL", tag) == 2
    for k, m in keys:
        want = None if m == m0 else b"v"
        assert cluster.conn(m).execute_command("TIERCACHE.GET", k) == want
    assert r.execute_command("TIERCACHE.TAGCOUNT", tag) == len(keys) - 2
    assert r.execute_command("TIERCACHE.TAGCOUNT", tag, "LOCAL") == 0


def test_stopped_master_is_named_and_multi_refuses(cluster):
    masters = cluster.masters()
    origin, stopped = masters[0], masters[1]
    proc = cluster.nodes[cluster.ports.index(stopped)]
    r = cluster.conn(origin)
    r.config_set("tiercache.cluster-timeout-ms", 300)
    proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(redis.ResponseError) as e:
            r.execute_command("TIERCACHE.INVALIDATE", "py-slow")
    finally:
        proc.send_signal(signal.SIGCONT)
        r.config_set("tiercache.cluster-timeout-ms", 5000)
    text = str(e.value)
    assert text.startswith("TIMEOUT cluster-wide TIERCACHE.INVALIDATE got no answer within 300 ms"), text
    assert cluster.id_of(stopped) in text and f"127.0.0.1:{stopped}" in text, text
    assert r.execute_command("TIERCACHE.INVALIDATE", "py-slow") == 0
    # MULTI cannot wait for the other masters: the cluster-wide form is refused there, LOCAL runs.
    p = r.pipeline(transaction=True)
    p.execute_command("TIERCACHE.INVALIDATE", "py-multi")
    p.execute_command("TIERCACHE.INVALIDATE", "LOCAL", "py-multi")
    res = p.execute(raise_on_error=False)
    assert isinstance(res[0], redis.ResponseError) and "cannot wait for the other masters" in str(res[0])
    assert res[1] == 0


def test_through_redis_py_cluster_client(cluster):
    rc = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.masters()])
    try:
        keys = [f"pyrc:{i}" for i in range(60)]
        for k in keys:
            rc.execute_command("TIERCACHE.SET", k, "v", "EX", 600, "TAGS", 1, "py-rc")
        assert all(rc.execute_command("TIERCACHE.GET", k) == b"v" for k in keys)
        # A key-less command goes to one master; the module fans it out to the others.
        for node in rc.get_primaries():
            assert rc.execute_command("TIERCACHE.TAGCOUNT", "py-rc", target_nodes=node) == 60
        assert rc.execute_command("TIERCACHE.INVALIDATE", "py-rc", target_nodes=rc.get_primaries()[1]) == 60
        assert all(rc.execute_command("TIERCACHE.GET", k) is None for k in keys)
    finally:
        rc.close()
