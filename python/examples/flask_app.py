"""A small Flask app over SQLite with tiercache in front: the decorator, invalidation on write, and
metrics.

    .venv/bin/pip install ./python flask
    redis-server --port 6379 --save "" --loadmodule target/debug/libtiercache.so &
    TIERCACHE_REDIS=redis://127.0.0.1:6379/0 .venv/bin/python python/examples/flask_app.py

    curl localhost:5000/users/1            # loaded from SQLite, then cached (L1 + Redis)
    curl localhost:5000/users/1/orders     # cached with the tag user:1
    curl -X PUT -H 'content-type: application/json' -d '{"name": "Ada L."}' localhost:5000/users/1
    curl localhost:5000/users/1            # the write invalidated user:1: fresh from SQLite
    curl localhost:5000/metrics            # Prometheus text: tiercache_client_* counters
    curl localhost:5000/stats              # cache.stats() and the queries that reached SQLite

Reads are cached with ``@cache.cached(..., tags=["user:{user_id}"])``. A write commits to SQLite first,
then calls ``cache.invalidate_tags(["user:<id>"])``: every entry of that user (profile, orders) in every
process's L1 and in Redis is dropped, and a fill that read the old row while the write ran is fenced.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Dict, List, Optional

import redis
from flask import Flask, Response, abort, jsonify, request
from prometheus_client import CollectorRegistry, generate_latest

from tiercache import TierCache

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
                                   item TEXT NOT NULL, cents INTEGER NOT NULL);
"""


class Db:
    """SQLite behind a lock (one connection shared by Flask's threads), counting the queries run."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        self.conn.executescript(SCHEMA)
        self.lock = threading.Lock()
        self.queries = 0

    def seed(self) -> None:
        with self.lock, self.conn:
            if self.conn.execute("SELECT count(*) FROM users").fetchone()[0]:
                return
            users = [(1, "Ada", "ada@example.com"), (2, "Grace", "grace@example.com"), (3, "Alan", "alan@example.com")]
            self.conn.executemany("INSERT INTO users VALUES (?, ?, ?)", users)
            orders = [(None, 1, "keyboard", 4999), (None, 1, "monitor", 18900), (None, 2, "lamp", 3450)]
            self.conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)

    def query(self, sql: str, *args: Any) -> List[sqlite3.Row]:
        with self.lock:
            self.queries += 1
            return self.conn.execute(sql, args).fetchall()

    def execute(self, sql: str, *args: Any) -> int:
        with self.lock, self.conn:  # commits on leaving the block
            self.queries += 1
            return self.conn.execute(sql, args).rowcount


def create_app(redis_client: "redis.Redis", db_path: str = ":memory:", namespace: str = "shop",
               registry: Optional[CollectorRegistry] = None) -> Flask:
    app = Flask(__name__)
    db = Db(db_path)
    db.seed()
    registry = registry or CollectorRegistry()
    cache = TierCache(redis_client, namespace=namespace, registry=registry, l1_max_bytes=16 << 20)

    @cache.cached(ttl="10m", stale="1h", key="user:{user_id}:profile", tags=["user:{user_id}"])
    def user_profile(user_id: int) -> Optional[Dict[str, Any]]:
        rows = db.query("SELECT id, name, email FROM users WHERE id = ?", user_id)
        return dict(rows[0]) if rows else None

    @cache.cached(ttl="10m", key="user:{user_id}:orders", tags=["user:{user_id}", "orders"])
    def user_orders(user_id: int) -> Dict[str, Any]:
        rows = db.query("SELECT id, item, cents FROM orders WHERE user_id = ? ORDER BY id", user_id)
        items = [dict(r) for r in rows]
        return {"user_id": user_id, "orders": items, "total_cents": sum(i["cents"] for i in items)}

    @app.get("/users/<int:user_id>")
    def get_user(user_id: int) -> Any:
        profile = user_profile(user_id)
        if profile is None:
            abort(404)
        return jsonify(profile)

    @app.get("/users/<int:user_id>/orders")
    def get_orders(user_id: int) -> Any:
        return jsonify(user_orders(user_id))

    @app.put("/users/<int:user_id>")
    def put_user(user_id: int) -> Any:
        body = request.get_json(force=True)
        if db.execute("UPDATE users SET name = ? WHERE id = ?", body["name"], user_id) == 0:
            abort(404)
        # After the commit: every entry tagged with this user, in every process.
        cache.invalidate_tags([f"user:{user_id}"])
        return jsonify(user_profile(user_id))

    @app.post("/users/<int:user_id>/orders")
    def add_order(user_id: int) -> Any:
        body = request.get_json(force=True)
        db.execute("INSERT INTO orders (user_id, item, cents) VALUES (?, ?, ?)", user_id, body["item"], body["cents"])
        user_orders.invalidate(user_id=user_id)  # just this entry (TIERCACHE.DEL)
        return jsonify(user_orders(user_id)), 201

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")

    @app.get("/stats")
    def stats() -> Any:
        return jsonify({"cache": cache.stats(), "db_queries": db.queries})

    app.extensions["tiercache"] = cache
    app.extensions["db"] = db
    return app


if __name__ == "__main__":
    url = os.environ.get("TIERCACHE_REDIS", "redis://127.0.0.1:6379/0")
    create_app(redis.Redis.from_url(url), os.environ.get("SHOP_DB", ":memory:")).run(threaded=True)
