"""``keymiss serve`` on the wire: inline commands, malformed input fed in pieces, authentication,
and the Redis tools (redis-cli, redis-benchmark) against it. Replies are read as exact bytes, each
cut where its RESP framing ends."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..support import RawClient
from .conftest import ServerProcess, both_fronts, keyspace_info, start_server

needs_redis_tools = pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-tools not installed")


def test_inline_commands_like_telnet(server: ServerProcess) -> None:
    with RawClient(server.port) as c:
        c.send_raw(b'PING\r\nSET inline "two words"\nGET inline\r\n')
        assert b"".join(c.replies_bytes(3)) == b"+PONG\r\n+OK\r\n$9\r\ntwo words\r\n"


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
    c = RawClient(server.port)
    step = 5 if len(payload) < 100 else 4096
    for i in range(0, len(payload), step):
        c.send_raw(payload[i : i + step])
        time.sleep(0.001 if step == 5 else 0)  # a slow client: the pieces arrive apart
    try:
        reply = c.reply_bytes()
    except ConnectionResetError:
        # the server closed with our unread input still queued, so the kernel reset the connection
        reply = b"<reset>"
    if reply == b"<reset>":
        assert error is not None
    elif error is None:
        assert reply == b"+PONG\r\n"
    else:
        assert reply == error
        assert c.wait_closed(2) and c.pending() == b""  # closed after the error, as Redis does
    c.close()
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
    with RawClient(server.port) as c:
        c.send_raw(b"COMMAND DOCS get\r\n")
        reply = c.reply_bytes()
    assert reply.startswith(b"*2\r\n$3\r\nget\r\n")
    assert b"arguments" in reply and b"summary" in reply


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
@both_fronts
def test_auth_required(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, "--requirepass", "s3cret", front=front)
    try:
        once = Retry(NoBackoff(), 0)  # redis-py retries a refused AUTH (a ConnectionError) with backoff
        anon = redis.Redis(port=srv.port, retry=once)
        with pytest.raises(redis.AuthenticationError):
            anon.get("double:2")
        bad = redis.Redis(port=srv.port, password="nope", retry=once)
        with pytest.raises(redis.AuthenticationError):
            bad.ping()
        for proto in (2, 3):
            good = redis.Redis(port=srv.port, password="s3cret", protocol=proto)
            assert good.get("double:2") == b"4"
            good.close()
        # unauthenticated clients cannot send large requests, and no computation starts
        with RawClient(srv.port) as c:
            c.send_raw(b"*2\r\n$3\r\nGET\r\n$100000\r\n")
            assert c.reply_bytes() == b"-ERR Protocol error: unauthenticated bulk length\r\n"
        with RawClient(srv.port) as c:
            c.send_raw(b"GET slow:noauth\r\n")
            assert c.reply_bytes() == b"-NOAUTH Authentication required.\r\n"
        r = redis.Redis(port=srv.port, password="s3cret")
        assert keyspace_info(r, "slow:*")["misses"] == 0
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
