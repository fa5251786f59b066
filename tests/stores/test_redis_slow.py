"""A shared Redis that is slow (a long script, big commands queued ahead) but serving: a command is
sent once, never again, and its late answer reads as BUSY, not as Redis being unavailable."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from keymiss.errors import BusyError
from keymiss.stores.redis import RedisStore

from ..support import eventually

#: spins Redis for ARGV[1] milliseconds (scripts under lua-time-limit block without BUSY replies)
SPIN = (
    "local t = redis.call('time') local stop = t[1] * 1000 + t[2] / 1000 + tonumber(ARGV[1]) "
    "repeat t = redis.call('time') until t[1] * 1000 + t[2] / 1000 >= stop return 1"
)


def _busy_for(port: int, ms: int) -> socket.socket:
    """Start a script spinning the server for ``ms``, and return once the server is busy with it
    (a PING on another connection gets no answer within 50 ms)."""
    spinner = socket.create_connection(("127.0.0.1", port))
    body = [b"EVAL", SPIN.encode(), b"0", str(ms).encode()]
    spinner.sendall(b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in body))

    def busy() -> bool:
        probe = redis.Redis(port=port, socket_timeout=0.05, retry=Retry(NoBackoff(), 0))
        try:
            probe.ping()
            return False
        except redis.TimeoutError:
            return True
        finally:
            probe.close()

    eventually(busy, timeout=2, interval=0.001, message="the spinning script to start")
    return spinner


@pytest.fixture
def redis_port(redis_standalone: Any) -> Iterator[int]:
    yield redis_standalone.port


async def test_a_slow_write_is_sent_once_and_reads_as_busy(redis_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{redis_port}/0", reply_timeout=0.4)
    key = f"count:{time.monotonic_ns()}"
    try:
        assert await store.raw([b"PING"]) is not None  # the connection is open and greeted
        spinner = _busy_for(redis_port, 1200)
        start = time.monotonic()
        with pytest.raises(BusyError) as caught:
            await store.raw([b"INCR", key.encode()])
        assert time.monotonic() - start < 1.0  # not waited out twice
        text = str(caught.value)
        assert "did not answer within 0.4s" in text and "may or may not have been applied" in text
        assert "unavailable" not in text
        spinner.recv(64)  # the script ended; the INCR ran after it, once
        spinner.close()
        assert redis.Redis(port=redis_port).get(key) == b"1"
        # the timed-out connection is not reused: the next command reads its own answer
        assert await store.raw([b"ECHO", b"after"]) == b"after"
    finally:
        await store.close()


async def test_a_slow_read_reads_as_busy_not_unavailable(redis_port: int) -> None:
    store = RedisStore(f"redis://127.0.0.1:{redis_port}/0", reply_timeout=0.3)
    key = f"read:{time.monotonic_ns()}"
    try:
        await store.set(key, b"v")
        assert await store.get(key) is not None
        spinner = _busy_for(redis_port, 900)
        with pytest.raises(BusyError, match=r"did not answer within 0\.3s"):
            await store.get(key)
        spinner.recv(64)
        spinner.close()
        item = await store.get(key)
        assert item is not None and item.value == b"v"
    finally:
        await store.close()


def test_the_reply_timeout_is_a_setting() -> None:
    from keymiss.stores import open_store

    s = open_store("redis://127.0.0.1:1/0", reply_timeout=7)
    assert isinstance(s, RedisStore) and s.reply_timeout == 7
    s = open_store("redis://127.0.0.1:1/0?reply_timeout=3", reply_timeout=7)
    assert isinstance(s, RedisStore) and s.reply_timeout == 3
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
