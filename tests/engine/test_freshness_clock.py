"""Freshness in virtual time: ``Keymiss(clock=..., random=...)`` decides the stale window, XFetch
and refresh backoff on a clock the test moves, for one key and for several (``get_many``, which
the Python server's MGET is) alike, over the in-process stores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keymiss import HandlerError, Keymiss

from ..conftest import FakeClock, make_store
from ..support import aeventually

LOCAL_KINDS = ["memory", "lmdb"]
NEVER, ALWAYS = 0.0, 1.0 - 1e-12  # XFetch draws: never early; early wherever it may be


class Draw:
    """XFetch's random draw, set by the test."""

    def __init__(self, value: float = NEVER) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def _stored(km: Keymiss, key: str, value: bytes) -> bool:
    item = km.store.get_now(key)  # type: ignore[attr-defined]
    return item is not None and item.value == value


@pytest.mark.parametrize("many", [False, True], ids=["get", "get_many"])
@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_a_stale_value_is_served_and_refreshed_by_get_and_get_many_alike(
    kind: str, many: bool, tmp_path: Path, clock: FakeClock
) -> None:
    """MGET used to serve a stale value from an in-process store without refreshing it (GET did)."""
    km = Keymiss(store=make_store(kind, tmp_path, clock), sweep_interval=0)
    calls: list[str] = []

    @km.keyspace("news:*", ttl=10, stale=60)
    async def news(key: str) -> str:
        calls.append(key)
        return f"{key} v{len(calls)}"

    async def read(key: str) -> object:
        return (await km.get_many([key, "nobody:1"]))[0] if many else await km.get(key)

    async with km:
        assert await read("news:1") == "news:1 v1"
        clock.advance(11)  # past the TTL, inside the stale window
        assert await read("news:1") == "news:1 v1"  # served at once, stale
        await aeventually(lambda: _stored(km, "news:1", b"news:1 v2"), timeout=3)
        assert await read("news:1") == "news:1 v2"
        assert calls == ["news:1", "news:1"]
        assert km.stats()["keyspaces"]["news:*"]["stale_hits"] == 1


@pytest.mark.parametrize("many", [False, True], ids=["get", "get_many"])
@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_xfetch_refreshes_early_when_its_draw_says_so(
    kind: str, many: bool, tmp_path: Path, clock: FakeClock
) -> None:
    draw = Draw(NEVER)
    km = Keymiss(store=make_store(kind, tmp_path, clock), sweep_interval=0, random=draw)
    calls: list[str] = []

    @km.keyspace("hot:*", ttl=10, early_refresh=1.0)
    async def hot(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0.02)  # what XFetch scales by: ~0.02 s x 27.6 for the ALWAYS draw
        return f"{key} v{len(calls)}"

    async def read(key: str) -> object:
        return (await km.get_many([key]))[0] if many else await km.get(key)

    async with km:
        assert await read("hot:1") == "hot:1 v1"
        clock.advance(9.9)  # 0.1 s of its TTL left
        assert await read("hot:1") == "hot:1 v1"
        assert calls == ["hot:1"]  # the draw said no
        draw.value = ALWAYS
        assert await read("hot:1") == "hot:1 v1"  # served at once, refreshed behind it
        await aeventually(lambda: _stored(km, "hot:1", b"hot:1 v2"), timeout=3)
        assert await read("hot:1") == "hot:1 v2"
        assert km.stats()["keyspaces"]["hot:*"]["early_refreshes"] == 1


@pytest.mark.parametrize("url", ["memory", "lmdb"])
async def test_the_clock_reaches_the_stores_keymiss_opens(url: str, tmp_path: Path, clock: FakeClock) -> None:
    km = Keymiss(store=url if url == "memory" else f"lmdb:{tmp_path / 'db'}", clock=clock, sweep_interval=0)
    async with km:
        assert km.store.clock is clock  # type: ignore[attr-defined]
        await km.set("plain", "v", ttl=5)
        clock.advance(4)
        assert await km.get("plain") == "v"
        clock.advance(2)
        assert await km.get("plain") is None  # expired on the virtual clock


async def test_a_failed_refresh_backs_off_on_the_clock(clock: FakeClock) -> None:
    km = Keymiss(store="memory", clock=clock, sweep_interval=0)
    calls = 0

    @km.keyspace("flaky:*", ttl=1, stale=600)
    async def flaky(key: str) -> str:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("model server down")
        return "good"

    def failures() -> int:
        return int(km.stats()["keyspaces"]["flaky:*"]["refresh_failures"])

    async with km:
        assert await km.get("flaky:1") == "good"
        clock.advance(2)  # stale from now on
        for waited, expect_calls in [(0.0, 2), (0.5, 2), (0.6, 3), (1.9, 3), (0.2, 4)]:
            clock.advance(waited)
            assert await km.get_many(["flaky:1"]) == ["good"]  # stale, never the refresh's error
            await aeventually(failures, expect=expect_calls - 1, timeout=3)
            assert calls == expect_calls, (waited, calls)  # backoff 1 s, then 2 s
        clock.advance(600)  # past the stale window: a plain miss, whose error is the reader's
        with pytest.raises(HandlerError, match="model server down"):
            await km.get("flaky:1")


async def test_the_version_stale_window_runs_on_the_injected_clock(clock: FakeClock) -> None:
    current = ["v1"]
    calls: list[str] = []
    km = Keymiss(clock=clock, sweep_interval=0)

    @km.keyspace("vs:*", version=lambda: current[0], version_stale=30.0)
    async def answer(key: str) -> str:
        calls.append(current[0])
        return f"{key} by {current[0]}"

    async with km:
        assert await km.get("vs:1") == "vs:1 by v1"
        current[0] = "v2"
        km.registry.route("vs:1").version_tag()  # type: ignore[union-attr]  # the switch is seen
        clock.advance(29.0)  # inside the window (virtual): the v1 value is still served
        assert await km.get("vs:1") == "vs:1 by v1"
        await aeventually(lambda: calls == ["v1", "v2"])  # while one refresh recomputes it
        current[0] = "v3"
        km.registry.route("vs:1").version_tag()  # type: ignore[union-attr]
        clock.advance(31.0)  # past the v2 -> v3 window, on the injected clock alone
        assert await km.get("vs:1") == "vs:1 by v3"  # hidden: recomputed while the reader waits
