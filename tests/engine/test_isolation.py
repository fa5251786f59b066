"""Keyspaces are isolated from each other, counts stay honest, failures are logged and kept small.

Hung handlers here wait on an ``Event`` the test sets at the end (bounded by a timeout), so no
thread outlives its test.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
import traceback
from collections.abc import AsyncIterator

import pytest

from keymiss import BusyError, ComputeTimeoutError, HandlerError, Keymiss, KeymissError
from keymiss.engine.compute import Computed

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


async def test_failures_are_logged_once_per_window(km: Keymiss, caplog: pytest.LogCaptureFixture) -> None:
    @km.keyspace("fail:*")
    def fail(key: str) -> str:
        raise ValueError("model exploded")

    never = asyncio.Event()

    @km.keyspace("late:*", timeout=0.05)
    async def late(key: str) -> str:
        await never.wait()  # never set: it hangs until its timeout
        return "never"

    caplog.set_level(logging.ERROR, logger="keymiss.handler")
    for i in range(20):
        with pytest.raises(HandlerError):
            await km.get(f"fail:{i}")
    records = [r for r in caplog.records if r.name == "keymiss.handler"]
    assert len(records) == 1
    (first,) = records
    assert "fail:*" in first.getMessage() and "fail:0" in first.getMessage()
    assert first.exc_info is not None and "model exploded" in caplog.text  # with its traceback
    km.engine._lanes["fail:*"].failures.window = 0  # the window is over, for the test
    with pytest.raises(HandlerError):
        await km.get("fail:again")
    records = [r for r in caplog.records if r.name == "keymiss.handler"]
    assert len(records) == 2 and "19 similar failure(s)" in records[1].getMessage()
    with pytest.raises(ComputeTimeoutError):
        await km.get("late:1")  # timeouts are logged too, on their own keyspace's window
    assert any("did not finish" in r.getMessage() and "late:*" in r.getMessage() for r in caplog.records)


async def test_long_keys_are_truncated_in_the_log(km: Keymiss, caplog: pytest.LogCaptureFixture) -> None:
    @km.keyspace("fail:*")
    def fail(key: str) -> str:
        raise ValueError("no")

    caplog.set_level(logging.ERROR, logger="keymiss.handler")
    with pytest.raises(HandlerError):
        await km.get("fail:" + "x" * 100_000)
    assert len(caplog.records[-1].getMessage()) < 1000


async def test_remembered_errors_are_raised_fresh_and_stay_small(km: Keymiss) -> None:
    calls = 0

    @km.keyspace("bad:*", error_ttl=60)
    def bad(key: str) -> str:
        nonlocal calls
        calls += 1
        raise ValueError("broken input")

    seen: list[KeymissError] = []
    depths: list[int] = []
    for _ in range(200):
        try:
            await km.get("bad:1")
        except HandlerError as exc:
            seen.append(exc)
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
    assert calls == 1 and len(seen) == 200
    assert len({id(e) for e in seen}) == 200  # a new exception each time
    assert max(depths[1:]) == min(depths[1:])  # its traceback does not grow with every raise
    assert all(str(e) == str(seen[0]) and e.keyspace == "bad:*" for e in seen)


async def test_clients_see_only_the_type_when_asked(km: Keymiss) -> None:
    @km.keyspace("leak:*")
    def leak(key: str) -> str:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    @km.keyspace("quiet:*", error_detail="type")
    def quiet(key: str) -> str:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    @km.keyspace("quietbatch:*", error_detail="type", batch_size=4, batch_wait_ms=1)
    def quiet_batch(keys: list[str]) -> list[object]:
        return [RuntimeError("password=hunter2") for _ in keys]

    with pytest.raises(HandlerError, match="RuntimeError: password=hunter2"):
        await km.get("leak:1")
    for key in ("quiet:1", "quietbatch:1"):
        with pytest.raises(HandlerError) as info:
            await km.get(key)
        assert "hunter2" not in str(info.value) and "RuntimeError" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original stays for the log


async def test_the_engine_wide_default_hides_messages(release: threading.Event) -> None:
    km = Keymiss(sweep_interval=0, error_detail="type")

    @km.keyspace("x:*")
    def x(key: str) -> str:
        raise KeyError("/etc/shadow")

    with pytest.raises(HandlerError) as info:
        await km.get("x:1")
    assert "shadow" not in str(info.value)
    await km.close()


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


async def test_unknown_keyspace_options_are_config_errors() -> None:
    from keymiss import ConfigError

    km = Keymiss(sweep_interval=0)
    with pytest.raises(ConfigError, match="unknown keyspace option"):
        km.keyspace("x:*", timout=3)
    for bad in ({"concurrency": 0}, {"queue": -1}, {"error_detail": "all"}, {"codec": "pickle"}):
        with pytest.raises(ConfigError):
            km.keyspace("x:*", **bad)


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, asyncio.CancelledError])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_handler_raising_a_base_exception_fails_only_its_key(
    km: Keymiss, kind: type[BaseException], sync: bool
) -> None:
    if sync:

        def handler(key: str) -> str:
            raise kind("from the handler")
    else:

        async def handler(key: str) -> str:  # type: ignore[misc]
            raise kind("from the handler")

    km.add_keyspace("boom:*", handler)

    @km.keyspace("ok:*")
    def ok(key: str) -> str:
        return "fine"

    with pytest.raises(HandlerError, match=kind.__name__):
        await km.get("boom:1")
    assert await km.get("ok:1") == "fine"
    assert km.stats()["keyspaces"]["boom:*"]["errors"] == 1


async def test_type_only_errors_hide_a_handlers_own_keymiss_error(km: Keymiss) -> None:
    from keymiss import StoreError

    @km.keyspace("tkm:*", error_detail="type")
    def tkm(key: str) -> str:
        raise StoreError("db password=hunter2")

    with pytest.raises(KeymissError) as info:
        await km.get("tkm:1")
    assert "hunter2" not in str(info.value) and "StoreError" in str(info.value)


async def test_remembered_errors_of_distinct_keys_are_bounded(km: Keymiss) -> None:
    @km.keyspace("bad:*", error_ttl=0.05)
    def bad(key: str) -> str:
        raise ValueError("no")

    for i in range(3000):
        with pytest.raises(HandlerError):
            await km.get(f"bad:{i}")
    await asyncio.sleep(0.06)
    for i in range(3000, 3100):  # new failures push out the expired ones
        with pytest.raises(HandlerError):
            await km.get(f"bad:{i}")
    remembered = len(km.engine._errors)
    assert remembered < 3000 - 64 * 10, remembered
    await asyncio.sleep(0.06)
    assert km.engine.sweep() > 0 and not km.engine._errors  # the periodic sweep takes the rest


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
    assert await km.forget("*") == 1  # "other"; keymiss's own records stay
    assert await km.get("keymiss:ctx:doc{t}") == "a context record"
    assert await km.forget("keymiss:*") == 1  # unless asked for by name
