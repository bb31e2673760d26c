"""Cross-language: the Rust client (client/examples/xlang.rs, run with `cargo run -p tiercache-client
--example xlang`) and the Python client share entries and keep each other's L1 coherent."""

from __future__ import annotations

import select
import shutil
import subprocess
from typing import Iterator

import pytest

from conftest import REPO, wait_for

CARGO = ["cargo", "run", "-q", "-p", "tiercache-client", "--example", "xlang", "--"]


@pytest.fixture(scope="session")
def xlang_built() -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed: the Rust side of the cross-language tests cannot be built")
    r = subprocess.run(["cargo", "build", "-q", "-p", "tiercache-client", "--example", "xlang"], cwd=REPO,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"cargo build --example xlang failed:\n{r.stderr[-3000:]}")


class Rust:
    """One Rust process with its own TierCache (and L1), driven line by line."""

    def __init__(self, port: int, namespace: str) -> None:
        self.proc = subprocess.Popen(CARGO + [f"redis://127.0.0.1:{port}/", namespace], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, line: str, timeout: float = 60) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the Rust helper did not answer {line!r}"
        answer = self.proc.stdout.readline().rstrip("\n")
        assert answer, f"the Rust helper exited on {line!r}"
        return answer

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()  # end of input: the helper exits
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def rust(xlang_built: None, server, r) -> Iterator[Rust]:
    rs = Rust(server.port, "t")
    try:
        assert rs("metrics").startswith("METRICS")
        yield rs
    finally:
        rs.close()


def parse(value_line: str) -> dict:
    kind, id_, active, score, tags, name = value_line.split(" ", 5)
    assert kind == "VALUE"
    return {"id": int(id_), "name": name, "tags": tags.split(",") if tags else [], "active": active == "true",
            "score": float(score)}


def pushes(rust: Rust) -> int:
    """Invalidation pushes and messages the Rust process has applied so far."""
    return int(rust("metrics").split("invalidations_received=")[1].split()[0])


def settle(rust: Rust, before: int) -> None:
    """Waits until the Rust process has heard of a write made after `before` was read, so that its push
    does not race the Rust read that follows (that read's L1 insert would then, rightly, be voided)."""
    wait_for(lambda: pushes(rust) > before, what="the Rust process to receive the push")


def profile(i: int, name: str, tag: str) -> dict:
    return {"id": i, "name": name, "tags": [tag], "active": True, "score": 1.5}


def test_rust_writes_python_reads(rust, make_cache, r):
    py = make_cache()
    assert rust("set p1 7 Ada user:7") == "OK"
    assert py.get("p1") == profile(7, "Ada", "user:7")
    assert rust("set big1 8 xyz user:8 big") == "OK"
    m = r.execute_command("TIERCACHE.META", "t:v1:big1")
    assert dict(zip(m[::2], m[1::2]))[b"encoding"] == b"lz4"
    big = py.get_or_load("big1", lambda: pytest.fail("must be a hit"))
    assert big["id"] == 8 and big["name"].startswith("xyzxyz") and len(big["name"]) > 4096
    assert rust("setraw rawk 00ff10") == "OK"
    assert py.get("rawk", raw=True) == b"\x00\xff\x10"
    m = r.execute_command("TIERCACHE.META", "t:v1:p1")
    assert dict(zip(m[::2], m[1::2]))[b"tags"] == [b"ns:t:v1", b"user:7"]


def test_python_writes_rust_reads(rust, make_cache):
    py = make_cache()
    py.set("p2", profile(9, "Grace Hopper", "user:9"), tags=["user:9"])
    assert parse(rust("get p2")) == profile(9, "Grace Hopper", "user:9")
    py.set("big2", profile(10, "n" * 5000, "user:10"), tags=["user:10"])
    assert parse(rust("get big2"))["name"] == "n" * 5000
    py.set("raw2", b"\x01\x02\xfe", raw=True)
    assert rust("getraw raw2") == "RAW 0102fe"
    # get_or_load on the Rust side is an L2 hit of Python's value, not a load.
    assert parse(rust("load p2 user:9"))["name"] == "Grace Hopper"
    assert "loads=0" in rust("metrics")


def test_python_invalidation_drops_the_rust_l1(rust, make_cache):
    py = make_cache()
    before = pushes(rust)
    py.set("p3", profile(3, "Alan", "user:3"), tags=["user:3"])
    settle(rust, before)
    assert parse(rust("load p3 user:3"))["name"] == "Alan"  # an L2 hit, now in the Rust L1
    assert rust("l1 p3") == "L1 yes"
    assert py.invalidate_tags(["user:3"]) == 1
    # The Rust L1 keeps entries 60 s: only the invalidation message can make this read miss.
    wait_for(lambda: rust("l1 p3") == "L1 no", what="the Rust L1 to drop p3")
    assert rust("get p3") == "NONE"


def test_python_write_drops_the_rust_l1_key(rust, make_cache):
    py = make_cache()
    before = pushes(rust)
    py.set("p5", profile(5, "old", "user:5"), tags=["user:5"])
    settle(rust, before)
    rust("load p5 user:5")
    assert rust("l1 p5") == "L1 yes"
    py.set("p5", profile(5, "new", "user:5"), tags=["user:5"])
    wait_for(lambda: rust("l1 p5") == "L1 no", what="the key push")
    assert parse(rust("get p5"))["name"] == "new"
    py.delete("p5")
    assert rust("get p5") == "NONE"


def test_rust_invalidation_drops_the_python_l1(rust, make_cache):
    py = make_cache(l1_ttl=60)
    assert py.get_or_load("p4", lambda: profile(4, "Barbara", "user:4"), tags=["user:4"])["name"] == "Barbara"
    assert "p4" in py._core._l1
    assert rust("invalidate user:4") == "COUNT 1"
    wait_for(lambda: "p4" not in py._core._l1 or py.get("p4") is None, what="the Python L1 to drop p4")
    assert py.get("p4") is None
    # And a Rust write drops the key through tracking.
    py.get_or_load("p6", lambda: profile(6, "old", "user:6"), tags=["user:6"])
    assert rust("set p6 6 new user:6") == "OK"
    wait_for(lambda: "p6" not in py._core._l1, what="the key push")
    assert py.get("p6")["name"] == "new"


def test_stampede_across_languages_loads_once(rust, make_cache, r):
    """A Python fill and a Rust reader on the same key: the Rust side parks and gets Python's value."""
    import threading

    py = make_cache(wait_timeout=10)
    started, proceed = threading.Event(), threading.Event()

    def slow():
        started.set()
        assert proceed.wait(10)
        return profile(11, "from python", "user:11")

    out = []
    t = threading.Thread(target=lambda: out.append(py.get_or_load("p11", slow, tags=["user:11"])))
    t.start()
    assert started.wait(10)
    answer = []
    tr = threading.Thread(target=lambda: answer.append(rust("load p11 user:11")))
    tr.start()
    try:
        wait_for(lambda: int(dict(zip(*[iter(r.execute_command("TIERCACHE.STATS"))] * 2))[b"lease_waiters"]) >= 1,
                 what="the Rust reader to park")
    finally:
        proceed.set()
    t.join(10)
    tr.join(30)
    assert parse(answer[0])["name"] == "from python"
    assert "loads=0" in rust("metrics")

