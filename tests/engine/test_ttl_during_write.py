"""The read contract's ttl-during row at the last moment: a client's TTL change whose write reaches
the LMDB store's writer just before a refresh's value does (the refresh had already read the
client's expiries, which the change records only once its own write lands) is kept by the value
the refresh stores, not overwritten by the keyspace's TTL."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from keymiss import Keymiss
from keymiss.stores.lmdb import LMDBStore

from ..conftest import FakeClock, make_store
from ..support import aeventually


async def test_a_ttl_change_landing_just_before_the_refresh_s_write_is_kept(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = make_store("lmdb", tmp_path, clock)
    assert isinstance(store, LMDBStore) and store._writer is not None  # durable: one writer thread
    km = Keymiss(store=store, sweep_interval=0)
    gate = asyncio.Event()
    calls: list[str] = []

    @km.keyspace("news:*", ttl=10, stale=60)
    async def news(key: str) -> str:
        calls.append(key)
        if len(calls) > 1:  # the refresh waits for the test
            await gate.wait()
        return f"{key} v{len(calls)}"

    async with km:
        assert await km.get("news:1") == "news:1 v1"
        clock.advance(11)  # past the TTL, inside the stale window: served, refreshed
        assert await km.get("news:1") == "news:1 v1"
        await aeventually(lambda: len(calls) == 2, timeout=3)
        # the writer thread held, so that writes queue in the order they are made
        free = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(store._writer, free.wait, 10)
        queue = store._writer._work_queue  # type: ignore[attr-defined]
        expire = asyncio.ensure_future(km.expire("news:1", 500))
        await aeventually(lambda: queue.qsize() == 1, timeout=3)  # the TTL change's write, queued
        gate.set()  # the refresh's value is written next, behind it
        await aeventually(lambda: queue.qsize() == 2, timeout=3)
        free.set()
        assert await expire is True
        await held

        def refreshed() -> bool:
            item = store.get_now("news:1")
            return item is not None and item.value == b"news:1 v2"

        await aeventually(refreshed, timeout=3)

        async def clients_ttl() -> bool:  # the client's 500 s, not the keyspace's 10 s + 60 s stale
            return 490_000 < await km.pttl("news:1") <= 500_000

        await aeventually(clients_ttl, timeout=3)
