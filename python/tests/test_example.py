"""Drives python/examples/flask_app.py with Flask's test client: the decorator, invalidation on write,
and the metrics endpoint; two app instances stand in for two servers sharing Redis."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("flask")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from flask_app import create_app  # noqa: E402

from conftest import wait_for  # noqa: E402


@pytest.fixture
def apps(server, r, protocol, tmp_path):
    db = str(tmp_path / "shop.db")
    a = create_app(server.client(protocol=protocol), db)
    b = create_app(server.client(protocol=protocol), db)
    yield a, b
    for app in (a, b):
        app.extensions["tiercache"].close()


def test_reads_are_cached_and_writes_invalidate_everywhere(apps):
    a, b = apps
    ca, cb = a.test_client(), b.test_client()
    db = a.extensions["db"]
    assert ca.get("/users/1").get_json() == {"id": 1, "name": "Ada", "email": "ada@example.com"}
    assert ca.get("/users/1/orders").get_json()["total_cents"] == 23899
    q = db.queries
    for _ in range(5):
        assert ca.get("/users/1").status_code == 200
        ca.get("/users/1/orders")
    assert db.queries == q  # L1 hits
    assert cb.get("/users/1").get_json()["name"] == "Ada"  # the other server: an L2 hit
    assert b.extensions["db"].queries == 0 and b.extensions["tiercache"].stats()["l2_hits"] == 1

    # A write on server b: commit, then invalidate the user's tag.
    assert cb.put("/users/1", json={"name": "Ada L."}).get_json()["name"] == "Ada L."
    wait_for(lambda: ca.get("/users/1").get_json()["name"] == "Ada L.", what="server a to see the write")
    # The orders entry carried the tag too.
    before = db.queries
    assert ca.get("/users/1/orders").get_json()["total_cents"] == 23899
    assert db.queries == before + 1

    # A new order drops just the orders entry (fn.invalidate -> TIERCACHE.DEL).
    assert ca.post("/users/2/orders", json={"item": "desk", "cents": 100}).status_code == 201
    wait_for(lambda: cb.get("/users/2/orders").get_json()["total_cents"] == 3550, what="the orders entry")
    assert ca.get("/users/404").status_code == 404


def test_metrics_endpoint(apps):
    a, _ = apps
    c = a.test_client()
    c.get("/users/2")
    c.get("/users/2")
    text = c.get("/metrics").get_data(as_text=True)
    assert "tiercache_client_l1_hits_total 1.0" in text
    assert "tiercache_client_loads_total 1.0" in text
    assert "# TYPE tiercache_client_l1_bytes gauge" in text
    stats = c.get("/stats").get_json()
    assert stats["cache"]["l1_hits"] == 1 and stats["db_queries"] == 1  # one load
