"""An app that warms its cache at import (a synchronous call of a cached function before the
server starts): the server takes the engine over on its own loop, keeping a memory store's values
when its settings keep that store, and a cached function calling another one works over RESP."""

from __future__ import annotations

import asyncio
from pathlib import Path

from keymiss import Keymiss
from keymiss.config import Settings
from keymiss.server.app import Server

from ..support import RespTestClient


def _app() -> tuple[Keymiss, list[int]]:
    km = Keymiss()
    calls: list[int] = []

    @km.cached("inner:{n}", ttl=60)
    def inner(n: int) -> int:
        calls.append(n)
        return n + 1

    @km.cached("outer:{n}", ttl=60)
    def outer(n: int) -> int:
        return int(inner(n)) * 10  # a cached function using another one

    assert inner(0) == 1  # warmed at import: the synchronous face started keymiss on a thread
    return km, calls


async def test_a_server_takes_over_a_cache_warmed_at_import(tmp_path: Path) -> None:
    for store, kept in (("memory", True), (f"lmdb:{tmp_path}/db", False)):
        km, calls = await asyncio.to_thread(_app)
        server = Server(km, Settings(port=0, store=store, grace_seconds=1.0))
        await server.start()
        try:
            assert km.loop is asyncio.get_running_loop()
            async with RespTestClient(server.port) as c:
                assert await c.call("GET", "outer:5") == b"60"
                assert await c.call("GET", "inner:5") == b"6"
                assert await c.call("GET", "inner:0") == b"1"
                assert calls.count(0) == (1 if kept else 2)  # the warmed value, where the store stayed
                assert await asyncio.to_thread(km.sync.get, "inner:7") == 8  # sync callers: this loop
                assert calls.count(5) == 1
        finally:
            await server.shutdown()
