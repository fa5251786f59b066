"""Keyspaces are isolated from each other: a hung or slow keyspace holds only its own slots, and
the in-flight and queue counts stay honest through timeouts.

Hung handlers here wait on an ``Event`` the test sets at the end (bounded by a timeout), so no
thread outlives its test.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import AsyncIterator

import pytest

from keymiss import BusyError, ComputeTimeoutError, Keymiss

from ..support import aeventually


@pytest.fixture
async def km() -> AsyncIterator[Keymiss]:
    app = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    yield app
    await app.close(grace=1)


@pytest.fixture
def release() -> threading.Event:
    event = threading.Event()
    yield event
    event.set()


async def test_a_hung_keyspace_leaves_another_keyspaces_p99_under_50ms(
    km: Keymiss, release: threading.Event
) -> None:
    @km.keyspace("hang:*", timeout=0.2)
    def hang(key: str) -> str:
        release.wait(20)
        return "late"

    @km.keyspace("fast:*")
    def fast(key: str) -> str:
        return key

    # 64 hung keys: every one of hang's slots is held past its timeout
    outcomes = await asyncio.gather(*(km.get(f"hang:{i}") for i in range(64)), return_exceptions=True)
    assert all(isinstance(o, ComputeTimeoutError | BusyError) for o in outcomes), outcomes
    assert km.stats()["stuck_handlers"] > 0
    times = []
    for i in range(200):
        t0 = time.perf_counter()
        assert await km.get(f"fast:{i}") == f"fast:{i}"
        times.append(time.perf_counter() - t0)
    p99 = statistics.quantiles(times, n=100)[98]
    assert p99 < 0.05, f"p99 {p99 * 1000:.1f} ms"
    assert km.stats()["keyspaces"]["fast:*"]["mean_compute_seconds"] < 0.05  # no queue time charged


async def test_in_flight_counts_stay_honest_through_timeouts(km: Keymiss, release: threading.Event) -> None:
    @km.keyspace("hang:*", timeout=0.1, concurrency=3)
    def hang(key: str) -> str:
        release.wait(20)
        return "late"

    @km.keyspace("ok:*")
    def ok(key: str) -> str:
        return "fine"

    results = await asyncio.gather(*(km.get(f"hang:{i}") for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ComputeTimeoutError) for r in results), results
    stats = km.stats()
    ks = stats["keyspaces"]["hang:*"]
    assert (ks["in_flight"], ks["stuck"], ks["timeouts"]) == (3, 3, 3)  # the threads still run
    assert (stats["in_flight"], stats["stuck_handlers"]) == (3, 3)
    # every slot is held past its timeout: a new miss there is refused at once, not queued
    t0 = time.perf_counter()
    with pytest.raises(BusyError, match="past their timeout"):
        await km.get("hang:new")
    assert time.perf_counter() - t0 < 0.05
    assert await km.get("ok:1") == "fine"  # other keyspaces are unaffected
    release.set()
    await aeventually(lambda: km.stats()["in_flight"] == 0, timeout=5)
    stats = km.stats()
    assert (stats["in_flight"], stats["stuck_handlers"], stats["keyspaces"]["hang:*"]["in_flight"]) == (
        0,
        0,
        0,
    )
    assert await km.get("hang:after") == "late"  # slots came back with their threads


async def test_queue_time_is_not_charged_to_the_handler(km: Keymiss) -> None:
    @km.keyspace("slow:*", timeout=0.5, concurrency=1, queue_timeout=1.0)
    def slow(key: str) -> str:
        time.sleep(0.2)
        return "done"

    results = await asyncio.gather(*(km.get(f"slow:{i}") for i in range(12)), return_exceptions=True)
    timeouts = [r for r in results if isinstance(r, ComputeTimeoutError)]
    busy = [r for r in results if isinstance(r, BusyError)]
    done = [r for r in results if r == "done"]
    assert not timeouts, "a computation that waited for a slot was reported as a slow handler"
    assert len(done) >= 3 and busy and len(done) + len(busy) == 12
    assert all("slot" in str(b) for b in busy)
    assert km.stats()["keyspaces"]["slow:*"]["mean_compute_seconds"] < 0.3


async def test_a_full_queue_is_busy_at_once(km: Keymiss, release: threading.Event) -> None:
    @km.keyspace("one:*", concurrency=1, queue=2, timeout=5)
    def one(key: str) -> str:
        release.wait(5)
        return "v"

    tasks = [asyncio.ensure_future(km.get(f"one:{i}")) for i in range(3)]  # 1 runs, 2 wait
    await aeventually(lambda: km.stats()["keyspaces"]["one:*"]["queued"] == 2)
    t0 = time.perf_counter()
    with pytest.raises(BusyError, match="already wait"):
        await km.get("one:3")
    assert time.perf_counter() - t0 < 0.05
    release.set()
    assert await asyncio.gather(*tasks) == ["v", "v", "v"]


async def test_unknown_keyspace_options_are_config_errors() -> None:
    from keymiss import ConfigError

    km = Keymiss(sweep_interval=0)
    with pytest.raises(ConfigError, match="unknown keyspace option"):
        km.keyspace("x:*", timout=3)
    for bad in ({"concurrency": 0}, {"queue": -1}, {"error_detail": "all"}, {"codec": "pickle"}):
        with pytest.raises(ConfigError):
            km.keyspace("x:*", **bad)
