"""The read contract's ttl-during row in the library: a client's TTL change (``Keymiss.expire``,
``persist``) still on its way to the store when a refresh's value is ready. The change records
itself for the write-back once its own write has landed, and the library's did not hold the fill
meanwhile (the server's TTL commands, flagged ``write``, do): the value, written right behind the
change, overwrote it with the keyspace's TTL (70 s where the client was told 500 s). Now the fill
waits for the change to land and is stored with the client's TTL: for one key, for a second change
issued while the value waits, and for several keys refreshed in one batch. The LMDB store's single
writer thread is held so that writes queue in the order they are made."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from keymiss import Keymiss
from keymiss.stores.lmdb import LMDBStore

from ..conftest import FakeClock, make_store
from ..support import aeventually


async def _refreshing(
    tmp_path: Path, clock: FakeClock, keys: list[str]
) -> tuple[LMDBStore, Keymiss, asyncio.Event]:
    """A started ``Keymiss`` on LMDB whose ``keys`` are stale and refreshing; their refreshes
    finish (together) once the event returned is set."""
    store = make_store("lmdb", tmp_path, clock)
    assert isinstance(store, LMDBStore) and store._writer is not None  # durable: one writer thread
    km = Keymiss(store=store, sweep_interval=0)
    gate = asyncio.Event()
    calls: list[str] = []

    @km.keyspace("news:*", ttl=10, stale=60)
    async def news(key: str) -> str:
        calls.append(key)
        if len(calls) > len(keys):  # the refreshes wait for the test
            await gate.wait()
            return f"{key} v2"
        return f"{key} v1"

    await km.start()
    for k in keys:
        assert await km.get(k) == f"{k} v1"
    clock.advance(11)  # past the TTL, inside the stale window: served, refreshed
    for k in keys:
        assert await km.get(k) == f"{k} v1"
    await aeventually(lambda: len(calls) == 2 * len(keys), timeout=3)
    return store, km, gate


async def test_a_refresh_ready_while_a_ttl_change_is_on_its_way_keeps_the_client_s_ttl(
    tmp_path: Path, clock: FakeClock
) -> None:
    store, km, gate = await _refreshing(tmp_path, clock, ["news:1"])
    async with km:
        free = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(store._writer, free.wait, 10)
        queue = store._writer._work_queue  # type: ignore[attr-defined]
        change = asyncio.ensure_future(km.expire("news:1", 500))
        await aeventually(lambda: queue.qsize() == 1, timeout=3)  # the TTL change's write, queued
        gate.set()  # the refresh's value is ready: it waits for the change, not behind it
        await aeventually(lambda: len(km.writeback._held) == 1, timeout=3)
        assert queue.qsize() == 1
        free.set()
        assert await change is True
        await held
        await aeventually(lambda: _refreshed(store, ["news:1"]), timeout=3)
        assert 490_000 < await km.pttl("news:1") <= 500_000  # the client's, not 10 s + 60 s stale


async def test_a_second_ttl_change_while_the_value_waits_is_the_one_kept(
    tmp_path: Path, clock: FakeClock
) -> None:
    """EXPIRE 500, the value ready, EXPIRE 100: the client was told 100 last, and that is the TTL the
    stored value has."""
    store, km, gate = await _refreshing(tmp_path, clock, ["news:1"])
    async with km:
        free = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(store._writer, free.wait, 10)
        queue = store._writer._work_queue  # type: ignore[attr-defined]
        first = asyncio.ensure_future(km.expire("news:1", 500))
        await aeventually(lambda: queue.qsize() == 1, timeout=3)
        gate.set()
        await aeventually(lambda: len(km.writeback._held) == 1, timeout=3)
        second = asyncio.ensure_future(km.expire("news:1", 100))
        await aeventually(lambda: queue.qsize() == 2, timeout=3)
        free.set()
        assert await first is True
        assert await second is True
        await held
        await aeventually(lambda: _refreshed(store, ["news:1"]), timeout=3)
        assert 90_000 < await km.pttl("news:1") <= 100_000


async def test_every_key_of_a_batch_keeps_the_ttl_its_client_set(tmp_path: Path, clock: FakeClock) -> None:
    """Three refreshes ready together, each key's EXPIRE on its way: each value gets its client's TTL."""
    keys = ["news:1", "news:2", "news:3"]
    store, km, gate = await _refreshing(tmp_path, clock, keys)
    async with km:
        free = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(store._writer, free.wait, 10)
        queue = store._writer._work_queue  # type: ignore[attr-defined]
        changes = [asyncio.ensure_future(km.expire(k, 500)) for k in keys]
        await aeventually(lambda: queue.qsize() == len(keys), timeout=3)
        gate.set()
        await aeventually(lambda: len(km.writeback._held) == len(keys), timeout=3)
        free.set()
        assert await asyncio.gather(*changes) == [True] * len(keys)
        await held
        await aeventually(lambda: _refreshed(store, keys), timeout=3)
        assert [490_000 < await km.pttl(k) <= 500_000 for k in keys] == [True] * len(keys)


def _refreshed(store: LMDBStore, keys: list[str]) -> bool:
    items = [store.get_now(k) for k in keys]
    pairs = zip(keys, items, strict=True)
    return all(item is not None and item.value == f"{k} v2".encode() for k, item in pairs)
