"""``keymiss top`` in a pseudo-terminal against a real server of each front end, over a password:
its screen shows each keyspace's numbers, they change after GETs, and q or Ctrl-C ends it with
status 0 and the terminal as it was."""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ..support import eventually, resp
from .conftest import FRONTS, ServerProcess, start_server

PASSWORD = "top-secret-pw"
ADMIN_PASSWORD = "top-admin-pw"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
ROW = re.compile(r"double:\*\s*│" + r"\s*(\S+)\s*│" * 7)


class Screen:
    """``keymiss top`` on the slave side of a pty (its controlling terminal, 200 columns); what it
    drew, read from the master side."""

    def __init__(self, port: int, *args: str, lines: int = 40) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, 200, 0, 0))
        self.echo_before = termios.tcgetattr(slave)[3] & termios.ECHO
        env = dict(os.environ, TERM="xterm", KEYMISS_PASSWORD=PASSWORD)
        env.pop("COLUMNS", None)  # the pty's size, not the test runner's (xdist sets 80x24)
        env.pop("LINES", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "keymiss", "top", "--port", str(port), "--interval", "0.2", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.text = ""

    def read(self) -> str:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the slave side closed: the process is gone
                break
            if not chunk:
                break
            self.text += ANSI.sub("", chunk.decode(errors="replace"))
        return self.text

    def row(self) -> tuple[str, ...] | None:
        """The last drawn row of ``double:*``: hits, misses, hit ratio, comp/s, queued, in flight, p50."""
        rows = ROW.findall(self.read())
        return rows[-1] if rows else None

    def press(self, data: bytes) -> int:
        os.write(self.master, data)
        try:
            return self.proc.wait(10)
        finally:
            self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


@pytest.fixture(scope="module", params=FRONTS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    admin = ["--admin-password", ADMIN_PASSWORD] if request.param == "valkey" else []
    srv = start_server(tmp_path_factory.mktemp("top"), "--requirepass", PASSWORD, *admin, front=request.param)
    yield srv
    srv.stop()


@pytest.fixture
def screen(served: ServerProcess) -> Iterator[Screen]:
    s = Screen(served.port)
    yield s
    s.close()


def test_top_shows_numbers_that_change_after_gets(served: ServerProcess, screen: Screen) -> None:
    r = redis.Redis(port=served.port, password=PASSWORD, socket_timeout=10)
    before = eventually(screen.row, timeout=15, message=f"a double:* row on the screen:\n{screen.text}")
    hits, misses = int(before[0]), int(before[1])
    assert r.get("double:21") == b"42" and r.get("double:21") == b"42"  # a miss, then a hit
    after = eventually(
        lambda: (row := screen.row()) and int(row[0]) == hits + 1 and int(row[1]) == misses + 1 and row,
        timeout=10,
        message=f"the GETs on the screen:\n{screen.text[-3000:]}",
    )
    assert after[2].endswith("%") and after[6].endswith(("ms", "s"))  # a hit ratio, and a p50 time
    # the footer ends a frame; a frame may still be arriving when the row above it was read
    eventually(lambda: "q: quit" in screen.text, timeout=10, message=f"the footer:\n{screen.text[-3000:]}")
    assert screen.press(b"q") == 0
    assert screen.proc.returncode == 0
    r.close()


def test_ctrl_c_ends_top_cleanly(screen: Screen) -> None:
    eventually(screen.row, timeout=15, message=f"a frame:\n{screen.text}")
    assert screen.press(b"\x03") == 0  # the terminal's interrupt: SIGINT to top
    assert "Traceback" not in screen.text
    assert termios.tcgetattr(screen.master)[3] & termios.ECHO == screen.echo_before  # echo restored


def test_top_without_the_password_says_why(served: ServerProcess, tmp_path: Path) -> None:
    env = dict(os.environ, KEYMISS_PASSWORD="wrong")
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "top", "--port", str(served.port), "--once"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 1 and "keymiss top:" in out.stderr and "Traceback" not in out.stderr


def test_top_logs_in_as_a_user(served: ServerProcess) -> None:
    if served.front != "valkey":
        pytest.skip("ACL users are the default front end's (the Python server has one password)")
    env = dict(os.environ, KEYMISS_USER="admin", KEYMISS_PASSWORD=ADMIN_PASSWORD)
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "top", "--port", str(served.port), "--once"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "double:*" in out.stdout and "hit ratio" in out.stdout


def test_odd_keyspace_names_show_as_they_are(tmp_path: Path) -> None:
    """Names that look like Rich markup, hold INFO's separators or a terminal escape: INFO names
    each the same way on both front ends (percent-encoded), ``keymiss top`` shows each literally
    (an escape byte as ``\\x1b``), and the start-up log line writes no escape byte."""
    from keymiss.stats import info_name, printable

    from .odd_names_app import NAMES

    patterns = {}
    for front in FRONTS:
        srv = start_server(tmp_path, front=front, app="tests.server.odd_names_app:app")
        try:
            info = asyncio.run(resp(srv.port, "INFO", "keymiss")).decode()
            patterns[front] = re.findall(r"^keymiss_keyspace_\d+:pattern=([^,]*),", info, re.M)
            out = subprocess.run(
                [sys.executable, "-m", "keymiss", "top", "--port", str(srv.port), "--once"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            log = srv.log
        finally:
            srv.stop()
        assert out.returncode == 0, out.stderr
        assert "\x1b" not in out.stdout and "\x1b" not in log
        for name in NAMES:
            assert printable(name) in out.stdout, (front, name, out.stdout)
        assert "keyspaces=[" + ", ".join(map(printable, NAMES)) + "]" in log, log
    assert patterns["python"] == patterns["valkey"] == [info_name(n) for n in NAMES], patterns


def test_top_without_any_password_says_how_to_give_one(served: ServerProcess) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KEYMISS_PASSWORD", "KEYMISS_USER")}
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "top", "--port", str(served.port), "--once"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert out.returncode == 1 and "pass --password" in out.stderr and "--user" in out.stderr, out.stderr


def test_a_short_terminal_keeps_the_footer_and_counts_the_keyspaces_left_out(served: ServerProcess) -> None:
    """15 lines for 19 keyspaces: the busiest rows, a row counting the rest, and the footer."""
    r = redis.Redis(port=served.port, password=PASSWORD, socket_timeout=10)
    assert r.get("double:4") == b"8"
    s = Screen(served.port, lines=15)
    try:
        eventually(lambda: "q: quit" in s.read() and "more keyspaces" in s.text, timeout=15, message=s.text)
        assert s.row() is not None  # the busiest keyspace made the cut
    finally:
        s.close()
        r.close()
