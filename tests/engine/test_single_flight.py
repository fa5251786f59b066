"""One computation per key however many wait for it: its value, its error or its timeout reaches
every waiter; waiters come and go without disturbing it.

Handlers here say when they start (an ``Event`` they set) and run until the test releases them (an
``Event`` the test sets), so "while it computes" is a moment the test chooses, not a guess in
milliseconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from keymiss import BusyError, ComputeTimeoutError, HandlerError, Keymiss, MemoryStore
from keymiss.stores import Write

from ..support import aeventually


async def test_single_flight_1000_waiters_one_call(km: Keymiss) -> None:
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()

    @km.keyspace("slow:*")
    async def slow(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "v"

    tasks = [asyncio.create_task(km.get("slow:1")) for _ in range(1000)]
    await started.wait()
    assert calls == 1
    release.set()
    assert await asyncio.gather(*tasks) == ["v"] * 1000
    assert calls == 1
    assert km.stats()["keyspaces"]["slow:*"]["coalesced"] == 999


async def test_single_flight_with_sync_handler_in_thread(km: Keymiss) -> None:
    calls = 0
    started, gate = threading.Event(), threading.Event()

    @km.keyspace("sync:*")
    def work(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        gate.wait(5)
        return key.upper()

    tasks = [asyncio.create_task(km.get("sync:a")) for _ in range(200)]
    try:
        assert await asyncio.to_thread(started.wait, 5)
    finally:
        gate.set()
    assert set(await asyncio.gather(*tasks)) == {"SYNC:A"}
    assert calls == 1


async def test_sync_handler_does_not_block_hits(km: Keymiss) -> None:
    started, release = threading.Event(), threading.Event()

    @km.keyspace("model:*")
    def model(key: str) -> str:
        started.set()
        release.wait(5)  # a model running in its thread until the test has made its hits
        return "done"

    await km.set("hot", "cached")
    miss = asyncio.create_task(km.get("model:x"))
    try:
        assert await asyncio.to_thread(started.wait, 5)
        t0 = time.perf_counter()
        for _ in range(1000):
            assert await km.get("hot") == "cached"
        assert time.perf_counter() - t0 < 0.4  # all 1000 hits while the model still runs
        assert not miss.done()
    finally:
        release.set()
    assert await miss == "done"


@pytest.mark.reliability
async def test_error_reaches_every_waiter_and_next_get_retries(km: Keymiss) -> None:
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()

    @km.keyspace("flaky:*")
    async def flaky(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        if calls == 1:
            raise ValueError("model exploded")
        return "ok"

    tasks = [asyncio.create_task(km.get("flaky:1")) for _ in range(50)]
    await started.wait()
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, HandlerError) for r in results)
    err = results[0]
    assert isinstance(err, HandlerError)
    assert err.keyspace == "flaky:*" and "model exploded" in str(err)
    assert isinstance(err.__cause__, ValueError)
    assert km.store.get_now("flaky:1") is None  # nothing stored
    assert await km.get("flaky:1") == "ok"
    assert calls == 2
    assert km.stats()["keyspaces"]["flaky:*"]["errors"] == 1


@pytest.mark.reliability
async def test_timeout_reaches_every_waiter(km: Keymiss) -> None:
    never = asyncio.Event()

    @km.keyspace("hang:*", timeout=0.1)
    async def hang(key: str) -> str:
        await never.wait()  # never set: a hung handler, until its timeout cancels it
        return "never"

    t0 = time.perf_counter()
    results = await asyncio.gather(*(km.get("hang:1") for _ in range(20)), return_exceptions=True)
    assert time.perf_counter() - t0 < 2
    assert all(isinstance(r, ComputeTimeoutError) for r in results)
    assert "within 0.1s" in str(results[0])
    assert km.store.get_now("hang:1") is None
    assert km.stats()["keyspaces"]["hang:*"]["timeouts"] == 1
    assert km.stats()["in_flight"] == 0


@pytest.mark.reliability
async def test_sync_handler_timeout_discards_late_result(km: Keymiss) -> None:
    release = threading.Event()

    @km.keyspace("slowsync:*", timeout=0.1)
    def slow(key: str) -> str:
        release.wait(5)  # past its timeout: held until the caller has its error
        return "late"

    try:
        with pytest.raises(ComputeTimeoutError):
            await km.get("slowsync:1")
    finally:
        release.set()
    # the thread comes back with its late value, which must go nowhere
    await aeventually(lambda: km.stats()["stuck_handlers"] == 0, timeout=5)
    assert km.store.get_now("slowsync:1") is None


@pytest.mark.reliability
async def test_cancelled_waiter_does_not_cancel_computation(km: Keymiss) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    @km.keyspace("c:*")
    async def comp(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "value"

    first = asyncio.create_task(km.get("c:1"))
    others = [asyncio.create_task(km.get("c:1")) for _ in range(5)]
    await started.wait()
    first.cancel()
    await asyncio.wait([first])  # its cancellation has run its course
    release.set()
    assert await asyncio.gather(*others) == ["value"] * 5
    assert first.cancelled()
    assert calls == 1
    assert await km.get("c:1") == "value"


async def test_value_is_committed_before_any_caller_hears(km: Keymiss) -> None:
    order: list[str] = []
    storing, release = asyncio.Event(), asyncio.Event()

    class SlowStore(MemoryStore):
        async def set_many(self, writes: Sequence[Write]) -> list[bool]:
            storing.set()
            await release.wait()  # a slow disk: the write takes until the test says
            result = await super().set_many(writes)
            order.append("stored")
            return result

    app = Keymiss(store=SlowStore(1024**2))

    @app.keyspace("k:*")
    async def k(key: str) -> str:
        return "v"

    async def caller() -> None:
        assert await app.get("k:1") == "v"
        order.append("replied")

    callers = asyncio.gather(*(caller() for _ in range(3)))
    await storing.wait()
    assert order == []  # computed, not yet stored: nobody has heard
    release.set()
    await callers
    assert order == ["stored", "replied", "replied", "replied"]
    await app.close()


async def test_busy_when_too_many_computations(km: Keymiss) -> None:
    km.max_in_flight = 2
    started, release = asyncio.Event(), asyncio.Event()

    @km.keyspace("w:*")
    async def w(key: str) -> str:
        started.set()
        await release.wait()
        return key

    a = asyncio.create_task(km.get("w:1"))
    b = asyncio.create_task(km.get("w:2"))
    joiner = asyncio.create_task(km.get("w:1"))  # joining a running computation is always allowed
    await started.wait()
    with pytest.raises(BusyError, match="in flight"):
        await km.get("w:3")
    release.set()
    assert await asyncio.gather(a, b, joiner) == ["w:1", "w:2", "w:1"]
    assert await km.get("w:3") == "w:3"


async def test_close_lets_running_computation_finish() -> None:
    app = Keymiss()
    started, release = asyncio.Event(), asyncio.Event()

    @app.keyspace("c:*")
    async def c(key: str) -> str:
        started.set()
        await release.wait()
        return "finished"

    task = asyncio.create_task(app.get("c:1"))
    await started.wait()
    asyncio.get_running_loop().call_soon(release.set)  # runs once close is under way
    await app.close(grace=5)
    assert await task == "finished"
