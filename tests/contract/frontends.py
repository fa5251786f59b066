"""The front ends the read contract is run against, behind one small adapter.

A scenario registers keyspaces on ``fe.km`` (``fe.keyspace``), calls ``await fe.start()``, then
reads and writes as a client would: ``get``, ``mget``, ``set``, ``delete`` (DEL / UNLINK /
GETDEL), ``expire``, ``persist``, ``getex``, ``rename``, ``flush``, ``in_multi``, ``in_eval``.
Replies are normalised: a value as ``str``, a missing key as ``None``, an error as ``Err``. An
operation a front end has no command for is absent from ``fe.ops``; a scenario runs only the
variants a front end can express.

- library: ``Keymiss`` itself (``km.get``, ``km.get_many``, ``km.set``...) over a store URL;
- python: the Python RESP server, in process, over the memory store;
- module: a module-loaded server (session-wide) and an in-process worker serving ``fe.km``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from keymiss import Keymiss
from keymiss.config import Settings
from keymiss.errors import ReplyError
from keymiss.server.app import Server
from keymiss.valkey import protocol
from keymiss.valkey.worker import Worker

from ..support import RespTestClient, aeventually

#: how long any one client operation may take before the scenario fails (never a hang)
OP_WAIT = 10.0

LIBRARY_OPS = frozenset({"GET", "MGET", "SET", "DEL", "EXPIRE", "PERSIST", "FORGET"})
#: writes other than SET that give a key a value ("written"), each a case of the write-during row
WRITE_OPS = frozenset({"SET GET", "GETSET", "APPEND", "SETRANGE", "MSETNX"})
PYTHON_OPS = LIBRARY_OPS | WRITE_OPS | {"UNLINK", "GETDEL", "GETEX", "FLUSHALL", "FLUSHDB", "MULTI", "RENAME"}
MODULE_OPS = PYTHON_OPS | {"EVAL"}

EVAL_GET = "return redis.call('GET', KEYS[1])"


@dataclass(frozen=True)
class Err:
    """An error reply (or a raised error, for the library): its one line, and for the library
    the exception's type (``BusyError``: what a RESP error's first word says)."""

    text: str
    kind: str = ""

    def says(self, *words: str) -> bool:
        """Whether the line or the type names any of ``words`` (case aside)."""
        low = f"{self.kind} {self.text}".lower()
        return any(w.lower() in low for w in words)


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, ReplyError):
        return Err(str(value))
    if isinstance(value, BaseException):
        return Err(str(value), type(value).__name__)
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


class Versions:
    """A keyspace's version source: the scenario switches ``current``."""

    def __init__(self, current: str = "v1") -> None:
        self.current = current

    def __call__(self) -> str:
        return self.current


class Frontend:
    """The shared part: keyspaces on a ``Keymiss``, reads and writes left to each front end."""

    name = ""
    column = ""
    ops: frozenset[str] = frozenset()

    def __init__(self, km: Keymiss) -> None:
        self.km = km
        #: the scenario's functions (``handler(fn)`` names its ``fn``): released before closing
        self.holders: list[Any] = []

    def keyspace(self, pattern: str, handler: Callable[..., Awaitable[str]], **options: Any) -> None:
        self.km.add_keyspace(pattern, handler, **options)
        fn = getattr(handler, "fn", None)
        if fn is not None:
            self.holders.append(fn)

    async def start(self) -> None:
        await self.km.start()

    async def close(self) -> None:
        await self.km.close()

    async def switched(self, pattern: str, versions: Versions, version: str) -> None:
        """Switch ``pattern``'s version and return once the front end serves by it."""
        versions.current = version

    async def misses(self, pattern: str) -> int:
        """Reads of ``pattern``'s keys that found no value to serve, so far: how a scenario knows
        its readers are waiting for a computation (the in-process engine counts them)."""
        return int(self.km.stats()["keyspaces"][pattern]["misses"])

    # --- what a client does: each front end implements those in its ``ops`` ---------------------
    def _lacks(self, op: str) -> NotImplementedError:
        return NotImplementedError(f"{op} is not in {self.name}'s operations ({sorted(self.ops)})")

    async def get(self, key: str, wait: float = OP_WAIT) -> Any:
        raise self._lacks("GET")

    async def mget(self, keys: list[str]) -> list[Any]:
        raise self._lacks("MGET")

    async def exists(self, key: str) -> int:
        raise self._lacks("EXISTS")

    async def set(self, key: str, value: str) -> None:
        raise self._lacks("SET")

    async def delete(self, key: str, how: str = "DEL") -> None:
        """DEL, UNLINK or GETDEL."""
        raise self._lacks(how)

    async def expire(self, key: str, seconds: int) -> bool:
        raise self._lacks("EXPIRE")

    async def persist(self, key: str) -> bool:
        raise self._lacks("PERSIST")

    async def getex(self, key: str, seconds: int) -> bool:
        raise self._lacks("GETEX")

    async def rename(self, src: str, dst: str) -> None:
        raise self._lacks("RENAME")

    async def write(self, key: str, how: str) -> None:
        """One of ``WRITE_OPS``, leaving ``key`` holding "written"."""
        raise self._lacks(how)

    async def flush(self, how: str = "FLUSHALL") -> None:
        """FLUSHALL or FLUSHDB."""
        raise self._lacks(how)

    async def in_multi(self, key: str) -> Any:
        """GET inside MULTI/EXEC: EXEC's reply."""
        raise self._lacks("MULTI")

    async def in_eval(self, key: str) -> Any:
        """GET inside a Lua script: the script's reply."""
        raise self._lacks("EVAL")

    async def forget(self, pattern: str | None = None, *, tag: str | None = None) -> Any:
        """``KEYMISS.FORGET pattern`` / ``TAG tag`` (``km.forget`` / ``km.forget_tag``): the count."""
        raise self._lacks("FORGET")


class Library(Frontend):
    """``Keymiss`` over a store URL: the API itself is the client."""

    column = "library"
    ops = LIBRARY_OPS

    def __init__(self, name: str, store: str) -> None:
        super().__init__(Keymiss(store=store))
        self.name = name

    async def get(self, key: str, wait: float = OP_WAIT) -> Any:
        async def read() -> Any:
            try:
                return await self.km.get(key)
            except Exception as exc:
                return Err(str(exc), type(exc).__name__)

        return await asyncio.wait_for(read(), wait)

    async def mget(self, keys: list[str]) -> list[Any]:
        got = await asyncio.wait_for(self.km.get_many(keys, return_exceptions=True), OP_WAIT)
        return [_text(v) for v in got]

    async def set(self, key: str, value: str) -> None:
        await self.km.set(key, value)

    async def delete(self, key: str, how: str = "DEL") -> None:
        assert how == "DEL", how
        await self.km.delete(key)

    async def expire(self, key: str, seconds: int) -> bool:
        return bool(await self.km.expire(key, seconds))

    async def persist(self, key: str) -> bool:
        return bool(await self.km.persist(key))

    async def exists(self, key: str) -> int:
        return await self.km.exists(key)

    async def forget(self, pattern: str | None = None, *, tag: str | None = None) -> Any:
        try:
            return await (self.km.forget_tag(tag) if tag is not None else self.km.forget(str(pattern)))
        except Exception as exc:
            return Err(str(exc), type(exc).__name__)


class Resp(Frontend):
    """A RESP server: every operation a command on a fresh connection (each reader its own)."""

    port = 0

    async def call(self, *args: Any, wait: float = OP_WAIT) -> Any:
        async with RespTestClient(self.port, timeout=wait) as c:
            return _text(await c.call(*args))

    async def get(self, key: str, wait: float = OP_WAIT) -> Any:
        return await self.call("GET", key, wait=wait)

    async def mget(self, keys: list[str]) -> list[Any]:
        got = await self.call("MGET", *keys)
        assert isinstance(got, list), got
        return got

    async def set(self, key: str, value: str) -> None:
        assert await self.call("SET", key, value) == "OK"

    async def delete(self, key: str, how: str = "DEL") -> None:
        got = await self.call(how, key)
        assert not isinstance(got, Err), got

    async def expire(self, key: str, seconds: int) -> bool:
        return bool(await self.call("EXPIRE", key, seconds) == 1)

    async def persist(self, key: str) -> bool:
        return bool(await self.call("PERSIST", key) == 1)

    async def getex(self, key: str, seconds: int) -> bool:
        """GETEX EX: whether it found the key (its value)."""
        got = await self.call("GETEX", key, "EX", seconds)
        assert not isinstance(got, Err), got
        return got is not None

    async def rename(self, src: str, dst: str) -> None:
        assert await self.call("RENAME", src, dst) == "OK"

    async def write(self, key: str, how: str) -> None:
        args = {
            "SET GET": ("SET", key, "written", "GET"),
            "GETSET": ("GETSET", key, "written"),
            "APPEND": ("APPEND", key, "written"),
            "SETRANGE": ("SETRANGE", key, 0, "written"),
            "MSETNX": ("MSETNX", key, "written"),
        }[how]
        got = await self.call(*args)
        assert not isinstance(got, Err), (how, got)

    async def flush(self, how: str = "FLUSHALL") -> None:
        """FLUSHALL or FLUSHDB."""
        assert await self.call(how) == "OK"

    async def exists(self, key: str) -> int:
        return int(await self.call("EXISTS", key))

    async def in_multi(self, key: str) -> Any:
        async with RespTestClient(self.port, timeout=OP_WAIT) as c:
            replies = await c.call_many([["MULTI"], ["GET", key], ["EXEC"]])
        assert replies[:2] == ["OK", "QUEUED"], replies
        return _text(replies[2])

    async def in_eval(self, key: str) -> Any:
        return await self.call("EVAL", EVAL_GET, 1, key)

    async def forget(self, pattern: str | None = None, *, tag: str | None = None) -> Any:
        return await self.call(*protocol.forget(pattern, tag=tag))


class PythonServer(Resp):
    """The Python RESP server in this event loop, over the memory store."""

    name = "python"
    column = "Python server"
    ops = PYTHON_OPS

    def __init__(self) -> None:
        super().__init__(Keymiss())
        self.server: Server | None = None

    async def start(self) -> None:
        self.server = Server(self.km, Settings(port=0, store="memory", grace_seconds=1.0))
        await self.server.start()
        self.port = self.server.port

    async def close(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
        else:
            await self.km.close()


class Module(Resp):
    """A module-loaded server shared by the session; this scenario's keyspaces served by one
    in-process worker (``start``), which ``kill_worker`` ends abruptly (its connections close)."""

    column = "module"
    ops = MODULE_OPS

    def __init__(self, name: str, port: int, declared: str | None) -> None:
        super().__init__(Keymiss(sweep_interval=0))
        self.name = name
        self.port = port
        #: the keyspace pattern the server was loaded with (``KEYSPACE``), if it accepted one
        self.declared = declared
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.worker = Worker(self.km, self.url, block_ms=200)
        worker, task = self.worker, asyncio.get_running_loop().create_task(self.worker.run())
        self.task = task
        await aeventually(lambda: worker.stats.nodes or task.done(), message="the worker attaches")
        assert worker.stats.nodes, "the worker did not attach"

    async def kill_worker(self) -> None:
        """End the worker at once, as a crash would: its connections close, nothing is answered."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.task, 10)
            self.task = None

    async def close(self) -> None:
        if self.worker is not None and self.task is not None:
            self.worker.stop()
            try:
                await asyncio.wait_for(self.task, 15)
            finally:
                self.task = None
        await self.km.close()

    async def keyspace_fields(self, pattern: str) -> dict[str, str]:
        text = await self.call("INFO", protocol.INFO_SECTION)
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name.startswith(f"{protocol.INFO_SECTION}_keyspace_"):
                fields = protocol.parse_info_keyspace(value)
                if fields["pattern"] == pattern:
                    return fields
        return {}

    async def misses(self, pattern: str) -> int:
        """The module counts the misses (the worker's engine sees only the computations)."""
        return int((await self.keyspace_fields(pattern)).get("misses", 0))

    async def switched(self, pattern: str, versions: Versions, version: str) -> None:
        versions.current = version

        async def serving() -> str | None:
            return (await self.keyspace_fields(pattern)).get("version")

        await aeventually(serving, expect=protocol.label(version), timeout=5, message="the version switch")
