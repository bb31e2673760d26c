"""Multi-tenant ACL on tags, over RESP2 and RESP3: a tag is subject to the caller's ACL key patterns as if
it were a key. Two tenants (~tenantA:*, ~tenantB:*) cannot list, count, invalidate or attach entries to
each other's tags; TAGKEYS lists only readable keys; read-only and write-only patterns; MULTI and Lua."""

import uuid

import pytest
import redis

from helpers import raises_exact, stats, tc_get, tc_set

# Redis 7.0's own error for a denied key; redis-py raises NoPermissionError with the text after "NOPERM ".
NOPERM = "this user has no permissions to access one of the keys used as arguments"


def denied():
    return raises_exact(NOPERM, redis.exceptions.NoPermissionError)

CMDS = ["+@all", "+tiercache.set", "+tiercache.get", "+tiercache.invalidate", "+tiercache.tagcount", "+tiercache.tagkeys"]


@pytest.fixture
def tenants(server, r):
    """(alice, bob) clients limited to tenantA:* / tenantB:*, with two entries each under their tags."""
    suffix = uuid.uuid4().hex[:8]
    users = {"alice": f"alice_{suffix}", "bob": f"bob_{suffix}", "reader": f"reader_{suffix}", "writer": f"writer_{suffix}"}
    patterns = {"alice": ["~tenantA:*"], "bob": ["~tenantB:*"], "reader": ["%R~tenantA:*"], "writer": ["%W~tenantA:*"]}
    clients = {}
    try:
        for role, name in users.items():
            r.execute_command("ACL", "SETUSER", name, "on", ">pw", "resetkeys", *patterns[role], *CMDS)
            clients[role] = server.client(protocol=r.tc_protocol, username=name, password="pw")
        for i in range(2):
            tc_set(clients["alice"], f"tenantA:k{i}".encode(), b"a", "TAGS", 1, b"tenantA:org:7")
            tc_set(clients["bob"], f"tenantB:k{i}".encode(), b"b", "TAGS", 2, b"tenantB:org:9", b"tenantB:all")
        yield clients
    finally:
        for c in clients.values():
            c.close()
        for name in users.values():
            r.execute_command("ACL", "DELUSER", name)


def sorted_keys(reply):
    return sorted(reply)


def test_tenants_cannot_reach_each_others_tags(r, tenants):
    a, b = tenants["alice"], tenants["bob"]
    invalidations = stats(r)["invalidations"]
    assert a.execute_command("TIERCACHE.TAGCOUNT", b"tenantA:org:7") == 2
    assert sorted_keys(a.execute_command("TIERCACHE.TAGKEYS", b"tenantA:org:7")) == [b"tenantA:k0", b"tenantA:k1"]
    for cmd in (
        ("TIERCACHE.TAGKEYS", b"tenantB:org:9"),
        ("TIERCACHE.TAGKEYS", b"tenantB:org:9", "COUNT", 5),
        ("TIERCACHE.TAGCOUNT", b"tenantB:org:9"),
        ("TIERCACHE.INVALIDATE", b"tenantB:org:9"),
        ("TIERCACHE.INVALIDATE", b"tenantA:org:7", b"tenantB:org:9"),
        ("TIERCACHE.INVALIDATE", b"org:9"),
    ):
        with denied():
            a.execute_command(*cmd)
    with denied():
        tc_set(a, b"tenantA:x", b"v", "TAGS", 2, b"tenantA:org:7", b"tenantB:org:9")
    assert r.exists(b"tenantA:x") == 0
    with denied():
        b.execute_command("TIERCACHE.INVALIDATE", b"tenantA:org:7")
    # Nothing changed for either tenant.
    assert r.execute_command("TIERCACHE.TAGCOUNT", b"tenantB:org:9") == 2
    assert tc_get(a, b"tenantA:k0") == b"a"
    assert stats(r)["invalidations"] == invalidations
    # Each tenant invalidates its own tags; the default user (~*) keeps every command.
    assert b.execute_command("TIERCACHE.INVALIDATE", b"tenantB:all") == 2
    assert tc_get(b, b"tenantB:k0") is None
    assert r.execute_command("TIERCACHE.INVALIDATE", b"tenantA:org:7") == 2


def test_tagkeys_lists_only_readable_keys(r, tenants):
    a = tenants["alice"]
    # Entries of both tenants under one of A's tags, attached by the default user.
    for i in range(4):
        tc_set(r, f"tenantB:s{i}".encode(), b"b", "TAGS", 1, b"tenantA:shared")
    tc_set(r, b"tenantA:s", b"a", "TAGS", 1, b"tenantA:shared")
    assert a.execute_command("TIERCACHE.TAGKEYS", b"tenantA:shared") == [b"tenantA:s"]
    assert a.execute_command("TIERCACHE.TAGKEYS", b"tenantA:shared", "COUNT", 1) == [b"tenantA:s"]
    assert len(r.execute_command("TIERCACHE.TAGKEYS", b"tenantA:shared")) == 5
    assert a.execute_command("TIERCACHE.TAGCOUNT", b"tenantA:shared") == 5


def test_read_only_and_write_only_patterns(r, tenants):
    reader, writer = tenants["reader"], tenants["writer"]
    assert reader.execute_command("TIERCACHE.TAGCOUNT", b"tenantA:org:7") == 2
    assert len(reader.execute_command("TIERCACHE.TAGKEYS", b"tenantA:org:7")) == 2
    with denied():
        reader.execute_command("TIERCACHE.INVALIDATE", b"tenantA:org:7")
    with denied():
        writer.execute_command("TIERCACHE.TAGCOUNT", b"tenantA:org:7")
    with denied():
        writer.execute_command("TIERCACHE.TAGKEYS", b"tenantA:org:7")
    assert tc_set(writer, b"tenantA:w", b"v", "TAGS", 1, b"tenantA:org:7") == b"OK"
    assert writer.execute_command("TIERCACHE.INVALIDATE", b"tenantA:org:7") == 3


def test_multi_and_lua_are_checked(r, tenants):
    a = tenants["alice"]
    p = a.pipeline(transaction=True)
    p.execute_command("TIERCACHE.INVALIDATE", b"tenantB:org:9")
    p.execute_command("TIERCACHE.TAGCOUNT", b"tenantA:org:7")
    out = p.execute(raise_on_error=False)
    assert isinstance(out[0], redis.exceptions.NoPermissionError) and str(out[0]) == NOPERM, out
    assert out[1] == 2
    with pytest.raises(redis.ResponseError, match="^" + NOPERM):
        a.eval("return redis.call('TIERCACHE.TAGKEYS', ARGV[1])", 0, b"tenantB:org:9")
    assert a.eval("return redis.call('TIERCACHE.TAGCOUNT', ARGV[1])", 0, b"tenantA:org:7") == 2
    assert r.execute_command("TIERCACHE.TAGCOUNT", b"tenantB:org:9") == 2
