"""The memory store's byte budget: never exceeded, honestly accounted, evicting least recently used."""

from __future__ import annotations

import random
import sys
import tracemalloc

import pytest

from keymiss import ConfigError, Keymiss, MemoryStore, parse_size
from keymiss.stores import open_store
from keymiss.stores.eviction import Policy
from keymiss.stores.memory import ENTRY_OVERHEAD


async def test_budget_never_exceeded_under_10x_random_inserts() -> None:
    budget = 2 * 1024**2
    store = MemoryStore(budget)
    rng = random.Random(7)
    written = 0
    i = 0
    while written < 10 * budget:
        size = int(rng.lognormvariate(8, 1.5)) % 300_000
        await store.set(f"key:{i}", b"x" * size)
        written += size
        i += 1
        assert store.used_bytes <= budget
    assert store.evictions > 0
    assert store.info().keys > 0
    # the accounting matches a recount of what is really held
    recount = sum(len(k) + len(v.value) + ENTRY_OVERHEAD for k, v in store._data.items())
    assert recount == store.used_bytes


async def test_lru_evicts_least_recently_used() -> None:
    store = MemoryStore(4 * (ENTRY_OVERHEAD + 2 + 100), eviction="lru")
    for k in "abcd":
        await store.set(f"{k}:", b"v" * 100)
    assert store.get_now("a:") is not None  # a is now the most recent
    await store.set("e:", b"v" * 100)
    assert store.get_now("b:") is None
    assert store.get_now("a:") is not None


async def test_overwrite_adjusts_accounting() -> None:
    store = MemoryStore(1024**2, eviction="lru")
    await store.set("k", b"x" * 1000)
    await store.set("k", b"x" * 10)
    assert store.used_bytes == 1 + 10 + ENTRY_OVERHEAD
    await store.delete(["k"])
    assert store.used_bytes == 0


async def test_too_big_value_is_refused_and_old_value_kept() -> None:
    store = MemoryStore(5000)
    await store.set("k", b"small")
    assert not await store.set("k", b"x" * 10_000)
    item = store.get_now("k")  # as Redis refuses a write over maxmemory: the old value stays
    assert item is not None and item.value == b"small"


def test_overhead_estimate_is_honest() -> None:
    """ENTRY_OVERHEAD must not undercount what CPython really spends per entry by much."""
    import asyncio

    store = MemoryStore(1024**3)
    keys = [f"key:{i:08d}" for i in range(20_000)]
    values = [b"v" * 64 for _ in keys]
    tracemalloc.start()
    before = tracemalloc.take_snapshot()

    async def fill() -> None:
        for k, v in zip(keys, values, strict=True):
            await store.set(k, v)

    asyncio.run(fill())
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    spent = sum(s.size_diff for s in after.compare_to(before, "filename"))
    accounted = store.used_bytes - sum(len(k) + 64 for k in keys)
    # the key and value objects existed before the fill; add their headers, which the store keeps alive
    headers = sys.getsizeof(keys[0]) - len(keys[0]) + sys.getsizeof(values[0]) - len(values[0])
    per_entry_real = spent / len(keys) + headers
    per_entry_accounted = accounted / len(keys)
    assert 0.9 * per_entry_real <= per_entry_accounted <= 1.3 * per_entry_real, (
        per_entry_real,
        per_entry_accounted,
    )


async def test_custom_policy_is_one_small_class() -> None:
    class NewestFirst(Policy):
        name = "mru"

        def __init__(self) -> None:
            self.order: list[str] = []

        def insert(self, key: str, size: int, cost: float = 0.0) -> None:
            self.order.append(key)

        def remove(self, key: str) -> None:
            self.order.remove(key)

        def victim(self) -> str:
            return self.order[-1]

    store = MemoryStore(3 * (ENTRY_OVERHEAD + 1 + 10), eviction=NewestFirst())
    for k in "abc":
        await store.set(k, b"x" * 10)
    # victim() is asked with the newcomer already counted, so "newest first" turns the newcomer away
    assert not await store.set("d", b"x" * 10)
    assert store.get_now("d") is None and store.get_now("c") is not None


def test_sizes_parse_like_redis() -> None:
    assert parse_size("256MB") == 256 * 1024**2
    assert parse_size("1m") == 1_000_000
    assert parse_size("1.5gb") == int(1.5 * 1024**3)
    assert parse_size(4096) == 4096
    assert parse_size("auto") > 1024**2
    for bad in ("lots", "-1mb", "0", "12 parsecs", ""):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_store_urls() -> None:
    assert isinstance(open_store("memory", max_memory="1MB"), MemoryStore)
    assert open_store("memory?max_memory=2MB").info().max_bytes == 2 * 1024**2
    for bad in ("memcached://x", "lmdb:", "memory?colour=blue", "lmdb:/tmp/x?durable=maybe"):
        with pytest.raises(ConfigError):
            open_store(bad)
    with pytest.raises(ConfigError, match="eviction"):
        open_store("memory", eviction="random")


async def test_default_keymiss_uses_auto_budget() -> None:
    km = Keymiss()
    info = km.store.info()
    assert info.store == "memory" and info.max_bytes >= 1024**2
    await km.close()


async def test_keymiss_records_are_never_evicted() -> None:
    """QA contexts and fingerprints (``keymiss:*``) count against the budget but are never victims."""
    for policy in ("lru", "tinylfu", "tinylfu-cost", "worth"):
        budget = 20 * (ENTRY_OVERHEAD + 110)
        store = MemoryStore(budget, eviction=policy)
        assert await store.set("keymiss:ctx:doc:{t}:1", b"c" * 100)
        for i in range(200):
            await store.set(f"answer:{i:03d}", b"a" * 100)
            assert store.get_now("keymiss:ctx:doc:{t}:1") is not None
            assert store.used_bytes <= budget
        assert store.info().extra["pinned_bytes"] > 0
        # a budget full of pinned records refuses what it cannot make room for, instead of failing
        tiny = MemoryStore(2 * (ENTRY_OVERHEAD + 120), eviction=policy)
        assert await tiny.set("keymiss:a", b"x" * 100)
        assert await tiny.set("keymiss:b", b"x" * 100)
        assert not await tiny.set("plain", b"x" * 100)
        assert tiny.get_now("keymiss:a") is not None and tiny.get_now("keymiss:b") is not None


@pytest.mark.parametrize("policy", ["worth", "tinylfu", "tinylfu-cost", "tinylfu-iv", "lru"])
def test_a_refused_write_leaves_the_old_value_where_it_was(policy: str) -> None:
    """The store used to drop the old value before finding no room for the new one."""
    s = MemoryStore(10_000, eviction=policy)
    assert s.set_now("keymiss:a", b"x" * 4000) and s.set_now("keymiss:b", b"x" * 4000)
    assert not s.set_now("keymiss:a", b"y" * 5500)  # no room beside the other pinned record
    pinned = s.get_now("keymiss:a")
    assert pinned is not None and pinned.value == b"x" * 4000
    assert s.set_now("k", b"v" * 100, ttl=60)
    assert not s.set_now("k", b"w" * 2000)  # only pinned records could make room
    kept = s.get_now("k")
    assert kept is not None and kept.value == b"v" * 100 and s.pttl_now("k") > 0
    assert s.used_bytes <= s.max_bytes
