"""A real ``keymiss serve`` process driven by redis-py (RESP2 and RESP3), redis-cli and raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from .conftest import FRONTS, ServerProcess, both_fronts, raw_connect, read_reply, start_server

needs_redis_tools = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-tools not installed")


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def client(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[redis.Redis]:
    r = redis.Redis(port=server.port, protocol=request.param, socket_timeout=10)
    yield r
    r.close()


def keymiss_section(r: redis.Redis) -> dict[str, dict[str, object]]:
    info = r.info("keymiss")
    out = {}
    for k, v in info.items():
        if k.startswith(("keyspace_", "keymiss_keyspace_")) and isinstance(v, dict):
            out[str(v["pattern"])] = v
    return out


def test_miss_computes_stores_and_then_hits(client: redis.Redis) -> None:
    key = f"double:{time.monotonic_ns() % 10_000}"
    expected = str(2 * int(key.split(":")[1])).encode()
    assert client.get(key) == expected
    before = keymiss_section(client)["double:*"]
    assert client.get(key) == expected
    after = keymiss_section(client)["double:*"]
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
    if front == "python":
        with pytest.raises(redis.ResponseError, match="does not fit keyspace template"):
            client.get("qa{8YG}_no-question")
    else:  # the module routes by the template's glob (qa{*}_*_*): this key is in no keyspace
        assert client.get("qa{8YG}_no-question") is None
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
    time.sleep(0.25)
    assert client.get(k) is None
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
    ks = keymiss_section(client)["double:*"]
    for field in ("hits", "misses", "computations", "timeouts", "in_flight"):
        assert field in ks, field
    # the Python server times computations itself; the module counts what workers answer
    extra = (
        ("errors", "mean_compute_seconds", "compute_seconds_saved")
        if front == "python"
        else ("failures", "fills", "workers")
    )
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
    assert client.config_get("maxmemory")
    assert client.command_count() > 20
    with pytest.raises(redis.ResponseError, match="unknown command 'NOPE', with args beginning with: 'x'"):
        client.execute_command("NOPE", "x")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get' command"):
        client.execute_command("GET")


def test_keymiss_operator_commands(client: redis.Redis, front: str) -> None:
    if front != "python":
        pytest.skip("KEYMISS KEYSPACES/FORGET/STATS are the Python server's; the module has INFO keymiss")
    spaces = client.execute_command("KEYMISS", "KEYSPACES")
    assert len(spaces) >= 7
    for i in range(3):
        client.get(f"double:{1000 + i}")
    assert client.execute_command("KEYMISS", "FORGET", "double:100*") == 3
    assert client.exists("double:1000") == 0
    stats = client.execute_command("KEYMISS", "STATS")
    assert stats


def test_200_concurrent_clients_one_computation(server: ServerProcess) -> None:
    key = f"slow:{time.monotonic_ns()}"

    async def main() -> list[bytes | None]:
        clients = [aioredis.Redis(port=server.port, protocol=2) for _ in range(200)]
        try:
            await asyncio.gather(*(c.ping() for c in clients))
            return list(await asyncio.gather(*(c.get(key) for c in clients)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    r = redis.Redis(port=server.port)
    before = keymiss_section(r)["slow:*"]["computations"]
    values = asyncio.run(main())
    assert values == [f"slow result for {key}".encode()] * 200
    assert keymiss_section(r)["slow:*"]["computations"] == before + 1  # type: ignore[operator]
    r.close()


def test_hits_stay_fast_while_a_model_runs(server: ServerProcess) -> None:
    r = redis.Redis(port=server.port)
    r.set("hot", "v")
    slow_client = redis.Redis(port=server.port)
    t = threading.Thread(target=slow_client.get, args=(f"block:{time.monotonic_ns()}",))
    t.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    for _ in range(200):
        assert r.get("hot") == b"v"
    elapsed = time.perf_counter() - t0
    still_running = t.is_alive()
    t.join(5)
    assert still_running, "the model should still be running during the hits"
    assert elapsed < 0.8  # a blocked loop would take the model's full second
    r.close()
    slow_client.close()


def test_pipelined_replies_keep_order_around_a_miss(server: ServerProcess) -> None:
    r = redis.Redis(port=server.port)
    key = f"slow:p{time.monotonic_ns()}"
    with r.pipeline(transaction=False) as p:
        p.set("pipe:a", "1").get(key).get("pipe:a").ping().echo("end")
        out = p.execute()
    assert out == [True, f"slow result for {key}".encode(), b"1", True, b"end"]
    r.close()


def test_inline_commands_like_telnet(server: ServerProcess) -> None:
    s = raw_connect(server.port)
    s.sendall(b'PING\r\nSET inline "two words"\nGET inline\r\n')
    assert read_reply(s) == b"+PONG\r\n+OK\r\n$9\r\ntwo words\r\n"
    s.close()


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"*-10\r\nPING\r\n", None),
        (b"*3000000000\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
        (b"*1\r\n$blabla\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*1\r\n$2000000000\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
        (b"*1\r\nx\r\n", b"-ERR Protocol error: expected '$', got 'x'\r\n"),
        (b'SET "a\r\n', b"-ERR Protocol error: unbalanced quotes in request\r\n"),
        (b"\x00" * 70_000, b"-ERR Protocol error: too big inline request\r\n"),
    ],
)
@pytest.mark.reliability
def test_malformed_input_in_chunks_gets_error_and_server_keeps_serving(
    server: ServerProcess, payload: bytes, error: bytes | None
) -> None:
    s = raw_connect(server.port)
    step = 5 if len(payload) < 100 else 4096
    for i in range(0, len(payload), step):
        s.sendall(payload[i : i + step])
        time.sleep(0.001 if step == 5 else 0)
    try:
        reply = read_reply(s)
    except ConnectionResetError:
        # the server closed with our unread input still queued, so the kernel reset the connection
        reply = b"<reset>"
    if reply == b"<reset>":
        assert error is not None
    elif error is None:
        assert reply == b"+PONG\r\n"
    else:
        assert reply == error
        s.settimeout(2)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""  # closed after the error, as Redis does
    s.close()
    fresh = redis.Redis(port=server.port)
    assert fresh.ping()
    fresh.close()


@needs_redis_tools
def test_redis_cli_session(server: ServerProcess) -> None:
    def cli(*args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(server.port), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    assert cli("GET", "double:123").strip() == "246"
    assert cli("GET", "double:123").strip() == "246"
    assert "keyspace_0:pattern=double:*" in cli("INFO", "keymiss")
    assert "proto 3" in cli("-3", "HELLO", "3")
    assert "ERR" in cli("GET", "fail:cli")


def test_command_docs_for_redis_cli_hints(server: ServerProcess) -> None:
    s = raw_connect(server.port)
    s.sendall(b"COMMAND DOCS get\r\n")
    reply = read_reply(s)
    assert reply.startswith(b"*2\r\n$3\r\nget\r\n")
    assert b"arguments" in reply and b"summary" in reply
    s.close()


@needs_redis_tools
def test_redis_benchmark_completes_without_errors(server: ServerProcess) -> None:
    out = subprocess.run(
        ["redis-benchmark", "-p", str(server.port), "-t", "get,set", "-n", "100000", "-P", "16", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "requests per second" in text
    assert "ERR" not in text and "error" not in text.lower()


@pytest.mark.reliability
def test_busy_when_in_flight_cap_is_reached(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-in-flight", "2")
    try:

        async def main() -> list[object]:
            clients = [aioredis.Redis(port=srv.port) for _ in range(4)]
            try:
                return list(
                    await asyncio.gather(
                        *(c.get(f"slow:busy{i}") for i, c in enumerate(clients)), return_exceptions=True
                    )
                )
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        results = asyncio.run(main())
        busy = [r for r in results if isinstance(r, redis.ResponseError)]
        assert len(busy) == 2
        assert all(str(b).startswith("BUSY too many computations in flight") for b in busy)
        r = redis.Redis(port=srv.port)
        assert r.get("slow:busy3") is not None  # retrying later works
        assert r.info("keymiss")["keymiss_busy_rejections"] == 2
        r.close()
    finally:
        srv.stop()


@pytest.mark.reliability
@both_fronts
def test_auth_required(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, "--requirepass", "s3cret", front=front)
    try:
        anon = redis.Redis(port=srv.port)
        with pytest.raises(redis.AuthenticationError):
            anon.get("double:2")
        bad = redis.Redis(port=srv.port, password="nope")
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        for proto in (2, 3):
            good = redis.Redis(port=srv.port, password="s3cret", protocol=proto)
            assert good.get("double:2") == b"4"
            good.close()
        # unauthenticated clients cannot send large requests, and no computation starts
        s = raw_connect(srv.port)
        s.sendall(b"*2\r\n$3\r\nGET\r\n$100000\r\n")
        assert read_reply(s) == b"-ERR Protocol error: unauthenticated bulk length\r\n"
        s.close()
        s = raw_connect(srv.port)
        s.sendall(b"GET slow:noauth\r\n")
        assert read_reply(s) == b"-NOAUTH Authentication required.\r\n"
        s.close()
        r = redis.Redis(port=srv.port, password="s3cret")
        assert keymiss_section(r)["slow:*"]["misses"] == 0
        r.close()
    finally:
        srv.stop()


@pytest.mark.reliability
@both_fronts
def test_refuses_public_bind_without_password(tmp_path: Path, front: str) -> None:
    out = subprocess.run(
        ["python", "-m", "keymiss", "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a password" in out.stderr


@both_fronts
def test_graceful_shutdown_finishes_running_computation(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port, socket_timeout=10)
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(r.get("slow:shutdown")))
    t.start()
    time.sleep(0.1)
    assert srv.stop(signal.SIGTERM) == 0
    t.join(10)
    assert result == [b"slow result for slow:shutdown"]
    assert "keymiss stopped" in srv.log


@pytest.mark.parametrize("front", FRONTS)
def test_early_refresh_over_resp_keeps_readers_from_waiting(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port)
    try:
        r.get("fresh:1")  # the one miss
        slowest, seen = 0.0, set()
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            seen.add(r.get("fresh:1"))
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.003)
        assert slowest < 0.08, slowest  # a wait on the 0.1 s computation would show
        assert len(seen) >= 3  # refreshed values were served
        ks = _keyspace_info(r, "fresh:*")
        assert int(ks["computations"]) <= 2 * (4.0 / 0.6) + 2, ks
    finally:
        r.close()
        srv.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_a_stale_value_is_served_at_once_over_resp_while_it_refreshes(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port)
    try:
        first = r.get("edition:1")
        time.sleep(0.35)  # past its TTL
        took = []
        for _ in range(5):  # all inside the 1.5 s refresh; the best of five rules out a scheduler hiccup
            t0 = time.monotonic()
            assert r.get("edition:1") == first  # the stale value, at once
            took.append(time.monotonic() - t0)
        assert min(took) < 0.05 and max(took) < 1.0, took
        deadline = time.monotonic() + 5
        while r.get("edition:1") == first:  # the refresh lands
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.get("edition:1") != first
    finally:
        r.close()
        srv.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_a_version_switch_hides_old_values_over_resp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: str
) -> None:
    version_file = tmp_path / "version"
    version_file.write_text("v1")
    monkeypatch.setenv("KEYMISS_TEST_VERSION_FILE", str(version_file))
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port)
    try:
        assert r.get("model:1") == b"model:1 under v1"
        version_file.write_text("v2")  # the application switches models
        switched(r, "v2")
        assert r.get("model:1") == b"model:1 under v2"  # never the v1 value, not even once
        assert r.mget(["model:1", "model:2"]) == [b"model:1 under v2", b"model:2 under v2"]
        r.set("model:3", b"a client's own")
        time.sleep(0.1)
        version_file.write_text("v3")
        switched(r, "v3")
        assert r.get("model:3") == b"a client's own"  # a client's write is every version's
        assert _keyspace_info(r, "model:*")["version"] == "v3"
        assert int(_keyspace_info(r, "model:*")["version_misses"]) >= 1
    finally:
        r.close()
        srv.stop()


def _keyspace_info(r: redis.Redis, pattern: str) -> dict[str, Any]:
    """One keyspace's INFO fields, from either front end (the module reports them as keyspace_N)."""
    info = r.info("keymiss")
    for k, v in info.items():
        if k.endswith(tuple(f"keyspace_{i}" for i in range(64))) and v["pattern"] == pattern:
            return dict(v)
    raise AssertionError(f"no keyspace {pattern!r} in {info}")


def switched(r: redis.Redis, version: str, wait: float = 3.0) -> None:
    """Until the serving front end knows the new version (the worker polls it every 50 ms)."""
    deadline = time.monotonic() + wait
    while str(_keyspace_info(r, "model:*").get("version")) != version:
        assert time.monotonic() < deadline, _keyspace_info(r, "model:*")
        time.sleep(0.01)
