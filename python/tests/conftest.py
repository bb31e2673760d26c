"""Fixtures of the Python client's tests: real redis-server processes with the tiercache module.

- `server` (session): one shared redis-server with the module on a free loopback port; FLUSHALL
  before each test that uses `r` or `make_cache`.
- `protocol`: 2 or 3, the protocol of the caller's redis-py client (ids resp2/resp3).
- `make_cache(**kw)`: a TierCache on the shared server (closed at teardown).
- `start_server()`: a dedicated server (stop/restart it to test outages), stopped at teardown.

The module is $TIERCACHE_MODULE, else <repo>/target/debug/libtiercache.so; redis-server is
$REDIS_SERVER or the first on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest
import redis

from tiercache import TierCache

REPO = Path(__file__).resolve().parents[2]


def module_path() -> Path:
    p = Path(os.environ.get("TIERCACHE_MODULE") or REPO / "target" / "debug" / "libtiercache.so").resolve()
    if not p.is_file():
        pytest.fail(f"tiercache module not found at {p}: build it first (cargo build)", pytrace=False)
    return p


def redis_server_binary() -> str:
    found = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if not found:
        pytest.fail("redis-server not found (install redis-server 7.0+ or set REDIS_SERVER)", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, dir: Path, port: Optional[int] = None) -> None:
        self.dir = dir
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "Server":
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            "--loadmodule", str(module_path()),
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}")
            try:
                if redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self, protocol: int = 2, **kw: Any) -> "redis.Redis":
        return redis.Redis(host="127.0.0.1", port=self.port, protocol=protocol, **kw)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("shared")).start()
    yield s
    s.stop()


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def r(server: Server) -> Iterator["redis.Redis"]:
    """A plain RESP2 client on the shared server, for looking behind the cache; FLUSHALL first."""
    c = server.client()
    c.flushall()
    yield c
    c.close()


@pytest.fixture
def make_cache(server: Server, r: "redis.Redis", protocol: int) -> Iterator[Callable[..., TierCache]]:
    caches: List[TierCache] = []

    def factory(srv: Optional[Server] = None, client_kw: Optional[dict] = None, **kw: Any) -> TierCache:
        kw.setdefault("namespace", "t")
        kw.setdefault("registry", None)
        client = (srv or server).client(protocol=protocol, **(client_kw or {}))
        c = TierCache(client, **kw)
        caches.append(c)
        return c

    yield factory
    for c in caches:
        c.close()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    servers: List[Server] = []

    def factory(port: Optional[int] = None) -> Server:
        s = Server(tmp_path_factory.mktemp("srv"), port).start()
        servers.append(s)
        return s

    yield factory
    for s in servers:
        s.stop()


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Polls `cond` until it is truthy (bounded; no assertion on how long it took)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
