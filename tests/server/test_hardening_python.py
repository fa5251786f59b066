"""The Python server against clients that hold it from outside: trickled requests, unfinished
multibulks, slow readers and floods of failing keys each stay within the limit that bounds them."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from pathlib import Path

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
