"""A real ``keymiss serve`` process on a free port, and helpers to talk to it and to its handlers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from ..support import RawClient, eventually, front_started

HERE = Path(__file__).parent
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
#: the module front end's workers attached to a server keymiss did not start (``--redis URL``)
ATTACHED = re.compile(r"keymiss workers attached to ")
#: why keymiss serve chose the Python server, when it says so (no server binary to embed, say)
PYTHON_WHY = re.compile(r"serving with the Python server: (.*)")

#: the front ends of ``keymiss serve``: the default (an embedded Valkey with the module, workers in
#: keymiss's process) and the pure-Python RESP server
FRONTS = ["valkey", "python"]


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int
    log_path: Path
    #: the front end the log says started: "valkey" (the module) or "python"
    front: str = ""
    #: where the sample app's gated handlers say they started and look for their release
    gates: Path = field(default_factory=Path)

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

    def wait_started(self, name: str, timeout: float = 10) -> None:
        """Until the gated handler of ``gate:<name>`` (or ``block:<name>``) is running."""
        started = self.gates / f"{name}.started"
        eventually(started.exists, timeout=timeout, interval=0.005, message=f"handler {name!r} to start")

    def release(self, name: str) -> None:
        """Let the gated handler of ``<name>`` return (before or after it started)."""
        (self.gates / f"{name}.release").touch()


def _front_of(log: str) -> str | None:
    """The front end a startup log names: the module's (embedded or attached), the Python
    server's, or ``None`` for neither."""
    started = front_started(log)
    if started is None and ATTACHED.search(log):
        return "valkey"
    return started


def start_server(
    tmp_path: Path,
    *args: str,
    app: str | None = "tests.server.sample_app:app",
    front: str | None = None,
    ready: re.Pattern[str] = LISTENING,
) -> ServerProcess:
    """``keymiss serve`` on a free port.

    ``front``: ``"valkey"`` is the default front end (the flag left out, as a user would) and the
    test is skipped when the log says the Python server started instead (no server binary to
    embed, say); ``"python"`` passes ``--server python``; ``"auto"`` leaves the flag out and takes
    whichever starts; ``None`` is ``$KEYMISS_TEST_FRONT`` (else ``"python"``) taken as ``"auto"``
    where it is ``"valkey"``. ``ServerProcess.front`` says which one runs. A log that names
    neither front end fails the test."""
    asked = front
    front = front or os.environ.get("KEYMISS_TEST_FRONT", "python")
    stamp = time.monotonic_ns()
    log_path = tmp_path / f"server-{stamp}.log"
    gates = tmp_path / f"gates-{stamp}"
    gates.mkdir()
    cmd = [sys.executable, "-m", "keymiss", "serve", "--port", "0", *args]
    if front == "python":
        cmd += ["--server", "python"]
    if app:
        cmd += ["--app", app]
    env = dict(os.environ, PYTHONUNBUFFERED="1", KEYMISS_TEST_GATES=str(gates))
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    log = open(log_path, "w")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=root, env=env)

    def listening() -> re.Match[str] | None:
        text = log_path.read_text()
        m = ready.search(text)
        if m is None and proc.poll() is not None:
            raise RuntimeError(f"keymiss serve exited {proc.returncode}:\n{text}")
        return m

    try:
        # a QA server loads its reader first: under a parallel run on two cores that can take 30 s
        m = eventually(listening, timeout=90, interval=0.02, message="keymiss serve to start")
    except AssertionError:
        proc.kill()
        raise RuntimeError(f"keymiss serve did not start:\n{log_path.read_text()}") from None
    srv = ServerProcess(proc, int(m.group(1)), log_path, gates=gates)
    text = srv.log
    started = _front_of(text)
    if started is None:
        srv.stop(signal.SIGKILL)
        pytest.fail(f"keymiss serve started, but its log names neither front end:\n{text}")
    srv.front = started
    if asked == "valkey" and started != "valkey":
        srv.stop()
        why = PYTHON_WHY.search(text)
        pytest.skip(f"asked for the valkey front end; {why.group(0) if why else started + ' started'}")
    if asked == "python" and started != "python":
        srv.stop(signal.SIGKILL)
        pytest.fail(f"--server python given, yet the {started} front end started:\n{text}")
    return srv


@pytest.fixture(scope="module", params=FRONTS)
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, front: str) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("srv"), front=front)
    yield srv
    srv.stop()


def keyspace_info(r: redis.Redis, pattern: str) -> dict[str, Any]:
    """One keyspace's INFO keymiss fields, from either front end (each names them its own way:
    ``keyspace_N`` or ``keymiss_keyspace_N``)."""
    info = r.info("keymiss")
    spaces = [v for k, v in info.items() if k.startswith(("keyspace_", "keymiss_keyspace_"))]
    for v in spaces:
        if isinstance(v, dict) and v["pattern"] == pattern:
            return dict(v)
    raise AssertionError(f"no keyspace {pattern!r} in {info}")


def fill_settled(r: redis.Redis, front: str, pattern: str = "gate:*", fills: int = 1) -> None:
    """After a client wrote a key whose computation ran: until that computation's fill is over.
    The Python server answered the key's reader only after it (so nothing is left to wait for);
    the module front end answered its readers with the client's write, and discards the late fill
    when the worker sends it."""
    if front == "valkey":
        eventually(
            lambda: int(keyspace_info(r, pattern).get("discarded_fills", 0)) >= fills,
            timeout=10,
            message="the late fill to be discarded",
        )


def call_bytes(c: RawClient, *args: str | bytes | int) -> bytes:
    """Send one command on ``c``; its reply's exact bytes."""
    c.send(*args)
    return c.reply_bytes()


#: a test of client-visible behaviour, run against both front ends
both_fronts = pytest.mark.parametrize("front", FRONTS)


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The ``--store`` of a Python server over ``kind`` (memory, lmdb, or redis: the session's
    redis-server)."""
    if kind == "redis":
        return f"redis://127.0.0.1:{request.getfixturevalue('redis_standalone').port}/0"
    return {"memory": "memory", "lmdb": f"lmdb:{tmp_path}/db"}[kind]
