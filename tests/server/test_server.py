"""A real ``keymiss serve`` process driven by redis-py (RESP2 and RESP3): the commands a Redis
client reaches for, on both front ends."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import redis

from keymiss.stats import SHARED_KEYSPACE_FIELDS
from keymiss.valkey import protocol

from ..support import eventually
from .conftest import ServerProcess, keyspace_info


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def client(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[redis.Redis]:
    r = redis.Redis(port=server.port, protocol=request.param, socket_timeout=10)
    yield r
    r.close()


def test_miss_computes_stores_and_then_hits(client: redis.Redis) -> None:
    key = f"double:{time.monotonic_ns() % 10_000}"
    expected = str(2 * int(key.split(":")[1])).encode()
    assert client.get(key) == expected
    before = keyspace_info(client, "double:*")
    assert client.get(key) == expected
    after = keyspace_info(client, "double:*")
    assert after["hits"] == before["hits"] + 1
    assert after["computations"] == before["computations"]


def test_unregistered_key_is_nil_and_set_values_are_served(client: redis.Redis) -> None:
    assert client.get("nobody:owns:this") is None
    assert client.set("plain", b"\x00bytes\xff")
    assert client.get("plain") == b"\x00bytes\xff"


def test_template_key_value_is_json(client: redis.Redis) -> None:
    key = "qa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral_transmission among adults"
    value = json.loads(client.get(key))
    assert value == {
        "tag": "8YG",
        "context": "PMC302072.xml:{8YG}:10",
        "question": "Who performs viral_transmission among adults",
    }
    assert 90 <= client.ttl(key) <= 100


@pytest.mark.reliability
def test_handler_errors_name_the_keyspace_and_keep_the_connection(client: redis.Redis, front: str) -> None:
    with pytest.raises(redis.ResponseError, match=r"keyspace 'fail:\*': handler failed: ValueError"):
        client.get("fail:1")
    with pytest.raises(redis.ResponseError, match=r"keyspace 'hang:\*'.*within 0.2s"):
        client.get("hang:1")
    # both front ends: a key that starts like the template but does not fit it is an error
    with pytest.raises(redis.ResponseError, match="does not fit keyspace template"):
        client.get("qa{8YG}_no-question")
    assert client.ping()
    with pytest.raises(redis.ResponseError):
        client.get("fail:1")  # and the next GET retries (and fails again) rather than caching


def test_mget_mixes_hits_misses_unregistered_and_errors(client: redis.Redis, front: str) -> None:
    client.set("mget:plain", "p")
    client.get("double:5")
    values = client.mget(["double:5", "double:6", "nobody", "mget:plain", "batch:a", "batch:b"])
    assert values[:4] == [b"10", b"12", None, b"p"]
    assert values[4] == b"batch:a:2" and values[5] == b"batch:b:2"  # both misses in one batch
    mixed = client.execute_command("MGET", "double:7", "fail:x")
    assert mixed[0] == b"14"
    if front == "python":
        assert isinstance(mixed[1], redis.ResponseError)
    else:  # a real server's MGET has no error elements: a failed key reads as nil
        assert mixed[1] is None


def test_set_options_and_ttls(client: redis.Redis) -> None:
    k = f"ttl:{time.monotonic_ns()}"
    assert client.set(k, "v", ex=100)
    assert 99 <= client.ttl(k) <= 100
    assert 99_000 <= client.pttl(k) <= 100_000
    assert client.set(k, "w", nx=True) is None
    assert client.set(k + "x", "w", xx=True) is None
    assert client.set(k, "w", keepttl=True)
    assert client.ttl(k) > 0
    assert client.persist(k)
    assert client.ttl(k) == -1
    assert client.expire(k, 50)
    assert client.getex(k, persist=True) == b"w"
    assert client.ttl(k) == -1
    assert client.ttl("missing:key") == -2
    assert client.set(k, "old")
    assert client.set(k, "new", get=True) == b"old"
    with pytest.raises(redis.ResponseError, match="invalid expire time in 'set' command"):
        client.set(k, "v", ex=0)
    with pytest.raises(redis.ResponseError, match="syntax error"):
        client.execute_command("SET", k, "v", "NX", "XX")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        client.execute_command("SET", k, "v", "EX", "soon")


def test_short_ttl_expires(client: redis.Redis) -> None:
    k = f"short:{time.monotonic_ns()}"
    client.set(k, "v", px=100)
    eventually(lambda: client.get(k) is None, timeout=0.25)  # gone within 250 ms
    assert client.exists(k) == 0


def test_del_exists_dbsize_type(client: redis.Redis) -> None:
    client.set("d1", "1")
    client.set("d2", "2")
    assert client.exists("d1", "d1", "d2", "d3") == 3
    assert client.type("d1") == b"string"
    assert client.type("d3") == b"none"
    assert client.delete("d1", "d3") == 1
    assert client.unlink("d2") == 1
    assert client.dbsize() >= 0


def test_scan_with_match_and_count(client: redis.Redis) -> None:
    prefix = f"scan{time.monotonic_ns()}:"
    for i in range(120):
        client.set(f"{prefix}{i}", i)
    found = set(client.scan_iter(match=prefix + "*", count=17))
    assert found == {f"{prefix}{i}".encode() for i in range(120)}
    with pytest.raises(redis.ResponseError, match="invalid cursor"):
        client.execute_command("SCAN", "abc")


def test_info_has_redis_field_names_and_keymiss_section(client: redis.Redis, front: str) -> None:
    client.get("double:99")
    info = client.info()
    for field in (
        "redis_version",
        "connected_clients",
        "used_memory",
        "keyspace_hits",
        "keyspace_misses",
        "total_commands_processed",
        "uptime_in_seconds",
        "maxmemory",
    ):
        assert field in info, field
    ks = keyspace_info(client, "double:*")
    for field in SHARED_KEYSPACE_FIELDS:  # the same words on both servers
        assert field in ks, field
    # the Python server's own fields; the module's
    extra = ("calls", "coalesced", "compute_seconds_saved") if front == "python" else ("fills", "workers")
    for field in extra:
        assert field in ks, field
    assert ks["computations"] >= 1


def test_client_commands(client: redis.Redis) -> None:
    assert client.client_setname("tester")
    assert client.client_getname() in ("tester", b"tester")
    cid = client.client_id()
    assert isinstance(cid, int)
    listing = client.client_list()
    assert any(c["name"] == "tester" for c in listing)
    info = client.client_info()
    assert int(info["id"]) == cid
    with pytest.raises(redis.ResponseError, match="cannot contain spaces"):
        client.client_setname("has space")


def test_connection_and_server_commands(client: redis.Redis, front: str) -> None:
    assert client.ping()
    assert client.echo("hi") == b"hi"
    assert client.execute_command("SELECT", 0)
    with pytest.raises(redis.ResponseError, match="DB index is out of range"):
        client.execute_command("SELECT", 1 if front == "python" else 16)
    if front == "python":
        assert client.config_get("maxmemory")
    else:  # the embedded server's CONFIG is its operator's (--admin-password), not its clients'
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_get("maxmemory")
    assert client.command_count() > 20
    with pytest.raises(redis.ResponseError, match="unknown command 'NOPE', with args beginning with: 'x'"):
        client.execute_command("NOPE", "x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get' command"):
        client.execute_command("GET")


def test_keymiss_forget_on_both_front_ends(client: redis.Redis, front: str) -> None:
    """``KEYMISS.FORGET`` through ``keymiss serve``: the embedded server's clients may send it."""
    for i in range(3):
        client.get(f"double:{2000 + i}")
    client.set("plain:2000", "mine")
    assert client.execute_command(protocol.CMD_FORGET, "double:200*") == 3
    assert client.exists("double:2000", "double:2001", "double:2002") == 0
    assert client.get("double:2000") == b"4000"  # computed again
    with pytest.raises(redis.ResponseError, match="no keyspace's keys match"):
        client.execute_command(protocol.CMD_FORGET, "plain:*")
    with pytest.raises(redis.ResponseError, match="no keyspace declares that tag"):
        client.execute_command(protocol.CMD_FORGET, protocol.OPT_TAG, "nobody")
    assert client.get("plain:2000") == b"mine"


def test_keymiss_operator_commands(client: redis.Redis, front: str) -> None:
    if front != "python":
        pytest.skip("KEYMISS KEYSPACES/FORGET/STATS are the Python server's; the module has INFO keymiss")
    spaces = client.execute_command("KEYMISS", "KEYSPACES")
    assert len(spaces) >= 7
    for i in range(3):
        client.get(f"double:{1000 + i}")
    assert client.execute_command("KEYMISS", "FORGET", "double:100*") == 3
    with pytest.raises(redis.ResponseError, match="no keyspace declares that tag"):
        client.execute_command("KEYMISS", "FORGET", "TAG", "nobody")
    with pytest.raises(redis.ResponseError, match="FORGET takes a pattern, or TAG and a tag"):
        client.execute_command("KEYMISS", "FORGET", "NOTTAG", "x")
    assert client.exists("double:1000") == 0
    stats = client.execute_command("KEYMISS", "STATS")
    assert stats
