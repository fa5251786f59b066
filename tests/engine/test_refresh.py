"""Freshness in library mode: early refresh (XFetch) before a TTL runs out, stale-while-revalidate
after it. Expiry is read from the store's clock, which these tests move by hand where they can."""

from __future__ import annotations

import asyncio

import pytest

from keymiss import ConfigError, HandlerError, Keymiss, MemoryStore

from ..conftest import FakeClock
from ..support import aeventually


def _app(clock: FakeClock) -> Keymiss:
    return Keymiss(store=MemoryStore(64 * 1024**2, clock=clock), sweep_interval=0)


async def test_early_refresh_keeps_a_hot_key_fresh_with_no_reader_waiting() -> None:
    """XFetch, scaled down from the 60 s / TTL 2 s / 0.3 s acceptance run (keeping reads × compute
    time, which sets how early XFetch fires): a hot key with TTL 0.6 s and a 0.1 s computation,
    read every 3 ms for 6 s: after the first miss no read waits for a computation, and there are
    at most two computations per TTL period. Real time on purpose: how early XFetch refreshes
    depends on how long computations really take."""
    km = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    calls = 0

    @km.keyspace("hot:*", ttl=0.6, early_refresh=1.0)
    async def hot(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)  # the computation time XFetch weighs
        return f"v{calls}"

    try:
        await km.get("hot:1")  # the one miss
        slowest = 0.0
        seen = set()
        loop = asyncio.get_running_loop()
        end = loop.time() + 6.0
        while loop.time() < end:
            t0 = loop.time()
            seen.add(await km.get("hot:1"))
            slowest = max(slowest, loop.time() - t0)
            await asyncio.sleep(0.003)  # a reader's pace
        assert slowest < 0.05, slowest  # no read waited on a 0.1 s computation
        periods = 6.0 / 0.6
        assert 2 <= calls <= 2 * periods + 1, calls
        assert len(seen) >= 2  # refreshed values were served
        assert km.stats()["keyspaces"]["hot:*"]["early_refreshes"] >= 1
    finally:
        await km.close()


async def test_without_early_refresh_a_reader_waits_at_expiry(clock: FakeClock) -> None:
    km = _app(clock)

    @km.keyspace("cold:*", ttl=0.3)
    async def cold(key: str) -> str:
        await asyncio.sleep(0.1)  # the wait a reader at expiry suffers: what is measured
        return "v"

    try:
        await km.get("cold:1")
        clock.advance(0.35)  # past the TTL
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await km.get("cold:1")
        assert loop.time() - t0 >= 0.09  # the expiry cliff early_refresh removes
    finally:
        await km.close()


def test_early_refresh_must_be_positive() -> None:
    km = Keymiss(store="memory", sweep_interval=0)
    with pytest.raises(ConfigError, match="early_refresh"):
        km.keyspace("x:*", early_refresh=0)


async def test_stale_values_are_served_at_once_while_one_refresh_runs(clock: FakeClock) -> None:
    km = _app(clock)
    calls = 0
    release = asyncio.Event()

    @km.keyspace("news:*", ttl=0.3, stale=5)
    async def news(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            await release.wait()  # the refresh runs until the test has read the stale value
        return f"v{calls}"

    try:
        assert await km.get("news:1") == "v1"
        clock.advance(0.35)  # past the TTL, inside the stale window
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await asyncio.gather(*(km.get("news:1") for _ in range(50)))
        assert got == ["v1"] * 50 and loop.time() - t0 < 0.05  # served at once, stale
        release.set()
        await aeventually(lambda: getattr(km.store.get_now("news:1"), "value", None) == b"v2")
        assert await km.get("news:1") == "v2" and calls == 2  # one refresh for all 50 readers
        assert km.stats()["keyspaces"]["news:*"]["stale_hits"] >= 50
    finally:
        release.set()
        await km.close()


async def test_a_failed_refresh_keeps_the_stale_value_until_stale_runs_out(clock: FakeClock) -> None:
    km = _app(clock)
    calls = 0

    @km.keyspace("flaky:*", ttl=0.2, stale=0.8)
    async def flaky(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("model server down")
        return "good"

    try:
        assert await km.get("flaky:1") == "good"
        clock.advance(0.25)
        assert await km.get("flaky:1") == "good"  # stale; the refresh fails behind it
        await aeventually(lambda: km.stats()["keyspaces"]["flaky:*"]["refresh_failures"] >= 1)
        assert await km.get("flaky:1") == "good"  # still the stale value, no error
        stats = km.stats()["keyspaces"]["flaky:*"]
        assert stats["refresh_failures"] == 1 and calls == 2  # backed off: not retried at once
        clock.advance(0.8)  # past the stale window: a plain miss, whose error is the caller's
        with pytest.raises(HandlerError, match="model server down"):
            await km.get("flaky:1")
    finally:
        await km.close()


def test_stale_needs_a_ttl() -> None:
    km = Keymiss(store="memory", sweep_interval=0)
    with pytest.raises(ConfigError, match="stale needs a ttl"):
        km.keyspace("x:*", stale=10)
