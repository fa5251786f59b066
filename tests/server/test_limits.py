"""Limits and operations: slow readers, client caps, bulk limits, config files, metrics."""

from __future__ import annotations

import contextlib
import select
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from ..support import RawClient, eventually
from .conftest import both_fronts, start_server


@pytest.mark.reliability
def test_client_that_never_reads_is_disconnected_and_others_stay_fast(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--output-stall-seconds", "1", "--output-buffer", "8MB")
    try:
        hog = RawClient(srv.port).sock
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b"*2\r\n$3\r\nGET\r\n$6\r\nbig:01\r\n" * 2000  # 2000 × 100 KB replies, never read
        hog.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(request) and time.monotonic() < deadline:
            try:
                sent += hog.send(request[sent:])
            except BlockingIOError:  # the server stopped reading us: flow control works
                select.select([], [hog], [], 0.05)  # until it reads again, or a while
        other = redis.Redis(port=srv.port, socket_timeout=5)
        other.set("hot", "v")
        latencies = []
        for _ in range(200):
            t0 = time.perf_counter()
            assert other.get("hot") == b"v"
            latencies.append(time.perf_counter() - t0)
        latencies.sort()
        assert latencies[197] < 0.1  # p99 of the other client's hits stays low
        eventually(
            lambda: other.info("stats")["client_output_buffer_disconnections"] >= 1,
            timeout=10,
            interval=0.2,
            message=f"the stalled client's disconnection; log:\n{srv.log}",
        )
        assert "replies unread" in srv.log
        assert other.ping()
        other.close()
        hog.close()
    finally:
        srv.stop()


@pytest.mark.reliability
@both_fronts
def test_max_clients(tmp_path: Path, front: str) -> None:
    """--max-clients 2 admits exactly two client connections on either front end, whatever
    keymiss's own connections to its server; the third is told why and closed."""
    srv = start_server(tmp_path, "--max-clients", "2", front=front)
    try:
        a, b = redis.Redis(port=srv.port), redis.Redis(port=srv.port)
        assert a.ping() and b.ping()
        with RawClient(srv.port) as s:
            # the Python server refuses at once; the module at the connection's first command.
            # Either way the refusal is the first thing read, and then the connection is closed.
            with contextlib.suppress(OSError):
                s.send_raw(b"PING\r\n")
            assert s.reply_bytes() == b"-ERR max number of clients reached\r\n"
            try:
                closed = s.sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            assert closed
        assert a.ping() and b.ping()
        if front == "valkey":  # keymiss's own connections (workers, health checks) come on top
            from keymiss.valkey.serverconf import OWN_CONNECTIONS

            assert a.info("clients")["maxclients"] == 2 + OWN_CONNECTIONS  # the server's backstop
            assert a.info("keymiss")["keymiss_refused_clients"] == 1
        else:
            assert a.info("stats")["rejected_connections"] == 1
        b.close()  # a place frees up: the next client is admitted (once the server saw b go)

        def admitted() -> bool:
            with redis.Redis(port=srv.port) as c:
                return bool(c.ping())

        eventually(admitted, timeout=10, ignore=(redis.RedisError,))
        a.close()
    finally:
        srv.stop()


@pytest.mark.reliability
def test_on_redis_7_0_a_refused_connection_runs_no_command(tmp_path: Path) -> None:
    """Redis 7.0 cannot tell the module's filter who sent a command, so the module closes a
    connection past --max-clients as it connects: nothing it pipelined at once runs (not a
    write, not MULTI/EXEC, not HELLO), and the admitted client keeps its place."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    srv = start_server(tmp_path, "--max-clients", "1", "--redis-server", binary, front="valkey")
    try:
        a = redis.Redis(port=srv.port)
        assert a.ping()
        for _ in range(3):
            with RawClient(srv.port) as s:
                with contextlib.suppress(OSError):  # the server may have closed it already
                    s.send_raw(b"SET pwned 1\r\nMULTI\r\nSET pwned2 1\r\nEXEC\r\nHELLO 3\r\n")
                    s.send_raw(b"INCR over\r\n" * 2000)
                assert s.wait_closed()
        assert a.exists("pwned", "pwned2", "over") == 0
        eventually(lambda: a.info("keymiss")["keymiss_refused_clients"] == 3, timeout=5)
        assert a.ping()
        a.close()
    finally:
        srv.stop()


@pytest.mark.reliability
def test_bulk_limit_from_config_file(tmp_path: Path) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text('[keymiss]\nmax-bulk = "1KB"\nmax-in-flight = 7\n')
    srv = start_server(tmp_path, "--config", str(config))
    try:
        with RawClient(srv.port) as s:
            s.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2000\r\n")
            assert s.reply_bytes() == b"-ERR Protocol error: invalid bulk length\r\n"
        r = redis.Redis(port=srv.port)
        assert r.config_get("keymiss-max-in-flight") == {"keymiss-max-in-flight": "7"}
        assert r.set("k", "x" * 1000)
        r.close()
    finally:
        srv.stop()


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "keymiss.toml"
    config.write_text('colour = "blue"\n')
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "unknown setting 'colour'" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "serve", "--app", "no_such_module:app"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "cannot import app module 'no_such_module'" in out.stderr


def test_prometheus_metrics(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = start_server(tmp_path, "--metrics-port", str(port))
    try:
        r = redis.Redis(port=srv.port)
        r.get("double:4")
        r.get("double:4")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'keymiss_hits_total{keyspace="double:*"} 1.0' in body
        assert 'keymiss_computations_total{keyspace="double:*"} 1.0' in body
        assert 'keymiss_compute_seconds_bucket{keyspace="double:*",le="+Inf"} 1.0' in body
        assert "keymiss_store_bytes" in body and "keymiss_in_flight" in body
        r.close()
    finally:
        srv.stop()


def test_eviction_policy_flag(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--eviction", "tinylfu-cost", "--max-memory", "8MB")
    try:
        r = redis.Redis(port=srv.port)
        assert r.info("memory")["maxmemory_policy"] == "tinylfu-cost"
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "tinylfu-cost"}
        r.close()
    finally:
        srv.stop()
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "serve", "--eviction", "random"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "unknown eviction policy 'random'" in out.stderr


def test_a_pipelining_client_that_never_reads_cannot_balloon_memory(tmp_path: Path) -> None:
    import psutil

    srv = start_server(tmp_path, "--output-buffer", "64MB", "--output-stall-seconds", "3")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        r.set("mb", b"x" * 1024**2)
        rss = psutil.Process(srv.proc.pid)
        before = rss.memory_info().rss
        hogs = []
        for _ in range(20):  # each asks for 2 GB of replies in 54 KB, and reads none of them
            hog = RawClient(srv.port)
            hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.send_raw(b"*2\r\n$3\r\nGET\r\n$2\r\nmb\r\n" * 2000)
            hogs.append(hog)
        grown = 0
        for _ in range(6):  # the server's memory, sampled while the 20 clients stay paused
            time.sleep(0.25)
            grown = max(grown, rss.memory_info().rss - before)
        # a paused client holds about one reply chunk and one value: 20 of them, far below 20 × 64 MB
        assert grown < 90 * 1024**2, f"RSS grew {grown / 1024**2:.0f} MB for 20 clients"
        assert r.get("mb") == b"x" * 1024**2  # others are served meanwhile
        for hog in hogs:
            hog.close()
    finally:
        srv.stop()


def test_one_reply_larger_than_the_output_limit_streams_to_a_reader(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--output-buffer", "4MB")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=20)
        value = b"y" * (40 * 1024**2)
        assert r.set("huge", value)
        assert r.get("huge") == value
        assert r.get("huge") == value  # and again: the connection was not closed
    finally:
        srv.stop()


@pytest.mark.reliability
def test_a_slow_but_steady_reader_is_never_cut_off(tmp_path: Path) -> None:
    """The stall timer measures replies left unread, not a client reading slowly: progress resets it."""
    srv = start_server(tmp_path, "--output-stall-seconds", "1", "--output-buffer", "64MB")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        value = b"z" * (6 * 1024**2)
        assert r.set("slow6", value)
        reader = RawClient(srv.port).sock
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        reader.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\nslow6\r\n")
        got = b""
        deadline = time.monotonic() + 20
        expected = len(b"$%d\r\n" % len(value)) + len(value) + 2
        while len(got) < expected and time.monotonic() < deadline:
            chunk = reader.recv(32768)  # at most 1.6 MB/s: 4 s or more for the whole reply
            assert chunk, f"disconnected after {len(got)} bytes"
            got += chunk
            time.sleep(0.02)  # the slow reader's pace: what the stall timer must tell from a stall
        assert got.endswith(value + b"\r\n"), len(got)
        assert r.info("stats")["client_output_buffer_disconnections"] == 0
        reader.close()
        r.close()
    finally:
        srv.stop()


def test_an_mget_or_exec_reply_past_the_output_limit_is_an_error_not_a_memory_hog(tmp_path: Path) -> None:
    import psutil

    srv = start_server(tmp_path, "--output-buffer", "4MB", "--output-stall-seconds", "30")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=20)
        r.set("big", b"x" * 1024**2)
        rss = psutil.Process(srv.proc.pid)
        before = rss.memory_info().rss
        errors = r.info("stats")["total_error_replies"]
        hogs = []
        for _ in range(4):  # each asks for 200 MB in one MGET, and reads nothing
            hog = RawClient(srv.port)
            hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.send_raw(b"*201\r\n$4\r\nMGET\r\n" + b"$3\r\nbig\r\n" * 200)
            hogs.append(hog)
        # every MGET has been answered, unread (with an error: the reply would not fit)
        eventually(lambda: r.info("stats")["total_error_replies"] >= errors + 4, timeout=10)
        assert rss.memory_info().rss - before < 60 * 1024**2
        with pytest.raises(redis.ResponseError, match="larger than the output buffer limit"):
            r.mget(["big"] * 10)
        assert r.mget(["big"] * 2) == [b"x" * 1024**2] * 2  # within the limit: as ever
        with r.pipeline() as p, pytest.raises(redis.ResponseError, match="EXEC ran, but its replies"):
            p.set("tx-ran", "1")
            for _ in range(10):
                p.get("big")
            p.execute()
        assert r.get("tx-ran") == b"1"  # the transaction itself ran whole
        for hog in hogs:
            hog.close()
    finally:
        srv.stop()
