"""Reads, writes and computations meeting: ``compute`` stores nothing, ``read`` is ready for hits,
a client's write wins over a computation that started before it, a write the store refuses fails
only its own key, and reads after close are a clear error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from keymiss import HandlerError, Keymiss, KeymissError
from keymiss.engine.compute import Computed


@pytest.fixture
async def km() -> AsyncIterator[Keymiss]:
    app = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    yield app
    await app.close(grace=1)


async def test_compute_stores_nothing(km: Keymiss) -> None:
    calls: list[str] = []

    @km.keyspace("double:*", ttl=30)
    def double(key: str) -> str:
        calls.append(key)
        return str(2 * int(key.split(":")[1]))

    @km.keyspace("doc{<tag>}_<id>")
    def doc(tag: str, id: str) -> dict[str, str]:
        return {"tag": tag, "id": id}

    results = await km.compute(["double:21", "nobody:1", "doc{t}_7", "doc{broken"])
    first, nobody, document, broken = results
    assert isinstance(first, Computed) and first.value == b"42" and first.codec == 1 and first.ttl == 30
    assert nobody is None
    assert isinstance(document, Computed) and document.value == b'{"tag":"t","id":"7"}'
    assert isinstance(broken, KeymissError)
    assert await km.store.dbsize() == 0  # nothing was written
    assert km.stats()["keyspaces"]["double:*"]["computations"] == 1
    assert await km.get("double:21") == "42"  # so a read computes again, and stores it
    assert calls == ["double:21", "double:21"]
    assert await km.store.dbsize() == 1


async def test_compute_and_reads_share_one_computation(km: Keymiss) -> None:
    calls = 0
    started, release = asyncio.Event(), asyncio.Event()

    @km.keyspace("slow:*")
    async def slow(key: str) -> str:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        return "v"

    gathered = asyncio.gather(km.get("slow:1"), km.compute(["slow:1"]), km.get("slow:1"))
    await started.wait()  # all three have asked by the time the computation runs
    release.set()
    got = await gathered
    assert got[0] == got[2] == "v" and isinstance(got[1][0], Computed)
    assert calls == 1


async def test_read_is_ready_for_hits_and_plain_misses(km: Keymiss) -> None:
    @km.keyspace("double:*")
    def double(key: str) -> str:
        return str(2 * int(key.split(":")[1]))

    assert km.read("nobody") is None  # ready: no keyspace owns it
    pending = km.read("double:2")
    assert asyncio.iscoroutine(pending) or isinstance(pending, asyncio.Future)
    item = await pending  # type: ignore[misc]
    assert item.value == b"4"
    hit = km.read("double:2")
    assert hit is not None and not asyncio.iscoroutine(hit) and hit.value == b"4"  # type: ignore[union-attr]
    many = km.read_many(["double:2", "nobody"])
    assert isinstance(many, list) and many[1] is None
    later = km.read_many(["double:2", "double:x"])
    assert not isinstance(later, list)
    results = await later
    assert results[0].value == b"4" and isinstance(results[1], HandlerError)  # type: ignore[union-attr]


async def test_a_clients_write_wins_over_a_computation_that_started_before_it(km: Keymiss) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    @km.keyspace("slow:*")
    async def slow(key: str) -> str:
        started.set()
        await release.wait()
        return "computed"

    async def computing(key: str) -> asyncio.Future[str]:
        """A reader's miss of ``key`` whose computation is running, held until ``release``."""
        started.clear()
        release.clear()
        reader = asyncio.ensure_future(km.get(key))
        await started.wait()
        return reader

    # SET during the computation: the client's value stays; the reader that asked first gets its answer
    reader = await computing("slow:set")
    assert await km.set("slow:set", "client")
    release.set()
    assert await reader == "computed"
    assert await km.get("slow:set") == "client"
    # SET NX succeeds (nothing is stored yet) and is not clobbered afterwards
    reader = await computing("slow:nx")
    assert await km.set("slow:nx", "first", nx=True)
    release.set()
    await reader
    assert await km.get("slow:nx") == "first"
    # DEL and FORGET during the computation: the computed value does not reappear
    for forget in (
        lambda: km.delete("slow:del"),
        lambda: km.forget("slow:del"),
        lambda: km.expire("slow:del", 0),
    ):
        reader = await computing("slow:del")
        await forget()
        release.set()
        await reader
        assert km.store.get_now("slow:del") is None  # type: ignore[attr-defined]
    assert km.stats()["keyspaces"]["slow:*"]["superseded"] == 5
    # with no client write, values are stored as always
    assert await km.get("slow:plain") == "computed" and km.store.get_now("slow:plain") is not None  # type: ignore[attr-defined]


async def test_a_write_right_after_the_miss_still_wins(km: Keymiss) -> None:
    release = asyncio.Event()

    @km.keyspace("slow:*")
    async def slow(key: str) -> str:
        await release.wait()
        return "computed"

    await km.start()
    pending = km.read("slow:w")  # the miss is begun here, before its task has run at all
    assert await km.set("slow:w", "client")
    release.set()
    await pending  # type: ignore[misc]
    assert await km.get("slow:w") == "client"
    release.clear()
    many = km.read_many(["slow:m1", "slow:m2"])
    await km.set("slow:m2", "client")
    release.set()
    await many  # type: ignore[misc]
    assert await km.get_many(["slow:m1", "slow:m2"]) == ["computed", "client"]


async def test_a_value_that_can_never_fit_lmdb_is_declined_and_evicts_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    km = Keymiss(store=f"lmdb:{tmp_path}/db?max_disk=1MB&map_size=1MB", sweep_interval=0)

    @km.keyspace("small:*")
    def small(key: str) -> str:
        return "v" * 100

    @km.keyspace("big:*")
    def big(key: str) -> bytes:
        return b"x" * (2 * 1024**2)

    try:
        for i in range(200):
            await km.get(f"small:{i}")
        assert await km.get("big:1") == b"x" * (2 * 1024**2)  # answered, though not kept
        assert km.stats()["keyspaces"]["big:*"]["not_stored"] == 1
        assert await km.store.dbsize() == 200 and km.store.info().evictions == 0
    finally:
        await km.close()


async def test_one_failing_write_does_not_fail_the_values_beside_it() -> None:
    from keymiss import MemoryStore, StoreError

    class FussyStore(MemoryStore):
        """A memory store that cannot write one key: a full disk for that record, say."""

        def _set(self, writes, nx, xx, keep_ttl):  # type: ignore[no-untyped-def]
            if any(w.key == "emb:bad" for w in writes):
                raise StoreError("no room for emb:bad")
            return super()._set(writes, nx, xx, keep_ttl)

    km = Keymiss(store=FussyStore(64 * 1024**2), sweep_interval=0)

    @km.keyspace("emb:*", batch_size=8, batch_wait_ms=20)
    def emb(keys: list[str]) -> list[str]:
        return [k.upper() for k in keys]

    try:
        got = await km.get_many(["emb:a", "emb:bad", "emb:c"], return_exceptions=True)
        assert got[0] == "EMB:A" and got[2] == "EMB:C" and isinstance(got[1], StoreError)
        assert await km.store.dbsize() == 2
    finally:
        await km.close()


async def test_reads_after_close_are_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from keymiss import StoreError

    for store in ("memory", f"lmdb:{tmp_path}/db"):
        km = Keymiss(store=store, sweep_interval=0)
        calls = 0

        @km.keyspace("sync:*")
        def sync(key: str) -> str:
            return "v"

        @km.keyspace("async:*")
        async def asynchronous(key: str) -> str:
            nonlocal calls
            calls += 1
            return "v"

        assert await km.get("sync:0") == "v"
        await km.close()
        for key in ("sync:1", "async:1"):
            with pytest.raises(StoreError, match="closed"):
                await km.get(key)
        assert calls == 0 and km.stats()["keyspaces"]["sync:*"]["errors"] == 0


async def test_forget_takes_the_pattern_keyspaces_prints_and_keeps_keymiss_records(km: Keymiss) -> None:
    @km.keyspace("doc{<tag>}_<id>")
    def doc(tag: str, id: str) -> str:
        return id

    for i in range(3):
        await km.get(f"doc{{t}}_{i}")
    await km.set("keymiss:ctx:doc{t}", "a context record")
    await km.set("other", "kept")
    assert await km.forget("doc{<tag>}_<id>") == 3  # the template itself, as KEYMISS KEYSPACES shows it
    assert await km.forget("*") == 0  # only keyspaces' keys: "other" and keymiss's own records stay
    assert await km.get("other") == "kept"
    assert await km.get("keymiss:ctx:doc{t}") == "a context record"
    assert await km.forget("keymiss:*") == 1  # unless asked for by name
