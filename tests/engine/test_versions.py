"""Versioned keyspaces: a value computed under another version is never served, with no mass delete.

Run in library mode over every kind of store: memory and LMDB (the version tag beside the value in
the record) and a shared Redis (the tag beside the value under ``keymiss:codec:<key>``), including
two nodes sharing one Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from keymiss import Keymiss
from keymiss.errors import ConfigError
from keymiss.stores.lmdb import LMDBStore
from keymiss.stores.memory import MemoryStore

from ..conftest import make_store
from ..redis_servers import HAVE_REDIS
from ..support import aeventually

LOCAL_KINDS = ["memory", "lmdb"]


class Versions:
    """A version an application switches at run time (what a model reload does)."""

    def __init__(self, current: str = "v1") -> None:
        self.current = current
        self.asked = 0

    def __call__(self) -> str:
        self.asked += 1
        return self.current


def _app(store: Any, versions: Versions, calls: list[str]) -> Keymiss:
    km = Keymiss(store=store)

    @km.keyspace("answer:*", version=versions)
    def answer(key: str) -> str:
        calls.append(key)
        return f"{key} by {versions.current}"

    return km


@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_a_version_switch_hides_every_old_value_at_once(kind: str, tmp_path: Path) -> None:
    versions, calls = Versions(), []
    km = _app(make_store(kind, tmp_path), versions, calls)
    async with km:
        assert await km.get("answer:1") == "answer:1 by v1"
        assert await km.get("answer:1") == "answer:1 by v1"  # a hit under the same version
        assert calls == ["answer:1"]
        versions.current = "v2"
        assert await km.get("answer:1") == "answer:1 by v2"  # no old value, not even once
        assert await km.get("answer:1") == "answer:1 by v2"
        assert calls == ["answer:1", "answer:1"]
        item = await km.get_item("answer:1")
        assert item is not None and item.value == b"answer:1 by v2"  # the bytes, no metadata inside
        st = km.stats()["keyspaces"]["answer:*"]
        assert st["version"] == "v2" and st["version_misses"] == 1
        assert await km.store.dbsize() == 1  # replaced in place: nothing to delete in bulk
        versions.current = "v1"  # switching back is a switch too
        assert await km.get("answer:1") == "answer:1 by v1"


@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_mget_sees_the_version_too(kind: str, tmp_path: Path) -> None:
    versions, calls = Versions(), []
    km = _app(make_store(kind, tmp_path), versions, calls)
    async with km:
        await km.get_many(["answer:1", "answer:2"])
        versions.current = "v2"
        assert await km.get_many(["answer:1", "answer:2"]) == ["answer:1 by v2", "answer:2 by v2"]
        assert len(calls) == 4


@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_a_clients_write_is_served_under_every_version(kind: str, tmp_path: Path) -> None:
    versions, calls = Versions(), []
    km = _app(make_store(kind, tmp_path), versions, calls)
    async with km:
        await km.set("answer:1", "written by a client")
        versions.current = "v2"
        assert await km.get("answer:1") == "written by a client"
        assert calls == []


async def test_values_computed_before_a_version_was_declared_are_not_served(tmp_path: Path) -> None:
    calls: list[str] = []
    path = str(tmp_path / "db")
    km = Keymiss(store=LMDBStore(path))

    @km.keyspace("answer:*")
    def unversioned(key: str) -> str:
        calls.append(key)
        return "computed before versions"

    async with km:
        await km.get("answer:1")
    versions = Versions("v1")
    km2 = _app(LMDBStore(path), versions, calls)
    async with km2:
        assert await km2.get("answer:1") == "answer:1 by v1"
    km3 = _app(LMDBStore(path), versions, calls)
    async with km3:  # reopened under the same version: the stored value is a hit
        assert await km3.get("answer:1") == "answer:1 by v1"
    assert calls == ["answer:1", "answer:1"]


async def test_a_value_whose_computation_outlived_a_switch_is_not_served() -> None:
    versions = Versions()
    started, release = asyncio.Event(), asyncio.Event()
    km = Keymiss(store=MemoryStore(1 << 20))
    runs: list[str] = []

    @km.keyspace("answer:*", version=versions)
    async def answer(key: str) -> str:
        runs.append(versions.current)
        started.set()
        await release.wait()
        return f"by {runs[-1]}"

    async with km:
        task = asyncio.create_task(km.get("answer:1"))
        await started.wait()
        versions.current = "v2"  # switched while v1's computation runs
        release.set()
        assert await task == "by v2"  # recomputed under v2 before anyone was answered
        assert runs == ["v1", "v2"]
        assert await km.get("answer:1") == "by v2"


async def test_a_failing_version_callable_fails_the_read_with_its_error() -> None:
    state = {"fail": False}

    def version() -> str:
        if state["fail"]:
            raise RuntimeError("model registry unreachable")
        return "v1"

    km = Keymiss(store=MemoryStore(1 << 20))
    km.add_keyspace("answer:*", lambda key: "value", version=version)
    async with km:
        assert await km.get("answer:1") == "value"
        state["fail"] = True
        with pytest.raises(Exception, match="model registry unreachable"):
            await km.get("answer:1")
        assert "version callable failed" in km.stats()["keyspaces"]["answer:*"]["version"]
        state["fail"] = False
        assert await km.get("answer:1") == "value"


@pytest.mark.parametrize("bad", ["", 3, b"v1", "\ud800"])
def test_a_version_is_a_string_or_a_callable(bad: Any) -> None:
    km = Keymiss()
    with pytest.raises(ConfigError, match="version"):
        km.add_keyspace("answer:*", lambda key: key, version=bad)


async def test_a_callable_answering_a_lone_surrogate_is_blamed_not_the_handler() -> None:
    versions = Versions()
    km = _app("memory", versions, [])
    async with km:
        assert await km.get("answer:1") == "answer:1 by v1"
        versions.current = "\ud800"  # not UTF-8: it could be neither stored nor sent
        with pytest.raises(ConfigError, match="version callable returned"):
            await km.get("answer:1")
        versions.current = "v2"
        assert await km.get("answer:1") == "answer:1 by v2"


@pytest.mark.parametrize("bad", [10**400, -(10**400)])
def test_a_window_too_large_for_a_float_is_a_config_error(bad: int) -> None:
    with pytest.raises(ConfigError, match="version_stale must be positive"):
        Keymiss().add_keyspace("x:*", lambda key: key, version="v1", version_stale=bad)
    with pytest.raises(ConfigError, match="ttl must be positive"):
        Keymiss().add_keyspace("y:*", lambda key: key, ttl=bad)


# --- a shared Redis: two nodes ---------------------------------------------------------------------


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
async def test_a_version_switch_hides_old_values_on_two_nodes_sharing_redis(redis_standalone: Any) -> None:
    from keymiss.stores.redis import RedisStore

    url = f"redis://127.0.0.1:{redis_standalone.port}/0"
    plain = redis_sync.Redis(port=redis_standalone.port)
    plain.flushall()
    versions, calls_a, calls_b = Versions(), [], []  # one deployment's version, seen by both
    a, b = _app(RedisStore(url), versions, calls_a), _app(RedisStore(url), versions, calls_b)
    try:
        async with a, b:
            assert await a.get("answer:1") == "answer:1 by v1"
            assert await b.get("answer:1") == "answer:1 by v1"  # a's value, a hit on b
            assert calls_b == []
            assert plain.get("answer:1") == b"answer:1 by v1"  # a plain GET reads the codec's bytes
            versions.current = "v2"
            results = await asyncio.gather(a.get("answer:1"), b.get("answer:1"))
            assert results == ["answer:1 by v2", "answer:1 by v2"]
            assert len(calls_a) + len(calls_b) == 2  # one recomputation across the two nodes
            assert plain.get("answer:1") == b"answer:1 by v2"
            plain.set("answer:1", b"a plain client wrote this")  # a client's write, on no node
            versions.current = "v3"
            assert await a.get("answer:1") == b"a plain client wrote this"  # its bytes, as written
            assert await b.get("answer:1") == b"a plain client wrote this"
    finally:
        plain.flushall()
        plain.close()


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
async def test_a_version_switch_on_a_redis_cluster(redis_cluster: Any) -> None:
    from keymiss.stores.redis import RedisStore

    versions, calls = Versions(), []
    km = _app(RedisStore(redis_cluster.url), versions, calls)
    async with km:
        await km.store.flush()
        keys = [f"answer:{i}" for i in range(6)]  # no hash tags: value and tag on different masters
        assert await km.get_many(keys) == [f"{k} by v1" for k in keys]
        versions.current = "v2"
        assert await km.get_many(keys) == [f"{k} by v2" for k in keys]
        assert await km.get("answer:0") == "answer:0 by v2"
        assert len(calls) == 12
        await km.store.flush()


def _rollout_app(
    store: Any, versions: Versions, calls: list[str], window: float, gate: Any = None
) -> Keymiss:
    km = Keymiss(store=store)

    @km.keyspace("answer:*", version=versions, version_stale=window)
    async def answer(key: str) -> str:
        calls.append(key)
        if gate is not None:
            await gate.wait()
        return f"{key} by {versions.current}"

    return km


@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_version_stale_serves_the_replaced_version_while_one_refresh_runs(
    kind: str, tmp_path: Path
) -> None:
    versions, calls, gate = Versions(), [], asyncio.Event()
    gate.set()
    km = _rollout_app(make_store(kind, tmp_path), versions, calls, window=5.0, gate=gate)
    async with km:
        assert await km.get("answer:1") == "answer:1 by v1"
        gate.clear()  # the refresh under v2 takes as long as the test says
        versions.current = "v2"
        loop = asyncio.get_running_loop()
        started = loop.time()
        reads = await asyncio.gather(*(km.get("answer:1") for _ in range(20)))
        assert loop.time() - started < 0.05  # served at once, from the replaced version
        assert reads == ["answer:1 by v1"] * 20
        await aeventually(lambda: len(calls) >= 2)  # the refresh has begun, held by the gate
        assert calls == ["answer:1", "answer:1"]  # one refresh for the twenty reads
        gate.set()

        async def refreshed() -> bool:
            return await km.get("answer:1") == "answer:1 by v2"

        await aeventually(refreshed, timeout=1)
        assert await km.get("answer:1") == "answer:1 by v2"
        st = km.stats()["keyspaces"]["answer:*"]
        assert st["version_stale_hits"] >= 20 and st["version_stale"] == 5.0


@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_past_version_stale_the_replaced_version_is_a_miss(kind: str, tmp_path: Path) -> None:
    versions, calls = Versions(), []
    km = _rollout_app(make_store(kind, tmp_path), versions, calls, window=0.2)
    async with km:
        await km.get_many(["answer:1", "answer:2"])
        versions.current = "v2"
        assert await km.get("answer:1") == "answer:1 by v1"  # inside the window: served, refreshed
        await asyncio.sleep(0.3)  # the 0.2 s window runs out (on the real clock versions are timed by)
        # answer:2 was never read in the window: past it, a normal miss under v2
        assert await km.get("answer:2") == "answer:2 by v2"
        assert await km.get("answer:1") == "answer:1 by v2"


async def test_without_version_stale_no_replaced_value_is_ever_served() -> None:
    versions, calls = Versions(), []
    km = _app("memory", versions, calls)
    async with km:
        await km.get("answer:1")
        versions.current = "v2"
        assert await km.get("answer:1") == "answer:1 by v2"
        assert km.stats()["keyspaces"]["answer:*"]["version_stale_hits"] == 0


def test_version_stale_needs_a_version() -> None:
    km = Keymiss()
    with pytest.raises(ConfigError, match="version_stale needs a version"):
        km.add_keyspace("x:*", lambda key: key, version_stale=5)
    with pytest.raises(ConfigError, match="version_stale must be positive"):
        km.add_keyspace("y:*", lambda key: key, version="v1", version_stale=-1)


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
async def test_version_stale_on_two_nodes_sharing_redis(redis_standalone: Any) -> None:
    from keymiss.stores.redis import RedisStore

    url = f"redis://127.0.0.1:{redis_standalone.port}/0"
    plain = redis_sync.Redis(port=redis_standalone.port)
    plain.flushall()
    versions, calls_a, calls_b = Versions(), [], []
    a = _rollout_app(RedisStore(url), versions, calls_a, window=5.0)
    b = _rollout_app(RedisStore(url), versions, calls_b, window=5.0)
    try:
        async with a, b:
            assert await a.get("answer:1") == "answer:1 by v1"
            assert await b.get("answer:1") == "answer:1 by v1"
            versions.current = "v2"
            results = await asyncio.gather(a.get("answer:1"), b.get("answer:1"))
            assert results == ["answer:1 by v1", "answer:1 by v1"]  # the rollout has no cliff
            await aeventually(lambda: plain.get("answer:1") == b"answer:1 by v2", timeout=2)
            assert plain.get("answer:1") == b"answer:1 by v2"
            assert await a.get("answer:1") == "answer:1 by v2"
            assert await b.get("answer:1") == "answer:1 by v2"
            assert len(calls_a) + len(calls_b) == 2  # one refresh across the two nodes
    finally:
        plain.flushall()
        plain.close()


async def test_only_the_version_just_replaced_is_served_in_version_stale() -> None:
    versions, calls = Versions(), []
    km = _rollout_app("memory", versions, calls, window=5.0)
    async with km:
        await km.get("answer:1")
        versions.current = "v2"
        await km.get("answer:2")  # the switch is seen; answer:2 computed under v2
        versions.current = "v3"  # a second switch before answer:1 was read again
        assert await km.get("answer:1") == "answer:1 by v3"  # v1 is two versions back: a miss
        assert await km.get("answer:2") == "answer:2 by v2"  # v2, just replaced: served, refreshed


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
@pytest.mark.parametrize("many", [False, True], ids=["get", "get_many"])
async def test_a_version_switch_takes_effect_through_the_near_cache(
    redis_standalone: Any, many: bool
) -> None:
    """The near cache's copies used to drop the version tag (read as a client's write, served under
    every version), and the hidden value stayed in Redis, where the lease handed it back as if
    another node had computed it: the handler never ran again."""
    plain = redis_sync.Redis(port=redis_standalone.port)
    plain.flushall()
    versions, calls = Versions(), []
    km = _app(f"redis://127.0.0.1:{redis_standalone.port}/0?near_cache=4mb", versions, calls)

    async def read(key: str) -> Any:
        return (await km.get_many([key]))[0] if many else await km.get(key)

    try:
        async with km:
            for _ in range(3):  # computed; read from Redis (and copied near); a near hit
                assert await read("answer:1") == "answer:1 by v1"
            assert calls == ["answer:1"] and km.store.info().extra["near_hits"] >= 1
            versions.current = "v2"
            for _ in range(3):
                assert await read("answer:1") == "answer:1 by v2"
            assert calls == ["answer:1", "answer:1"]
            assert plain.get("answer:1") == b"answer:1 by v2"
            assert km.stats()["keyspaces"]["answer:*"]["version_misses"] == 1
    finally:
        plain.flushall()
        plain.close()


@pytest.mark.parametrize("kind", LOCAL_KINDS)
async def test_a_keyspace_with_a_stale_window_keeps_its_values_versions(kind: str, tmp_path: Path) -> None:
    """Values kept for a stale window were once stored without their version tag, so they read as
    a client's writes: served under every version, never recomputed after a switch."""
    versions, calls = Versions(), []
    km = Keymiss(store=make_store(kind, tmp_path))

    @km.keyspace("answer:*", version=versions, ttl=60, stale=60)
    def answer(key: str) -> str:
        calls.append(key)
        return f"{key} by {versions.current}"

    async with km:
        assert await km.get("answer:1") == "answer:1 by v1"
        versions.current = "v2"
        assert await km.get("answer:1") == "answer:1 by v2"
        assert calls == ["answer:1", "answer:1"]
