"""Stale-while-revalidate and early refresh in library mode on a shared Redis: two nodes, one refresh."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis as redis_sync

from keymiss import Keymiss

from ..redis_servers import HAVE_REDIS
from ..support import aeventually

pytestmark = pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")


def _node(url: str, calls: list[str], state: dict[str, Any], **options: Any) -> Keymiss:
    from keymiss.stores.redis import RedisStore

    km = Keymiss(store=RedisStore(url), sweep_interval=0)

    @km.keyspace("ed:*", **options)
    async def edition(key: str) -> str:
        calls.append(key)
        if "gate" in state:
            await state["gate"].wait()  # a refresh that runs until the test releases it
        elif state.get("compute"):
            await asyncio.sleep(state["compute"])  # the computation time XFetch weighs
        if state.get("fail"):
            raise RuntimeError("the model server is down")
        return f"edition {len(calls)}"

    return km


@pytest.fixture
def url(redis_standalone: Any) -> Any:
    plain = redis_sync.Redis(port=redis_standalone.port)
    plain.flushall()
    yield f"redis://127.0.0.1:{redis_standalone.port}/0"
    plain.flushall()
    plain.close()


async def past_ttl(km: Keymiss, key: str, stale: float) -> None:
    """Until ``key``'s TTL has run out in Redis: what is left of its life is the stale window."""

    async def past() -> bool:
        return 0 < await km.pttl(key) <= stale * 1000

    await aeventually(past, timeout=5)


async def test_two_nodes_serve_the_stale_value_at_once_and_refresh_it_once(url: str) -> None:
    calls: list[str] = []
    state: dict[str, Any] = {}
    a, b = _node(url, calls, state, ttl=0.3, stale=30), _node(url, calls, state, ttl=0.3, stale=30)
    async with a, b:
        assert await a.get("ed:1") == "edition 1"
        assert 30_000 < await a.pttl("ed:1") <= 30_300  # kept for the TTL and the window
        state["gate"] = release = asyncio.Event()  # the refresh runs until released
        await past_ttl(a, "ed:1", 30)
        t0 = time.monotonic()
        got = await asyncio.gather(*(n.get("ed:1") for n in (a, b) for _ in range(10)))
        assert time.monotonic() - t0 < 1.0  # served at once, not after the refresh
        assert got == ["edition 1"] * 20
        release.set()

        async def refreshed() -> bool:
            return await b.get("ed:1") != "edition 1"

        await aeventually(refreshed, timeout=5)
        await asyncio.gather(a.drain(5), b.drain(5))  # every refresh either node began has ended
        assert len(calls) == 2  # one refresh, on one of the two nodes
        assert await a.get("ed:1") == "edition 2"


async def test_a_failed_refresh_keeps_the_stale_value_on_a_shared_store(url: str) -> None:
    calls: list[str] = []
    state: dict[str, Any] = {}
    km = _node(url, calls, state, ttl=0.2, stale=30)
    async with km:
        assert await km.get("ed:2") == "edition 1"
        state["fail"] = True
        await past_ttl(km, "ed:2", 30)
        for i in range(20):
            assert await km.get("ed:2") == "edition 1"
            if i == 0:  # the refresh this read began fails behind it; the reads after meet its backoff
                await aeventually(lambda: km.stats()["keyspaces"]["ed:*"]["refresh_failures"] == 1)
        st = km.stats()["keyspaces"]["ed:*"]
        assert st["refresh_failures"] == 1 and st["stale_hits"] >= 20, st
        assert len(calls) == 2  # the backoff held the retries


async def test_early_refresh_on_a_shared_store_keeps_readers_from_waiting(url: str) -> None:
    calls: list[str] = []
    state: dict[str, Any] = {"compute": 0.1}
    # a TTL ten computations long: the refresh a read starts early has room to finish before the
    # value expires also when a loaded machine stretches the computation several times over
    km = _node(url, calls, state, ttl=1.0, early_refresh=1.0)
    async with km:
        await km.get("ed:3")
        slowest, end = 0.0, time.monotonic() + 4
        while time.monotonic() < end:
            t0 = time.monotonic()
            await km.get("ed:3")
            slowest = max(slowest, time.monotonic() - t0)
            await asyncio.sleep(0.005)
        # no read waited on a computation: all but the first were hits (not a wall-clock bound,
        # which a loaded machine breaks; a read that waited is counted as a miss)
        assert km.stats()["keyspaces"]["ed:*"]["misses"] == 1, km.stats()["keyspaces"]["ed:*"]
        assert slowest < 1.0, slowest
        assert 3 <= len(calls) <= 2 * (4 / 1.0) + 2, calls
        assert km.stats()["keyspaces"]["ed:*"]["early_refreshes"] >= 2
