"""What a server operator and its clients see when handlers fail, hang or are misconfigured."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from ..support import eventually
from .conftest import both_fronts, fill_settled, start_server


def serve_with_config(config: Path) -> subprocess.CompletedProcess[str]:
    """``keymiss serve`` of the sample app with a config file, expected to exit at start."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "keymiss",
            "serve",
            "--port",
            "0",
            "--config",
            str(config),
            "--app",
            "tests.server.sample_app:app",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent.parent,
    )


def test_shutdown_ends_with_stuck_handlers_and_says_so(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--grace-seconds", "1")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        for i in range(2):  # both of stuck's slots, held past the 0.2 s timeout
            with pytest.raises(redis.ResponseError, match=r"did not finish within 0\.2s"):
                r.get(f"stuck:{i}")
        with pytest.raises(redis.ResponseError, match=r"^BUSY .*past their timeout"):
            r.get("stuck:more")
        info = r.info("keymiss")
        assert info["keymiss_stuck_handlers"] == 2 and info["keymiss_in_flight"] == 2
        assert r.get("double:4") == b"8"  # other keyspaces keep computing
        t0 = time.monotonic()
        status = srv.stop(signal.SIGTERM, timeout=20)
        assert time.monotonic() - t0 < 10, "shutdown waited for handlers stuck for 60 s"
        assert status == 3, srv.log  # the exit status says handlers were abandoned
        assert "abandoning 2 handler call(s)" in srv.log
    finally:
        srv.stop(signal.SIGKILL)


@both_fronts
def test_handler_failures_are_logged_with_traceback_and_text_can_be_hidden(
    tmp_path: Path, front: str
) -> None:
    srv = start_server(tmp_path, "--handler-errors", "type", "--log-format", "json", front=front)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        for _ in range(5):
            with pytest.raises(redis.ResponseError) as info:
                r.get("secret:1")
            assert "s3cr3t" not in str(info.value) and "RuntimeError" in str(info.value)
        (entry,) = r.mget(["secret:2"])  # MGET entries are error replies with the same text
        assert entry is None or "s3cr3t" not in str(entry)
        assert r.ping()
        eventually(lambda: "s3cr3t" in srv.log, timeout=5)  # the one failure logged, traceback and all
        lines = [json.loads(line) for line in srv.log.splitlines() if line.startswith("{")]
        failures = [x for x in lines if x["logger"] == "keymiss.handler"]
        assert len(failures) == 1, failures  # once per window, not once per request
        assert "secret:*" in failures[0]["message"] and "s3cr3t" in failures[0]["traceback"]
        assert all({"time", "level", "logger", "message"} <= set(x) for x in lines)
    finally:
        srv.stop()


def test_access_log_names_each_command(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--access-log", "--requirepass", "pw")
    try:
        r = redis.Redis(port=srv.port, password="pw", socket_timeout=10)
        r.get("double:21")
        r.set("plain", "v")
        eventually(lambda: "SET plain" in srv.log, timeout=5)
        assert "keymiss.access" in srv.log and "GET double:21" in srv.log and "SET plain" in srv.log
        assert "pw" not in srv.log.split("keymiss.access", 1)[1].split("GET double:21")[0]  # no password
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "store",
    [
        "redis://127.0.0.1:1?timeout=x",
        "redis://127.0.0.1:1?lease_ms=-5",
        "redis://127.0.0.1:1?bogus=1",
        "redis://127.0.0.1:1/abc",
        "lmdb:",
        "memory?max_memory=lots",
        "ftp://nowhere",
    ],
)
def test_a_malformed_store_url_is_one_clean_line(store: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "serve", "--port", "0", "--store", store],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("keymiss: "), out.stderr


def test_help_names_every_accepted_value() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    text = " ".join(out.stdout.split())
    for value in ("memory", "lmdb:PATH", "redis://", "redis+cluster://", "tinylfu-cost", "lru", "fifo"):
        assert value in text, value
    for dtype in ("float32", "bf16-autocast", "bfloat16"):
        assert dtype in text, dtype


@both_fronts
def test_a_handler_raising_systemexit_or_cancelled_fails_only_its_key(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        for key in ("sysexit:1", "cancelled:1"):
            pipe = r.pipeline(transaction=False)
            pipe.get(key)
            pipe.ping()
            got = pipe.execute(raise_on_error=False)
            assert isinstance(got[0], redis.ResponseError) and key.split(":")[0] in str(got[0]), got
            assert got[1] is True  # the pipelined command behind it is answered
        assert r.get("double:5") == b"10"
        assert srv.proc.poll() is None
    finally:
        srv.stop()


def test_shutdown_ends_when_an_async_handler_is_stuck_in_a_thread(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--grace-seconds", "1")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        with pytest.raises(redis.ResponseError, match="did not finish"):
            r.get("tothread:1")
        t0 = time.monotonic()
        status = srv.stop(signal.SIGTERM, timeout=20)
        assert time.monotonic() - t0 < 10, "shutdown waited for the stuck thread"
        assert status == 3, srv.log
        assert "abandoning threads of the default executor" in srv.log
    finally:
        srv.stop(signal.SIGKILL)


def test_the_access_log_cannot_be_forged_by_a_key(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--access-log")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        r.get("x\n2026-01-01 00:00:00,000 ERROR keymiss.handler: FORGED")
        r.get("done")
        eventually(lambda: "GET done" in srv.log, timeout=5)
        assert not any(line.startswith("2026-01-01") for line in srv.log.splitlines())
        assert "x\\n2026-01-01" in srv.log
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-tools not installed")
@both_fronts
def test_redis_cli_reading_commands_from_stdin(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    try:
        out = subprocess.run(
            ["redis-cli", "-p", str(srv.port)],
            input="PING\nGET double:21\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["PONG", "42"]
    finally:
        srv.stop()


@both_fronts
def test_a_config_file_tunes_a_keyspace(tmp_path: Path, front: str) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text('[keymiss.keyspaces."stuck:*"]\nconcurrency = 1\ntimeout = 0.1\n')
    srv = start_server(tmp_path, "--config", str(config), front=front)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        with pytest.raises(redis.ResponseError, match=r"within 0\.1s"):
            r.get("stuck:1")
        with pytest.raises(redis.ResponseError, match=r"^BUSY .*all 1 handler slots"):
            r.get("stuck:2")
    finally:
        srv.stop(signal.SIGKILL)
    for text, message in (
        ('[keymiss.keyspaces."stuck:*"]\nconcurency = 1\n', "unknown keyspace option(s): concurency"),
        ('[keymiss.keyspaces."nope:*"]\ntimeout = 1\n', "no keyspace 'nope:*' to configure"),
    ):
        config.write_text(text)
        out = serve_with_config(config)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@both_fronts
def test_a_set_during_a_computation_is_not_lost(tmp_path: Path, front: str) -> None:
    import threading

    srv = start_server(tmp_path, front=front)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        first: list[bytes | None] = []
        t = threading.Thread(target=lambda: first.append(r.get("gate:race")))
        t.start()
        srv.wait_started("race")  # the computation is running, until released
        other = redis.Redis(port=srv.port, socket_timeout=10)
        assert other.set("gate:race", "mine") is True
        srv.release("race")
        t.join(10)
        # asked before the write: every front end answers with the computation (read contract,
        # write-during), which is not stored over the write
        assert first == [b"gated result for gate:race"]
        fill_settled(other, front)
        assert other.get("gate:race") == b"mine"  # the acknowledged write stays
    finally:
        srv.stop()


def test_a_write_over_the_memory_budget_is_refused_and_keeps_the_old_value(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-memory", "2MB")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        assert r.set("k", "old")
        big = b"x" * (3 * 1024**2)
        for write in (
            lambda: r.set("k", big),
            lambda: r.execute_command("SETEX", "k", 100, big),
            lambda: r.mset({"k2": big}),
        ):
            with pytest.raises(redis.exceptions.OutOfMemoryError, match=r"used memory > .maxmemory"):
                write()
        assert r.get("k") == b"old" and r.exists("k2") == 0
        assert r.set("k", "new") and r.get("k") == b"new"
        for write in (
            lambda: r.set("absent", big, nx=True),  # NX on an absent key: no room, not "exists"
            lambda: r.setnx("absent", big),
            lambda: r.set("k", big, xx=True),
            lambda: r.mset({"a": "1", "b": big}),  # refused whole, as Redis's MSET is
        ):
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                write()
        assert r.exists("absent", "a", "b") == 0 and r.get("k") == b"new"
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-tools not installed")
@both_fronts
def test_interactive_redis_cli_in_a_pty(tmp_path: Path, front: str) -> None:
    """What a Redis user runs first: redis-cli at a prompt (it reads COMMAND DOCS for its hints)."""
    import os
    import pty
    import select

    srv = start_server(tmp_path, front=front)
    pid, fd = pty.fork()
    if pid == 0:  # the child: redis-cli on the pty
        os.execvp("redis-cli", ["redis-cli", "-p", str(srv.port)])

    transcript = bytearray()
    answered = 0

    def read_until(marker: bytes, seconds: float = 15) -> bytes:
        """Read until ``marker`` shows up in what arrived since the call began; answer every
        cursor-position query of the line editor as a terminal would, however the bytes split."""
        nonlocal answered
        start = len(transcript)
        deadline = time.monotonic() + seconds
        while marker not in transcript[start:] and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    transcript.extend(os.read(fd, 4096))
                except OSError:
                    break
            while transcript.count(b"\x1b[6n") > answered:
                os.write(fd, b"\x1b[1;1R")
                answered += 1
        return bytes(transcript[start:])

    try:
        prompt = f":{srv.port}> ".encode()
        assert prompt in read_until(prompt)
        for line, answer in ((b"PING", b"PONG"), (b"GET double:21", b'"42"'), (b"SET k v", b"OK")):
            os.write(fd, line + b"\r")
            seen = read_until(answer)
            assert answer in seen, (line, seen)
            if prompt not in seen.split(answer, 1)[1]:
                assert prompt in read_until(prompt)  # the next prompt, before typing again
        os.write(fd, b"quit\r")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
        srv.stop()


@pytest.mark.parametrize("store", ["memory", "lmdb"])
def test_expiry_overflow_is_redis_s_error(tmp_path: Path, store: str) -> None:
    url = "memory" if store == "memory" else f"lmdb:{tmp_path}/db"
    srv = start_server(tmp_path, "--store", url)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        huge = 9223372036854775807
        assert r.set("k", "v")
        for cmd in (
            ("EXPIRE", "k", huge),
            ("PEXPIRE", "k", huge),
            ("SET", "k", "v", "EX", huge),
            ("SET", "k", "v", "PX", huge),
            ("SETEX", "k", huge, "v"),
            ("GETEX", "k", "EX", huge),
        ):
            with pytest.raises(redis.ResponseError, match=r"^invalid expire time in '(\w+)' command"):
                r.execute_command(*cmd)
        assert r.ttl("k") == -1 and r.get("k") == b"v"  # nothing changed
        far = 10**12  # 31,700 years: large but valid, as in Redis
        assert r.set("k", "v", ex=far) and abs(r.ttl("k") - far) <= 1
        assert r.expire("k", far) and abs(r.ttl("k") - far) <= 1
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("codec = 5", "codec must be a name"),
        ('batch_size = 4\nbatch_wait_ms = "5"', "batch_wait_ms must be >= 0"),
        ("ttl = nan", "ttl must be positive seconds"),
        ("timeout = inf", "timeout must be positive seconds"),
        ("timeout = true", "timeout must be positive seconds"),
        ("concurrency = true", "concurrency must be an integer"),
        ("batch_wait_ms = 10", "batch_wait_ms needs batch_size"),  # double:* is not batched
    ],
)
def test_malformed_keyspace_options_in_a_config_file(tmp_path: Path, body: str, message: str) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text(f'[keymiss.keyspaces."double:*"]\n{body}\n')
    out = serve_with_config(config)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


@both_fronts
def test_a_config_file_tunes_a_batched_keyspace_s_wait_alone(tmp_path: Path, front: str) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text('[keymiss.keyspaces."batch:*"]\nbatch_wait_ms = 1\n')
    srv = start_server(tmp_path, "--config", str(config), front=front)
    try:
        assert redis.Redis(port=srv.port, socket_timeout=10).get("batch:1") == b"batch:1:1"
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "write",
    [
        lambda r: (r.set("gate:w", "client"), r.expire("gate:w", 0)),  # EXPIRE 0 deletes
        lambda r: (r.set("gate:w", "client"), r.pexpire("gate:w", -1)),
        lambda r: r.set("gate:w", "client", px=50),  # the client's value expires before the fill
    ],
    ids=["expire-0", "pexpire-negative", "set-px-short"],
)
@both_fronts
def test_a_computed_value_does_not_reappear_after_a_clients_write(
    tmp_path: Path, write: Any, front: str
) -> None:
    import threading

    srv = start_server(tmp_path, front=front)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        first: list[bytes | None] = []
        t = threading.Thread(target=lambda: first.append(r.get("gate:w")))
        t.start()
        srv.wait_started("w")  # the computation is running, until released
        other = redis.Redis(port=srv.port, socket_timeout=10)
        write(other)
        srv.release("w")
        t.join(10)
        assert first == [b"gated result for gate:w"]  # the reader asked before the write
        fill_settled(other, front)  # the computation's value has been refused its place
        eventually(lambda: other.pttl("gate:w") == -2, timeout=1)  # a short-lived write runs out
        assert other.exists("gate:w") == 0  # deleted or expired: the stale computation stays out
    finally:
        srv.stop()


def test_getex_on_a_miss_leaves_another_clients_value_alone(tmp_path: Path) -> None:
    import threading

    srv = start_server(tmp_path)
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        got: list[bytes | None] = []
        t = threading.Thread(target=lambda: got.append(r.getex("gate:gx", ex=1000)))
        t.start()
        srv.wait_started("gx")  # the computation is running, until released
        other = redis.Redis(port=srv.port, socket_timeout=10)
        assert other.set("gate:gx", "client")
        srv.release("gx")
        t.join(10)
        assert got == [b"gated result for gate:gx"]
        assert other.get("gate:gx") == b"client" and other.ttl("gate:gx") == -1  # its TTL untouched
    finally:
        srv.stop()


def test_a_deleted_lmdb_directory_refuses_writes_with_misconf_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    import shutil

    import redis

    srv = start_server(tmp_path, "--store", f"lmdb:{tmp_path}/db")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        assert r.set("before", "v")
        shutil.rmtree(tmp_path / "db")
        with pytest.raises(redis.ResponseError, match="MISCONF keymiss: the LMDB store's file"):
            r.set("after", "v")
        assert r.get("before") == b"v"
        assert r.ping()
        r.close()
        assert "refusing writes" in srv.log
        time.sleep(3.5)  # several sweeps fail meanwhile: logged once, not one traceback a second
        assert srv.log.count("expiry sweep failed") <= 1 and srv.log.count("Traceback") <= 2, srv.log
    finally:
        srv.stop()
