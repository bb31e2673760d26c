"""`tiercache warm` (the Rust CLI, cli/src/warm.rs) writes entries the Python client reads: a row becomes a
MessagePack map (a dict here), large values are lz4-framed, keys and the namespace tag follow the
clients' naming, and the annotation's tags invalidate them."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

BIN = REPO / "target" / "debug" / "tiercache"


@pytest.fixture(scope="session")
def cli_built() -> None:
    if shutil.which("cargo") is None:
        pytest.skip("cargo is not installed: the tiercache CLI cannot be built")
    r = subprocess.run(["cargo", "build", "-q", "-p", "tiercache-cli"], cwd=REPO, capture_output=True, text=True,
                       timeout=1800)
    if r.returncode != 0:
        pytest.fail(f"cargo build -p tiercache-cli failed:\n{r.stderr[-3000:]}")


def test_warmed_rows_read_as_dicts(cli_built: None, server, make_cache, r, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, org_id INTEGER, name TEXT, bio TEXT, avatar BLOB)")
        c.execute("INSERT INTO users VALUES (1, 7, 'ann', 'x', X'00ff'), (2, NULL, 'bob', ?, NULL)", ("long " * 500,))
    sql = tmp_path / "warm.sql"
    sql.write_text("-- tiercache: key=user:{id} tags=user:{id},org:{org_id} ttl=60\n"
                   "SELECT id, org_id, name, bio, avatar FROM users;\n")
    out = subprocess.run([str(BIN), "warm", "--sqlite", str(db), "--file", str(sql),
                          "--redis", f"redis://127.0.0.1:{server.port}/", "--namespace", "t"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "warm: loaded 2, skipped 0, errors 0" in out.stdout
    cache = make_cache()
    assert cache.get("user:1") == {"id": 1, "org_id": 7, "name": "ann", "bio": "x", "avatar": b"\x00\xff"}
    u2 = cache.get("user:2")
    assert u2["org_id"] is None and u2["bio"] == "long " * 500
    assert r.execute_command("TIERCACHE.GET", "t:v1:user:2", "ENCODED")[0] == b"lz4"
    assert r.execute_command("TIERCACHE.INVALIDATE", "org:7") == 1
    assert cache.get("user:1") is None
    cache.flush_namespace()
    assert cache.get("user:2") is None
