"""The Python server against clients that hold it from outside: trickled requests, unfinished
multibulks, slow readers and floods of failing keys each stay within the limit that bounds them."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from ..support import RawClient, eventually
from .conftest import start_server


def _closed(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (an error line it sent first is read and dropped)."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except OSError:
        return True
    return False


def _trickles() -> dict[str, list[bytes]]:
    """Requests that never finish, in pieces a client sends one every 0.5 s: one argument at a time
    and one byte at a time, as multibulk and as inline commands."""
    args = [b"MSET"] + [b"k%d" % i for i in range(40)]
    multibulk = b"*%d\r\n" % (len(args) + 1) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    return {
        "multibulk, an argument at a time": [b"*%d\r\n" % (len(args) + 1)]
        + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args],
        "multibulk, a byte at a time": [multibulk[i : i + 1] for i in range(len(multibulk))],
        "inline, an argument at a time": [a + b" " for a in args],
        "inline, a byte at a time": [bytes([b]) for b in b" ".join(args)],
    }


def test_a_trickled_request_is_closed_within_the_request_limit_in_both_modes(tmp_path: Path) -> None:
    """The request timer runs from a request's first byte to its last: a complete argument of an
    unfinished command is no progress towards its end."""
    srv = start_server(tmp_path, "--request-seconds", "3")
    try:
        pieces = _trickles()
        socks = {name: RawClient(srv.port).sock for name in pieces}
        started = {name: time.monotonic() for name in pieces}
        closed_after: dict[str, float] = {}
        step = 0
        deadline = time.monotonic() + 6
        while len(closed_after) < len(socks) and time.monotonic() < deadline:
            for name, sock in socks.items():
                if name not in closed_after:
                    with contextlib.suppress(OSError):  # closed meanwhile: seen below
                        sock.sendall(pieces[name][step])
            step += 1
            beat = time.monotonic() + 0.5  # one piece every 0.5 s; a closing socket is seen at once
            while (left := beat - time.monotonic()) > 0 and len(closed_after) < len(socks):
                open_ = [s for n, s in socks.items() if n not in closed_after]
                ready = select.select(open_, [], [], left)[0]
                for name, sock in socks.items():
                    if sock in ready and _closed(sock):
                        closed_after[name] = time.monotonic() - started[name]
        assert set(closed_after) == set(socks), f"still connected after 6 s: {set(socks) - set(closed_after)}"
        late = {n: round(t, 2) for n, t in closed_after.items() if t > 4.0}
        assert not late, f"closed later than 4 s after their first byte: {late}"
        r = redis.Redis(port=srv.port, socket_timeout=5)
        assert r.info("stats")["slow_request_disconnections"] == len(socks)
        assert r.ping()
        r.close()
    finally:
        srv.stop()


def test_an_unfinished_multibulk_is_cut_at_the_query_buffer(tmp_path: Path) -> None:
    """``*1048576`` and then 64 KB arguments, never finished: the arguments already read count
    against --query-buffer, so the client is closed with an error there and memory stays bounded."""
    import psutil

    srv = start_server(tmp_path, "--query-buffer", "8MB")
    try:
        rss = psutil.Process(srv.proc.pid)
        before = rss.memory_info().rss
        c = RawClient(srv.port)
        c.send_raw(b"*1048576\r\n$3\r\nSET\r\n")
        arg = b"$65536\r\n" + b"x" * 65536 + b"\r\n"
        sent = 0
        got = b""
        while sent < 48 * 1024**2:  # six times the limit
            try:
                c.sock.sendall(arg)
            except OSError:
                break
            sent += len(arg)
            with contextlib.suppress(OSError):
                if select.select([c.sock], [], [], 0)[0]:
                    got += c.sock.recv(65536)
                    if not got or got.endswith(b"\n"):
                        break
        grown = rss.memory_info().rss - before
        assert sent < 16 * 1024**2, f"{sent} bytes of arguments accepted past an 8 MB query buffer"
        assert grown < 40 * 1024**2, f"RSS grew {grown / 1024**2:.0f} MB"
        assert got.startswith(b"-ERR Protocol error: query buffer") or "query buffer over" in srv.log
        eventually(lambda: _closed(c.sock), timeout=5, message="the client to be closed")
        r = redis.Redis(port=srv.port, socket_timeout=5)
        assert r.ping()
        r.close()
    finally:
        srv.stop()


def test_max_args_bounds_the_multibulk_count(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-args", "100")
    try:
        with RawClient(srv.port) as c:
            c.send_raw(b"*101\r\n")
            assert c.reply_bytes() == b"-ERR Protocol error: invalid multibulk length\r\n"
            assert c.wait_closed()
        with RawClient(srv.port) as c:  # at the bound: served
            c.send_raw(b"*100\r\n$4\r\nMSET\r\n" + b"$1\r\nk\r\n" * 99)
            assert c.reply_bytes() == b"-ERR wrong number of arguments for 'mset' command\r\n"
            c.send_raw(b"*101\r\n$4\r\nMSET\r\n" + b"$1\r\nk\r\n" * 100)  # past it, well formed
            assert c.reply_bytes() == b"-ERR Protocol error: invalid multibulk length\r\n"
    finally:
        srv.stop()


@pytest.mark.reliability
def test_a_20kb_per_second_reader_of_a_10mb_reply_is_never_cut(tmp_path: Path) -> None:
    """Stall means no progress at the socket: bytes the client acknowledged, not the server's own
    buffer (which the kernel drains only in thirds of its 4 MB send buffer, every minute at this pace).

    The reader is set up as over a network path (a 1460-byte segment size, a small receive buffer):
    its TCP acknowledges what it reads in steps of its receive window, so with loopback's 64 KB
    segments a 20 KB/s reader shows progress only every 3 s, which no sender can see sooner."""
    srv = start_server(tmp_path, "--output-stall-seconds", "2", "--output-buffer", "64MB")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        value = b"z" * (10 * 1024**2)
        assert r.set("slow10", value)
        reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        reader.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        reader.settimeout(5)
        reader.connect(("127.0.0.1", srv.port))
        reader.sendall(b"*2\r\n$3\r\nGET\r\n$6\r\nslow10\r\n")
        got = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5.0:  # two and a half stall windows at 20 KB/s
            chunk = reader.recv(2048)
            assert chunk, f"disconnected after {got} bytes, {time.monotonic() - t0:.1f} s"
            got += len(chunk)
            time.sleep(0.1)  # the reader's pace (2 KB each 0.1 s): what the timer must tell from a stall
        assert r.info("stats")["client_output_buffer_disconnections"] == 0, srv.log
        assert reader.recv(2048)  # still connected, still served
        # a reader that stops taking bytes is cut, as before
        eventually(
            lambda: r.info("stats")["client_output_buffer_disconnections"] == 1,
            timeout=8,
            interval=0.2,
            message="the stopped reader's disconnection",
        )
        reader.close()
        r.close()
    finally:
        srv.stop()


def test_2000_concurrent_gets_across_two_nodes_on_one_redis_never_fail(
    tmp_path: Path, redis_standalone: Any
) -> None:
    """A burst larger than the store's connections queues for one instead of failing: GETs that
    compute, GETs that wait on another node's lease, and pass-through writes, all answered."""
    import redis.asyncio as aioredis

    url = f"redis://127.0.0.1:{redis_standalone.port}/0"
    a = start_server(tmp_path, "--store", url, "--store-connections", "16")
    b = start_server(tmp_path, "--store", url)
    run = time.monotonic_ns()

    async def burst() -> tuple[list[Any], list[Any]]:
        clients = [aioredis.Redis(port=(a if i % 2 else b).port, socket_timeout=30) for i in range(2000)]
        relay = [aioredis.Redis(port=(a if i % 2 else b).port, socket_timeout=30) for i in range(300)]
        try:
            await asyncio.gather(*(c.ping() for c in clients + relay))

            def write(i: int, c: aioredis.Redis) -> Any:
                kind = i % 3
                if kind == 0:
                    return c.set(f"plain:{run}:{i}", i)
                if kind == 1:
                    return c.hset(f"hash:{run}", f"f{i}", i)
                return c.incr(f"counter:{run}")

            gets = [c.get(f"double:{i % 700}{run}") for i, c in enumerate(clients)]
            writes = [write(i, c) for i, c in enumerate(relay)]
            got = await asyncio.gather(*gets, *writes, return_exceptions=True)
            return got[:2000], got[2000:]
        finally:
            await asyncio.gather(*(c.aclose() for c in clients + relay))

    try:
        values, written = asyncio.run(burst())
        errors = [v for v in values + written if isinstance(v, BaseException)]
        assert not errors, f"{len(errors)} of 2300 failed, e.g. {errors[:3]}"
        assert values == [str(2 * int(f"{i % 700}{run}")).encode() for i in range(2000)]
        direct = redis.Redis(port=redis_standalone.port)
        assert int(direct.get(f"counter:{run}") or 0) == 100
        assert direct.hlen(f"hash:{run}") == 100
        assert direct.get(f"plain:{run}:3") == b"3"
        direct.close()
    finally:
        a.stop()
        b.stop()


def test_a_command_queued_past_the_store_wait_fails_as_busy_saying_which_setting() -> None:
    from keymiss.errors import BusyError
    from keymiss.stores.redisgate import StoreGate

    async def main() -> str:
        gate = StoreGate(1, 0.05)
        async with gate.held():
            with pytest.raises(BusyError) as caught:
                async with gate.held():
                    pass
        async with gate.held():  # the place came back
            assert gate.queued == 0
        return str(caught.value)

    assert "--store-connections" in asyncio.run(main())


def test_an_error_flood_of_long_keys_stays_within_the_error_memory(tmp_path: Path) -> None:
    """Remembered errors (error_ttl) are bounded in bytes: each keeps a cut message and a long key's
    digest, and past --error-memory the oldest go. Unbounded, 1,000 failing 64 KB keys whose
    messages quote them held 128 MB; keys are now at most 4096 bytes (longer ones are no
    keyspace's), so the flood is of 4,000-byte keys."""
    import psutil

    config = tmp_path / "keymiss.toml"
    config.write_text('[keymiss.keyspaces."fail:*"]\nerror_ttl = 600\n')
    srv = start_server(tmp_path, "--config", str(config), "--error-memory", "256KB")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=30)
        rss = psutil.Process(srv.proc.pid)
        before = rss.memory_info().rss
        run = time.monotonic_ns()
        keys = [f"fail:{run}:{i}:".ljust(4000, "k") for i in range(1000)]
        for start in range(0, len(keys), 50):
            with r.pipeline(transaction=False) as p:
                for key in keys[start : start + 50]:
                    p.get(key)
                replies = p.execute(raise_on_error=False)
            assert all(isinstance(e, redis.ResponseError) and "cannot compute" in str(e) for e in replies)
        grown = rss.memory_info().rss - before
        info = r.info("keymiss")
        held, limit = info["keymiss_remembered_error_bytes"], info["keymiss_remembered_error_limit"]
        assert limit == 256 * 1024 and 0 < held <= limit
        assert 0 < info["keymiss_remembered_errors"] < 1000  # the oldest went
        assert held / info["keymiss_remembered_errors"] < 1024  # a digest and a cut message each
        assert grown < 40 * 1024**2, f"RSS grew {grown / 1024**2:.0f} MB"
        with pytest.raises(redis.ResponseError, match="cannot compute"):  # the newest is remembered
            r.get(keys[-1])
        r.close()
    finally:
        srv.stop()


def test_pipelined_complete_commands_never_count_against_the_query_buffer(tmp_path: Path) -> None:
    """6000 PINGs in one write (84 000 bytes, each complete) under a 64KB --query-buffer: processed
    as they are read, as Redis does, not counted as one request over the limit."""
    srv = start_server(tmp_path, "--query-buffer", "64KB", front="python")
    try:
        c = RawClient(srv.port)
        c.send_raw(b"*1\r\n$4\r\nPING\r\n" * 6000)
        want = b"+PONG\r\n" * 6000
        got = b""
        c.sock.settimeout(5)
        while len(got) < len(want):
            chunk = c.sock.recv(65536)
            assert chunk, f"closed after {len(got)} bytes: {got[-200:]!r}"
            got += chunk
        assert got == want
        # an unfinished command's own bytes still count: a 100KB bulk argument is over 64KB
        big = RawClient(srv.port)
        big.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$200000\r\n" + b"x" * 100_000)
        eventually(lambda: _closed(big.sock), timeout=5, message="the client to be closed")
        assert redis.Redis(port=srv.port, socket_timeout=5).ping()
    finally:
        srv.stop()


def test_max_bulk_over_the_query_buffer_is_refused_and_its_default_follows_it() -> None:
    from keymiss.config import Settings
    from keymiss.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max-bulk \(2097152 bytes\) cannot be over query-buffer"):
        Settings(max_bulk="2MB", query_buffer="1MB").validate()
    settings = Settings(query_buffer="1MB")
    settings.validate()
    assert settings.size("max_bulk") == 1024**2
    assert Settings().size("max_bulk") == 512 * 1024**2
