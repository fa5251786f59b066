"""The read-through engine: hits, misses, single-flight, fan-out of errors, batching, write-back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from keymiss import (
    BatchResultError,
    BusyError,
    CodecError,
    ComputeTimeoutError,
    ConfigError,
    HandlerError,
    KeyMismatchError,
    Keymiss,
    KeymissError,
    MemoryStore,
    StoreError,
)
from keymiss.stores import Write

from ..conftest import FakeClock


@pytest.fixture
async def km() -> AsyncIterator[Keymiss]:
    app = Keymiss(store="memory", max_memory="64MB")
    yield app
    await app.close()


async def test_miss_computes_then_hit_does_not(km: Keymiss) -> None:
    calls: list[str] = []

    @km.keyspace("double:*")
    def double(key: str) -> str:
        calls.append(key)
        return str(2 * int(key.split(":")[1]))

    assert await km.get("double:21") == "42"
    assert await km.get("double:21") == "42"
    assert calls == ["double:21"]
    ks = km.stats()["keyspaces"]["double:*"]
    assert (ks["hits"], ks["misses"], ks["computations"]) == (1, 1, 1)


async def test_stored_bytes_are_what_a_redis_client_sees(km: Keymiss) -> None:
    @km.keyspace("doc:*")
    async def doc(key: str) -> dict[str, object]:
        return {"key": key, "n": 1}

    assert await km.get("doc:1") == {"key": "doc:1", "n": 1}
    item = km.store.get_now("doc:1")
    assert item is not None and item.value == b'{"key":"doc:1","n":1}'


async def test_unregistered_key_is_a_plain_miss(km: Keymiss) -> None:
    @km.keyspace("double:*")
    def double(key: str) -> str:
        raise AssertionError("must not run")

    assert await km.get("nothing:here") is None
    await km.set("nothing:here", "set by a client")
    assert await km.get("nothing:here") == "set by a client"


async def test_template_fields_reach_handler(km: Keymiss) -> None:
    seen: list[tuple[str, str, str]] = []

    @km.keyspace("bertqa{<tag>}_<context>_<question>", ttl=3600)
    async def qa(tag: str, context: str, question: str) -> str:
        seen.append((tag, context, question))
        return "answer"

    key = "bertqa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral_transmission among adults"
    assert await km.get(key) == "answer"
    assert seen == [("8YG", "PMC302072.xml:{8YG}:10", "Who performs viral_transmission among adults")]
    assert 3590 <= await km.ttl(key) <= 3600


async def test_template_mismatch_runs_nothing(km: Keymiss) -> None:
    ran = []

    @km.keyspace("bertqa{<tag>}_<context>_<question>")
    def qa(tag: str, context: str, question: str) -> str:
        ran.append(1)
        return ""

    with pytest.raises(KeyMismatchError, match="does not fit keyspace template"):
        await km.get("bertqa{8YG}_missing-question")
    assert ran == []
    assert await km.exists("bertqa{8YG}_missing-question") == 0


async def test_single_flight_1000_waiters_one_call(km: Keymiss) -> None:
    calls = 0
    release = asyncio.Event()

    @km.keyspace("slow:*")
    async def slow(key: str) -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "v"

    tasks = [asyncio.create_task(km.get("slow:1")) for _ in range(1000)]
    await asyncio.sleep(0.01)
    assert calls == 1
    release.set()
    assert await asyncio.gather(*tasks) == ["v"] * 1000
    assert calls == 1
    assert km.stats()["keyspaces"]["slow:*"]["coalesced"] == 999


async def test_single_flight_with_sync_handler_in_thread(km: Keymiss) -> None:
    calls = 0
    gate = threading.Event()

    @km.keyspace("sync:*")
    def work(key: str) -> str:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return key.upper()

    tasks = [asyncio.create_task(km.get("sync:a")) for _ in range(200)]
    await asyncio.sleep(0.05)
    gate.set()
    assert set(await asyncio.gather(*tasks)) == {"SYNC:A"}
    assert calls == 1


async def test_sync_handler_does_not_block_hits(km: Keymiss) -> None:
    started = threading.Event()

    @km.keyspace("model:*")
    def model(key: str) -> str:
        started.set()
        time.sleep(0.5)
        return "done"

    await km.set("hot", "cached")
    miss = asyncio.create_task(km.get("model:x"))
    while not started.is_set():
        await asyncio.sleep(0.001)
    t0 = time.perf_counter()
    for _ in range(1000):
        assert await km.get("hot") == "cached"
    assert time.perf_counter() - t0 < 0.4  # all 1000 hits while the model still runs
    assert not miss.done()
    assert await miss == "done"


@pytest.mark.reliability
async def test_error_reaches_every_waiter_and_next_get_retries(km: Keymiss) -> None:
    calls = 0
    release = asyncio.Event()

    @km.keyspace("flaky:*")
    async def flaky(key: str) -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        if calls == 1:
            raise ValueError("model exploded")
        return "ok"

    tasks = [asyncio.create_task(km.get("flaky:1")) for _ in range(50)]
    await asyncio.sleep(0.01)
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
    @km.keyspace("hang:*", timeout=0.1)
    async def hang(key: str) -> str:
        await asyncio.sleep(30)
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
    @km.keyspace("slowsync:*", timeout=0.1)
    def slow(key: str) -> str:
        time.sleep(0.4)
        return "late"

    with pytest.raises(ComputeTimeoutError):
        await km.get("slowsync:1")
    await asyncio.sleep(0.5)
    assert km.store.get_now("slowsync:1") is None


@pytest.mark.reliability
async def test_cancelled_waiter_does_not_cancel_computation(km: Keymiss) -> None:
    release = asyncio.Event()
    calls = 0

    @km.keyspace("c:*")
    async def comp(key: str) -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "value"

    first = asyncio.create_task(km.get("c:1"))
    others = [asyncio.create_task(km.get("c:1")) for _ in range(5)]
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*others) == ["value"] * 5
    assert first.cancelled()
    assert calls == 1
    assert await km.get("c:1") == "value"


async def test_value_is_committed_before_any_caller_hears(km: Keymiss) -> None:
    order: list[str] = []

    class SlowStore(MemoryStore):
        async def set_many(self, writes: Sequence[Write]) -> list[bool]:
            await asyncio.sleep(0.05)
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

    await asyncio.gather(*(caller() for _ in range(3)))
    assert order == ["stored", "replied", "replied", "replied"]
    await app.close()


@pytest.mark.reliability
async def test_store_failure_is_reported_and_engine_keeps_serving(km: Keymiss) -> None:
    class FailingStore(MemoryStore):
        fail = True

        async def set_many(self, writes: Sequence[Write]) -> list[bool]:
            if self.fail:
                raise StoreError("No space left on device")
            return await super().set_many(writes)

    store = FailingStore(1024**2)
    app = Keymiss(store=store)

    @app.keyspace("k:*")
    async def k(key: str) -> str:
        return "v"

    with pytest.raises(StoreError, match="No space left"):
        await app.get("k:1")
    store.fail = False
    assert await app.get("k:1") == "v"
    await app.close()


async def test_error_ttl_caches_failures_briefly(km: Keymiss) -> None:
    calls = 0

    @km.keyspace("bad:*", error_ttl=60)
    def bad(key: str) -> str:
        nonlocal calls
        calls += 1
        raise RuntimeError("bad input")

    for _ in range(3):
        with pytest.raises(HandlerError):
            await km.get("bad:1")
    assert calls == 1


@pytest.mark.reliability
async def test_unencodable_result_is_an_error_not_a_crash(km: Keymiss) -> None:
    @km.keyspace("obj:*")
    def obj(key: str) -> object:
        return object()

    with pytest.raises(CodecError, match="obj:\\*"):
        await km.get("obj:1")
    assert km.stats()["in_flight"] == 0


async def test_numpy_values_round_trip(km: Keymiss) -> None:
    @km.keyspace("emb:*")
    def emb(key: str) -> np.ndarray:
        return np.arange(6, dtype="float32").reshape(2, 3)

    first = await km.get("emb:1")
    second = await km.get("emb:1")
    assert first.dtype == np.float32 and np.array_equal(first, second)


async def test_undecodable_stored_value_is_recomputed(km: Keymiss) -> None:
    @km.keyspace("j:*", codec="json")
    def j(key: str) -> dict[str, int]:
        return {"ok": 1}

    await km.store.set("j:1", b"\x80\x04garbage", codec=2)
    assert await km.get("j:1") == {"ok": 1}
    assert km.decode_failures == 1
    item = km.store.get_now("j:1")
    assert item is not None and item.value == b'{"ok":1}'


async def test_value_bigger_than_budget_is_returned_not_stored() -> None:
    app = Keymiss(store="memory", max_memory=10_000)

    @app.keyspace("big:*")
    def big(key: str) -> bytes:
        return b"x" * 50_000

    assert await app.get("big:1") == b"x" * 50_000
    assert app.store.get_now("big:1") is None
    assert app.stats()["keyspaces"]["big:*"]["not_stored"] == 1
    await app.close()


async def test_busy_when_too_many_computations(km: Keymiss) -> None:
    km.max_in_flight = 2
    release = asyncio.Event()

    @km.keyspace("w:*")
    async def w(key: str) -> str:
        await release.wait()
        return key

    a = asyncio.create_task(km.get("w:1"))
    b = asyncio.create_task(km.get("w:2"))
    joiner = asyncio.create_task(km.get("w:1"))  # joining a running computation is always allowed
    await asyncio.sleep(0.01)
    with pytest.raises(BusyError, match="in flight"):
        await km.get("w:3")
    release.set()
    assert await asyncio.gather(a, b, joiner) == ["w:1", "w:2", "w:1"]
    assert await km.get("w:3") == "w:3"


async def test_ttl_expiry_through_engine(clock: FakeClock) -> None:
    app = Keymiss(store=MemoryStore(1024**2, clock=clock))
    calls = 0

    @app.keyspace("t:*", ttl=5)
    def t(key: str) -> str:
        nonlocal calls
        calls += 1
        return str(calls)

    assert await app.get("t:1") == "1"
    clock.advance(4)
    assert await app.get("t:1") == "1"
    clock.advance(2)
    assert await app.get("t:1") == "2"
    await app.close()


# --- batching ----------------------------------------------------------------------------------------
async def test_batch_gathers_distinct_misses(km: Keymiss) -> None:
    batches: list[list[str]] = []

    @km.keyspace("sq:*", batch_size=8, batch_wait_ms=50)
    def square(keys: list[str]) -> list[str]:
        batches.append(keys)
        return [str(int(k[3:]) ** 2) for k in keys]

    results = await asyncio.gather(*(km.get(f"sq:{i}") for i in range(8)))
    assert results == [str(i * i) for i in range(8)]
    assert batches == [[f"sq:{i}" for i in range(8)]]


async def test_batch_closes_on_wait_with_fewer_items(km: Keymiss) -> None:
    sizes: list[int] = []

    @km.keyspace("b:*", batch_size=64, batch_wait_ms=20)
    async def b(keys: list[str]) -> list[str]:
        sizes.append(len(keys))
        return keys

    t0 = time.perf_counter()
    assert await asyncio.gather(*(km.get(f"b:{i}") for i in range(3))) == ["b:0", "b:1", "b:2"]
    assert sizes == [3]
    assert time.perf_counter() - t0 < 1.0


async def test_batched_template_handler_gets_named_fields(km: Keymiss) -> None:
    @km.keyspace("qa{<tag>}_<context>_<question>", batch_size=4, batch_wait_ms=10)
    async def qa(items: list) -> list[str]:  # type: ignore[type-arg]
        return [f"{i.context}|{i.question}" for i in items]

    out = await km.get_many(["qa{a}_c1_q_1", "qa{a}_c2_q 2"])
    assert out == ["c1|q_1", "c2|q 2"]


async def test_wrong_length_batch_fails_every_caller(km: Keymiss) -> None:
    @km.keyspace("wl:*", batch_size=4, batch_wait_ms=10)
    def wl(keys: list[str]) -> list[str]:
        return keys[:-1]

    results = await asyncio.gather(*(km.get(f"wl:{i}") for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, BatchResultError) for r in results)
    assert "3 results for 4 inputs" in str(results[0])
    assert await km.store.dbsize() == 0


async def test_batch_item_exception_fails_only_that_item(km: Keymiss) -> None:
    @km.keyspace("p:*", batch_size=3, batch_wait_ms=10)
    def p(keys: list[str]) -> list[object]:
        return [ValueError("no answer") if k == "p:1" else k for k in keys]

    results = await asyncio.gather(*(km.get(f"p:{i}") for i in range(3)), return_exceptions=True)
    assert results[0] == "p:0" and results[2] == "p:2"
    assert isinstance(results[1], HandlerError)


async def test_get_many_mixes_hits_misses_and_unregistered(km: Keymiss) -> None:
    batches: list[int] = []

    @km.keyspace("m:*", batch_size=16, batch_wait_ms=10)
    def m(keys: list[str]) -> list[str]:
        batches.append(len(keys))
        return [k.upper() for k in keys]

    await km.set("m:hit", "cached")
    out = await km.get_many(["m:hit", "m:a", "other", "m:b", "m:a"])
    assert out == ["cached", "M:A", None, "M:B", "M:A"]
    assert batches == [2]


async def test_get_many_return_exceptions(km: Keymiss) -> None:
    @km.keyspace("e:*")
    def e(key: str) -> str:
        if key == "e:bad":
            raise RuntimeError("nope")
        return "fine"

    out = await km.get_many(["e:ok", "e:bad"], return_exceptions=True)
    assert out[0] == "fine" and isinstance(out[1], HandlerError)
    with pytest.raises(HandlerError):
        await km.get_many(["e:bad"])


# --- key commands and configuration ------------------------------------------------------------
async def test_redis_like_key_commands(km: Keymiss) -> None:
    assert await km.set("a", "1")
    assert not await km.set("a", "2", nx=True)
    assert not await km.set("b", "2", xx=True)
    assert await km.exists("a", "a", "b") == 2
    assert await km.ttl("a") == -1
    assert await km.ttl("b") == -2
    assert await km.expire("a", 100)
    assert 99 <= await km.ttl("a") <= 100
    assert await km.persist("a")
    assert not await km.persist("a")
    assert await km.delete("a", "b") == 1
    with pytest.raises(KeymissError, match="invalid expire"):
        await km.set("a", "1", ttl=0)


async def test_forget_drops_a_keyspace(km: Keymiss) -> None:
    @km.keyspace("f:*")
    def f(key: str) -> str:
        return "v"

    await km.get_many([f"f:{i}" for i in range(10)])
    await km.set("keep", "me")
    assert await km.forget("f:*") == 10
    assert await km.exists("keep") == 1
    assert km.store.get_now("f:3") is None


async def test_configure_overrides_store_before_open(tmp_path: Path) -> None:
    app = Keymiss(store="memory", max_memory="1MB")
    app.configure(store=f"lmdb:{tmp_path}/db")
    assert app.store.url == f"lmdb:{tmp_path}/db"
    with pytest.raises(KeymissError, match="already open"):
        app.configure(store="memory")
    await app.close()


async def test_close_lets_running_computation_finish() -> None:
    app = Keymiss()

    @app.keyspace("c:*")
    async def c(key: str) -> str:
        await asyncio.sleep(0.1)
        return "finished"

    task = asyncio.create_task(app.get("c:1"))
    await asyncio.sleep(0.01)
    await app.close(grace=5)
    assert await task == "finished"


async def test_lmdb_backed_engine_survives_reopen(tmp_path: Path) -> None:
    url = f"lmdb:{tmp_path}/cache"
    app = Keymiss(store=url)
    calls = 0

    @app.keyspace("d:*")
    def d(key: str) -> str:
        nonlocal calls
        calls += 1
        return "computed"

    assert await app.get("d:1") == "computed"
    await app.close()
    again = Keymiss(store=url)
    again.add_keyspace("d:*", d)
    assert await again.get("d:1") == "computed"
    assert calls == 1
    await again.close()


async def test_an_exception_whose_message_cannot_be_read_still_gives_a_clear_error(km: Keymiss) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    @km.keyspace("odd:*")
    def odd(key: str) -> str:
        raise Unprintable()

    with pytest.raises(HandlerError, match=r"handler failed: Unprintable: \(its message could not be read\)"):
        await km.get("odd:1")


async def test_early_refresh_keeps_a_hot_key_fresh_with_no_reader_waiting() -> None:
    """XFetch, scaled down from the 60 s / TTL 2 s / 0.3 s acceptance run (keeping reads × compute
    time, which sets how early XFetch fires): a hot key with TTL 0.6 s and a 0.1 s computation,
    read every 3 ms for 6 s: after the first miss no read waits for a computation, and there are
    at most two computations per TTL period."""
    km = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    calls = 0

    @km.keyspace("hot:*", ttl=0.6, early_refresh=1.0)
    async def hot(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
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
            await asyncio.sleep(0.003)
        assert slowest < 0.05, slowest  # no read waited on a 0.1 s computation
        periods = 6.0 / 0.6
        assert 2 <= calls <= 2 * periods + 1, calls
        assert len(seen) >= 2  # refreshed values were served
        assert km.stats()["keyspaces"]["hot:*"]["early_refreshes"] >= 1
    finally:
        await km.close()


async def test_without_early_refresh_a_reader_waits_at_expiry() -> None:
    km = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)

    @km.keyspace("cold:*", ttl=0.3)
    async def cold(key: str) -> str:
        await asyncio.sleep(0.1)
        return "v"

    try:
        await km.get("cold:1")
        await asyncio.sleep(0.35)
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


async def test_stale_values_are_served_at_once_while_one_refresh_runs() -> None:
    km = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    calls = 0

    @km.keyspace("news:*", ttl=0.3, stale=5)
    async def news(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return f"v{calls}"

    try:
        assert await km.get("news:1") == "v1"
        await asyncio.sleep(0.35)  # past the TTL, inside the stale window
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        got = await asyncio.gather(*(km.get("news:1") for _ in range(50)))
        assert got == ["v1"] * 50 and loop.time() - t0 < 0.05  # served at once, stale
        await asyncio.sleep(0.3)
        assert await km.get("news:1") == "v2" and calls == 2  # one refresh for all 50 readers
        assert km.stats()["keyspaces"]["news:*"]["stale_hits"] >= 50
    finally:
        await km.close()


async def test_a_failed_refresh_keeps_the_stale_value_until_stale_runs_out() -> None:
    km = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
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
        await asyncio.sleep(0.25)
        assert await km.get("flaky:1") == "good"  # stale; the refresh fails behind it
        await asyncio.sleep(0.1)
        assert await km.get("flaky:1") == "good"  # still the stale value, no error
        stats = km.stats()["keyspaces"]["flaky:*"]
        assert stats["refresh_failures"] == 1 and calls == 2  # backed off: not retried at once
        await asyncio.sleep(0.8)  # past the stale window: a plain miss, whose error is the caller's
        with pytest.raises(HandlerError, match="model server down"):
            await km.get("flaky:1")
    finally:
        await km.close()


def test_stale_needs_a_ttl() -> None:
    km = Keymiss(store="memory", sweep_interval=0)
    with pytest.raises(ConfigError, match="stale needs a ttl"):
        km.keyspace("x:*", stale=10)
