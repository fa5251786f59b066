"""The synchronous face (``SyncKeymiss``, ``km.sync``, sync cached functions): one engine on one
loop thread, shared by every thread; single-flight across threads; no deadlock from inside a
running loop (a notebook's), and a clear refusal on keymiss's own loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from keymiss import Keymiss, KeymissError, StoreError, SyncKeymiss, Value

from ..support import eventually


@pytest.fixture
def km() -> Iterator[Keymiss]:
    app = Keymiss(store="memory", max_memory="64MB")
    yield app
    app.sync.close()


def test_threads_missing_one_key_compute_it_once(km: Keymiss) -> None:
    release = threading.Event()
    calls: list[int] = []

    @km.cached("sq:{n}", ttl=60)
    def square(n: int) -> int:
        calls.append(n)
        release.wait(10)
        return n * n

    threads = 8
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(square, 12) for _ in range(threads)]
        stats = km.registry.route("sq:12").stats  # type: ignore[union-attr]
        eventually(lambda: stats.misses, expect=threads, timeout=10, message="every thread waits")
        release.set()
        assert [f.result(10) for f in futures] == [144] * threads
    assert calls == [12]
    assert square(12) == 144  # a hit
    assert calls == [12]


def test_the_sync_face_methods(km: Keymiss) -> None:
    sync = km.sync
    assert km.sync is sync and isinstance(sync, SyncKeymiss)

    @sync.keyspace("d:*", ttl=60, tags=["doubles"])
    def double(key: str) -> Value:
        n = int(key[2:])
        return Value(2 * n, ttl=5) if n == 1 else 2 * n

    with sync:
        assert sync.get("d:21") == 42
        assert sync.get_many(["d:1", "d:2", "none"]) == [2, 4, None]
        assert 0 < sync.pttl("d:1") <= 5000 and sync.ttl("d:2") == 60
        assert sync.set("plain", "v", ttl=10) is True
        assert sync.get("plain") == "v"
        assert sync.exists("plain", "d:21") == 2
        assert sync.expire("plain", 100) is True
        assert sync.delete("plain") == 1
        assert sync.forget("d:*") == 3
        assert sync.get("d:5") == 10
        assert sync.forget_tag("doubles") == 1
        assert sync.stats()["keyspaces"]["d:*"]["computations"] == 4
        assert sync.call(km.get, "d:3") == 6
    assert not any(t.name == "keymiss-loop" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(StoreError):
        sync.get("d:4")  # closed


def test_a_sync_call_from_inside_another_running_loop_does_not_deadlock(km: Keymiss) -> None:
    @km.cached("up:{text}")
    def upper(text: str) -> str:
        return text.upper()

    async def notebook_cell() -> tuple[str, str]:
        # a notebook runs cells inside its own running loop; a sync call there blocks that
        # loop's thread while keymiss's own loop thread does the work
        return upper("abc"), km.sync.get("up:def")

    assert asyncio.run(notebook_cell()) == ("ABC", "DEF")


def test_a_sync_call_on_keymiss_own_loop_is_refused_not_hung() -> None:
    async def main() -> None:
        km = Keymiss()

        @km.cached("up:{text}")
        def upper(text: str) -> str:
            return text.upper()

        async with km:  # keymiss runs on this loop now
            assert await upper.acall("x") == "X"
            with pytest.raises(KeymissError, match="would block"):
                upper("y")
            with pytest.raises(KeymissError, match="would block"):
                km.sync.get("up:y")
            # from a thread, the sync call is handed to this loop (the Python server's case:
            # a sync handler thread calling a cached function)
            assert await asyncio.to_thread(upper, "z") == "Z"

    asyncio.run(main())


def test_a_loop_that_ended_is_said_not_waited_for() -> None:
    km = Keymiss()

    @km.keyspace("k:*")
    def k(key: str) -> str:
        return key

    async def main() -> str:
        return await km.get("k:1")  # keymiss starts on this loop, which then ends

    assert asyncio.run(main()) == "k:1"
    with pytest.raises(StoreError, match="no longer running"):
        km.sync.get("k:2")
