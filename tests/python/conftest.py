"""Fixtures for the tiercache integration tests: real redis-server processes with the module loaded.

- `server` (session): one shared redis-server with the module; restarted if a test crashed it.
- `r`: a redis.Redis client on it, parametrised over RESP2 and RESP3 (ids "resp2"/"resp3"),
  decode_responses=False, FLUSHALL before each test.
- `start_server`: a factory for extra servers (restart, AOF, replica tests), each in its own tmp dir,
  all stopped at teardown.

The module is $TIERCACHE_MODULE or <repo>/target/debug/libtiercache.so; redis-server is
$REDIS_SERVER or the first redis-server on PATH (the one scripts/test checked).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODULE = REPO / "target" / "debug" / "libtiercache.so"
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    env = os.environ.get("REDIS_SERVER")
    if env:
        return env
    found = shutil.which("redis-server")
    if not found:
        pytest.fail("redis-server not found (install redis-server 7.0+ or set REDIS_SERVER)")
    return found


def module_path() -> Path:
    path = Path(os.environ.get("TIERCACHE_MODULE") or DEFAULT_MODULE).resolve()
    if not path.is_file():
        pytest.fail(f"tiercache module not found at {path}: build first: cargo build", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


class RedisServer:
    """One redis-server process with the tiercache module, living in `dir`.

    `args` are extra command-line options as a flat list (["--appendonly", "yes"]); `module_args` go
    after `--loadmodule <path>`. `restart()` starts a new process on the same dir (so it loads the
    dir's RDB/AOF) and a new port."""

    def __init__(self, dir: Path, args=(), module_args=(), load_module=True, config_file: Path | None = None):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.module_args = [str(a) for a in module_args]
        self.load_module = load_module
        self.config_file = config_file
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.logfile = self.dir / "redis.log"
        self._clients: list[redis.Redis] = []
        self.starts = 0

    # ---- process control -------------------------------------------------------------------------
    def command_line(self, port: int) -> list[str]:
        cmd = [redis_server_binary()]
        if self.config_file is not None:
            cmd.append(str(self.config_file))
        cmd += [
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.logfile),
            "--daemonize", "no",
            "--enable-debug-command", "yes",
        ]
        if self.load_module:
            cmd += ["--loadmodule", str(module_path()), *self.module_args]
        cmd += [str(a) for a in self.args]
        return cmd

    def spawn(self) -> subprocess.Popen:
        """Starts the process without waiting for it to answer."""
        self.port = free_port()
        self.starts += 1
        with open(self.logfile, "a") as log:
            log.write(f"\n==== start #{self.starts}: {' '.join(self.command_line(self.port))}\n")
        self.proc = subprocess.Popen(
            self.command_line(self.port),
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "stdout.log", "ab"),
            stderr=subprocess.STDOUT,
        )
        return self.proc

    def start(self) -> "RedisServer":
        for attempt in range(3):
            self.spawn()
            try:
                self.wait_ready()
                return self
            except ServerStartError:
                if self.proc.poll() is not None and "Address already in use" in self.log_tail() and attempt < 2:
                    continue
                raise
        return self

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"redis-server exited with code {self.proc.returncode} during startup\n{self.log_tail()}"
                )
            try:
                c = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)
                try:
                    if c.ping():
                        return
                finally:
                    c.close()
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.BusyLoadingError) as e:
                last = e
            time.sleep(0.05)
        raise ServerStartError(f"redis-server did not answer PING within {timeout}s ({last})\n{self.log_tail()}")

    def wait_exit(self, timeout: float = STARTUP_TIMEOUT) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def restart(self) -> "RedisServer":
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            text = []
        try:
            text += (self.dir / "stdout.log").read_text(errors="replace").splitlines()
        except OSError:
            pass
        return "\n".join(text[-lines:])

    # ---- clients ---------------------------------------------------------------------------------
    def client(self, protocol: int = 3, db: int = 0, **kw) -> redis.Redis:
        kw.setdefault("socket_timeout", 30)
        c = redis.Redis(
            host="127.0.0.1", port=self.port, db=db, protocol=protocol, decode_responses=False, **kw
        )
        c.tc_protocol = protocol
        self._clients.append(c)
        return c

    def __repr__(self):
        return f"<RedisServer port={self.port} dir={self.dir}>"


@pytest.fixture(scope="session")
def module():
    return module_path()


class SharedServer:
    def __init__(self, base: Path):
        self.base = base
        self.server: RedisServer | None = None
        self.crashes = 0

    def ensure(self) -> RedisServer:
        if self.server is not None and not self.server.alive():
            # A previous test crashed the server: start a fresh one so the failure does not cascade.
            self.crashes += 1
            sys.stderr.write(f"\n[tiercache tests] shared redis-server had died; log tail:\n{self.server.log_tail()}\n")
            self.server = None
        if self.server is None:
            self.server = RedisServer(self.base / f"shared{self.crashes}").start()
        return self.server


@pytest.fixture(scope="session")
def _shared(tmp_path_factory, module):
    shared = SharedServer(tmp_path_factory.mktemp("redis"))
    yield shared
    if shared.server is not None:
        shared.server.stop()


@pytest.fixture
def server(_shared) -> RedisServer:
    """The shared redis-server (started on first use, restarted if it died)."""
    return _shared.ensure()


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request) -> int:
    return request.param


@pytest.fixture
def r(server, protocol) -> redis.Redis:
    c = server.client(protocol=protocol)
    c.flushall()
    yield c
    # Put back configs a failing test may have left changed (a missing config is reported elsewhere).
    if server.alive():
        for name, value in (
            ("tiercache.compress-min-size", "1024"),
            ("tiercache.max-tags", "32"),
            ("tiercache.max-value-size", "67108864"),
            ("tiercache.max-lease-ms", "60000"),
            ("tiercache.max-wait-ms", "60000"),
        ):
            try:
                c.config_set(name, value)
            except redis.RedisError:
                pass
    c.close()


@pytest.fixture
def r_db1(server, protocol) -> redis.Redis:
    """A second client on the shared server, selected on db 1 (FLUSHALL is done by `r`)."""
    c = server.client(protocol=protocol, db=1)
    yield c
    c.close()


@pytest.fixture
def start_server(tmp_path_factory, module):
    """Factory: start_server(args=[...], module_args=[...], name="x") -> started RedisServer.
    Pass start=False to get an unstarted one (e.g. to test a refused load)."""
    servers: list[RedisServer] = []

    def factory(args=(), module_args=(), name="srv", start=True, dir=None, **kw) -> RedisServer:
        d = Path(dir) if dir is not None else tmp_path_factory.mktemp(name)
        s = RedisServer(d, args=args, module_args=module_args, **kw)
        servers.append(s)
        if start:
            s.start()
        return s

    yield factory
    for s in servers:
        s.stop()
