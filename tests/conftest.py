"""Shared fixtures: a controllable clock and every store kind, in temporary directories."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keymiss.stores.base import LocalStore
from keymiss.stores.lmdb import LMDBStore
from keymiss.stores.memory import MemoryStore

from .redis_servers import HAVE_REDIS, RedisCluster3, RedisProcess


class FakeClock:
    """A wall clock the test moves by hand, so TTL tests neither sleep nor flake."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StoreFactory = Callable[..., LocalStore]

STORE_KINDS = [
    "memory",
    "memory-lru",
    "memory-tinylfu-cost",
    "lmdb",
    "lmdb-nosync",
    "redis",
    "redis-cluster",
    "redis-near",
]


def make_store(kind: str, tmp_path: Path, clock: Callable[[], float] = time.time) -> LocalStore:
    if kind.startswith("memory"):
        policy = kind.partition("-")[2] or "tinylfu"
        return MemoryStore(64 * 1024**2, clock=clock, eviction=policy)
    if kind == "lmdb":
        return LMDBStore(str(tmp_path / "db"), clock=clock, map_size=1024**2)
    if kind == "lmdb-nosync":
        return LMDBStore(str(tmp_path / "db"), clock=clock, durable=False, map_size=1024**2)
    raise ValueError(kind)


@pytest.fixture(scope="session")
def redis_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    if not HAVE_REDIS:
        pytest.skip("redis-server is not installed")
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster3]:
    if not HAVE_REDIS:
        pytest.skip("redis-server is not installed")
    cluster = RedisCluster3(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Any]:
    if request.param.startswith("redis"):
        from keymiss.stores.redis import RedisStore

        if request.param in ("redis", "redis-near"):
            server = request.getfixturevalue("redis_standalone")
            shared: Any = RedisStore(f"redis://127.0.0.1:{server.port}/0")
        else:
            shared = RedisStore(request.getfixturevalue("redis_cluster").url)
        if request.param == "redis-near":  # the near cache delegates everything it does not hold
            from keymiss.stores.near import NearCacheStore

            shared = NearCacheStore(shared, max_bytes=4 * 1024**2, ttl=5)
        await shared.flush()
        yield shared
        await shared.flush()
        await shared.close()
        return
    s = make_store(request.param, tmp_path, clock)
    yield s
    await s.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Make captured output valid UTF-8 (a lone surrogate becomes an escape).

    Some tests log handler messages that carry lone surrogates on purpose; the parallel runner
    sends reports between processes as UTF-8 and would otherwise crash on them.
    """
    outcome = yield
    report = outcome.get_result()
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]
