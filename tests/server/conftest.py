"""A real ``keymiss serve`` process on a free port, and real Redis clients to talk to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


#: the front ends of ``keymiss serve``: the default (an embedded Valkey with the module, workers in
#: keymiss's process) and the pure-Python RESP server
FRONTS = ["valkey", "python"]


def start_server(
    tmp_path: Path,
    *args: str,
    app: str | None = "tests.server.sample_app:app",
    front: str | None = None,
    ready: re.Pattern[str] = LISTENING,
) -> ServerProcess:
    """``keymiss serve`` on a free port; ``front="valkey"`` is the default front end (the flag
    left out, as a user would), ``"python"`` passes ``--server python``."""
    front = front or os.environ.get("KEYMISS_TEST_FRONT", "python")
    log_path = tmp_path / f"server-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "keymiss", "serve", "--port", "0", *args]
    if front == "python":
        cmd += ["--server", "python"]
    if app:
        cmd += ["--app", app]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "w")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = ready.search(log_path.read_text())
        if m:
            return ServerProcess(proc, int(m.group(1)), log_path)
        if proc.poll() is not None:
            raise RuntimeError(f"keymiss serve exited {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"keymiss serve did not start:\n{log_path.read_text()}")


@pytest.fixture(scope="module", params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("srv"), front=front)
    yield srv
    srv.stop()


def raw_connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def read_reply(sock: socket.socket, timeout: float = 5) -> bytes:
    """Read until the socket has been quiet briefly (enough for small test replies)."""
    sock.settimeout(timeout)
    data = sock.recv(65536)
    sock.settimeout(0.05)
    try:
        while True:
            more = sock.recv(65536)
            if not more:
                break
            data += more
    except TimeoutError:
        pass
    return data


#: a test of client-visible behaviour, run against both front ends
both_fronts = pytest.mark.parametrize("front", FRONTS)
