"""The TTL a client set while a refresh's value was being written, re-applied on the stored value
(the read contract's ttl-during row), at its edges: a later TTL change of the client's on its way
when the value lands, and several keys refreshed in one batch. The LMDB store's single writer
thread is held so that writes queue in the order they are made."""

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


async def test_a_later_ttl_change_on_its_way_is_not_overwritten_by_the_earlier_one(
    tmp_path: Path, clock: FakeClock
) -> None:
    """EXPIRE 500 queued before the refresh's value, EXPIRE 100 behind it: the client was told 100
    last, so the 500 re-applied (the value had overwritten it) must not land after the 100."""
    store, km, gate = await _refreshing(tmp_path, clock, ["news:1"])
    async with km:
        free = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(store._writer, free.wait, 10)
        queue = store._writer._work_queue  # type: ignore[attr-defined]
        first = asyncio.ensure_future(km.expire("news:1", 500))
        await aeventually(lambda: queue.qsize() == 1, timeout=3)
        gate.set()  # the refresh's value is written next, behind it
        await aeventually(lambda: queue.qsize() == 2, timeout=3)
        second = asyncio.ensure_future(km.expire("news:1", 100))
        await aeventually(lambda: queue.qsize() == 3, timeout=3)  # behind the value
        free.set()
        assert await first is True
        assert await second is True
        await held
        await aeventually(lambda: not km.writeback._writers, timeout=3)  # the batch and its re-apply
        assert store.get_now("news:1").value == b"news:1 v2"  # type: ignore[union-attr]
        assert 90_000 < await km.pttl("news:1") <= 100_000


async def test_every_key_of_a_batch_keeps_the_ttl_its_client_set(tmp_path: Path, clock: FakeClock) -> None:
    """Three refreshes written in one batch, each key's EXPIRE queued just before it: each value
    gets its client's TTL again, not only the first (the fills ended, forgetting the expiries,
    while the first key's was being written again)."""
    keys = ["news:1", "news:2", "news:3"]
    store, km, gate = await _refreshing(tmp_path, clock, keys)
    async with km:
        free = threading.Event()
        held = asyncio.get_running_loop().run_in_executor(store._writer, free.wait, 10)
        queue = store._writer._work_queue  # type: ignore[attr-defined]
        changes = [asyncio.ensure_future(km.expire(k, 500)) for k in keys]
        await aeventually(lambda: queue.qsize() == len(keys), timeout=3)
        gate.set()  # the three values, one batch, behind the TTL changes
        await aeventually(lambda: queue.qsize() == len(keys) + 1, timeout=3)
        free.set()
        assert await asyncio.gather(*changes) == [True] * len(keys)
        await held
        await aeventually(lambda: not km.writeback._writers, timeout=3)
        assert [store.get_now(k).value for k in keys] == [f"{k} v2".encode() for k in keys]  # type: ignore[union-attr]
        assert [490_000 < await km.pttl(k) <= 500_000 for k in keys] == [True] * len(keys)
