"""One contract, every store: what the engine and the server rely on, checked against each backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from keymiss.stores.base import PTTL_MISSING, PTTL_PERSISTENT, Write

from ..conftest import STORE_KINDS, FakeClock, make_store

LocalStore = Any  # the suite runs against every store; shared (Redis) ones where noted


def scale(store: Any) -> float:
    """Seconds per test-second: local stores run on a fake clock, Redis on the real one, faster."""
    return 1.0 if store.local else 0.05


async def advance(store: Any, clock: FakeClock, seconds: float) -> None:
    if store.local:
        clock.advance(seconds)
    else:
        await asyncio.sleep(seconds * scale(store))


async def test_missing_key_is_none(store: LocalStore) -> None:
    assert await store.get("nope") is None
    if store.local:
        assert store.get_now("nope") is None


async def test_set_get_round_trip_keeps_bytes_and_codec(store: LocalStore) -> None:
    assert await store.set("k", b"\x00\xffvalue", codec=2)
    item = await store.get("k")
    assert item is not None
    assert item.value == b"\x00\xffvalue"
    assert item.codec == 2  # kept beside the value, never inside it
    assert item.expires_at is None


async def test_overwrite_replaces_value(store: LocalStore) -> None:
    await store.set("k", b"one")
    await store.set("k", b"two")
    item = await store.get("k")
    assert item is not None and item.value == b"two"
    assert await store.dbsize() == 1


async def test_binary_and_unicode_keys(store: LocalStore) -> None:
    keys = ["é☃", "a b\nc", "\udcff-surrogate-escaped", ""]
    for i, key in enumerate(keys):
        await store.set(key, str(i).encode())
    for i, key in enumerate(keys):
        item = await store.get(key)
        assert item is not None and item.value == str(i).encode()


async def test_empty_value_is_not_a_miss(store: LocalStore) -> None:
    await store.set("k", b"")
    item = await store.get("k")
    assert item is not None and item.value == b""


async def test_get_many_preserves_order_and_misses(store: LocalStore) -> None:
    await store.set("a", b"1")
    await store.set("c", b"3")
    items = await store.get_many(["a", "b", "c", "a"])
    assert [None if i is None else i.value for i in items] == [b"1", None, b"3", b"1"]


async def test_set_many_writes_all(store: LocalStore) -> None:
    result = await store.set_many([Write(f"k{i}", f"v{i}".encode(), 1, None) for i in range(50)])
    assert result == [True] * 50
    # a shared store keeps each tagged value's codec tag beside it, as a key of its own
    assert await store.dbsize() == (50 if store.local else 100)
    item = await store.get("k49")
    assert item is not None and item.value == b"v49" and item.codec == 1


async def test_delete_and_exists_count_like_redis(store: LocalStore) -> None:
    await store.set("a", b"1")
    await store.set("b", b"2")
    assert await store.exists(["a", "a", "b", "zz"]) == 3
    assert await store.delete(["a", "zz"]) == 1
    assert await store.exists(["a"]) == 0
    assert await store.get("a") is None


async def test_nx_and_xx(store: LocalStore) -> None:
    assert not await store.set("k", b"1", xx=True)
    assert await store.set("k", b"1", nx=True)
    assert not await store.set("k", b"2", nx=True)
    assert await store.set("k", b"3", xx=True)
    item = await store.get("k")
    assert item is not None and item.value == b"3"


async def test_ttl_expiry(store: LocalStore, clock: FakeClock) -> None:
    f = scale(store)
    await store.set("k", b"v", ttl=10 * f)
    assert 9_000 * f <= await store.pttl("k") <= 10_000 * f
    await advance(store, clock, 8)
    assert await store.get("k") is not None
    await advance(store, clock, 2.5)
    assert await store.get("k") is None
    assert await store.pttl("k") == PTTL_MISSING
    assert await store.exists(["k"]) == 0


async def test_expired_key_is_free_for_nx(store: LocalStore, clock: FakeClock) -> None:
    await store.set("k", b"old", ttl=1 * scale(store))
    await advance(store, clock, 2)
    assert await store.set("k", b"new", nx=True)


async def test_pttl_codes(store: LocalStore) -> None:
    assert await store.pttl("none") == PTTL_MISSING
    await store.set("k", b"v")
    assert await store.pttl("k") == PTTL_PERSISTENT


async def test_expire_and_persist(store: LocalStore, clock: FakeClock) -> None:
    assert not await store.expire("none", 5)
    await store.set("k", b"v")
    assert await store.expire("k", 5)
    assert 4_000 < await store.pttl("k") <= 5_000
    assert await store.expire("k", None)
    assert await store.pttl("k") == PTTL_PERSISTENT
    clock.advance(10)
    assert await store.get("k") is not None
    assert await store.expire("k", 0)  # a non-positive TTL deletes, as in Redis
    assert await store.get("k") is None


async def test_keep_ttl(store: LocalStore) -> None:
    await store.set("k", b"v", ttl=100)
    await store.set("k", b"w", keep_ttl=True)
    assert await store.pttl("k") > 0
    await store.set("k", b"x")
    assert await store.pttl("k") == PTTL_PERSISTENT


async def test_sweep_purges_expired(store: LocalStore, clock: FakeClock) -> None:
    if not store.local:
        return  # Redis expires keys itself; the sweep only refreshes its numbers
    for i in range(30):
        await store.set(f"t{i}", b"v", ttl=1)
    await store.set("forever", b"v")
    clock.advance(2)
    purged = 0
    for _ in range(10):
        purged += await store.sweep(limit=10)
    assert purged == 30
    assert await store.dbsize() == 1


async def test_scan_returns_every_key_once_with_match(store: LocalStore) -> None:
    for i in range(57):
        await store.set(f"user:{i}", b"v")
    for i in range(13):
        await store.set(f"other:{i}", b"v")
    seen: list[str] = []
    cursor, rounds = 0, 0
    while True:
        cursor, keys = await store.scan(cursor, "user:*", 10)
        seen.extend(keys)
        rounds += 1
        if cursor == 0 or rounds > 100:
            break
    assert sorted(seen) == sorted(f"user:{i}" for i in range(57))


async def test_scan_keeps_keys_present_throughout_despite_deletes(store: LocalStore) -> None:
    for i in range(40):
        await store.set(f"k{i:02d}", b"v")
    cursor, first = await store.scan(0, None, 10)
    await store.delete([f"k{i:02d}" for i in range(30, 40)])
    seen = list(first)
    while cursor:
        cursor, keys = await store.scan(cursor, None, 10)
        seen.extend(keys)
    assert set(f"k{i:02d}" for i in range(30)) <= set(seen)
    assert not set(seen) & {f"k{i:02d}" for i in range(31, 40)} - set(first)


async def test_flush(store: LocalStore) -> None:
    await store.set("a", b"1")
    await store.flush()
    assert await store.dbsize() == 0
    assert await store.get("a") is None


async def test_info_reports_budget_numbers(store: LocalStore) -> None:
    await store.set("a", b"1" * 100)
    await store.sweep()  # shared stores refresh their numbers here
    info = store.info()
    assert info.keys == 1
    assert info.used_bytes > 0
    assert info.used_bytes <= info.max_bytes or not store.local  # Redis: maxmemory 0 = unbounded
    assert info.as_dict()["keys"] == 1


@pytest.mark.parametrize("size", [0, 1, 4096, 1_000_000])
async def test_value_sizes(store: LocalStore, size: int) -> None:
    value = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    await store.set("k", value)
    item = await store.get("k")
    assert item is not None and item.value == value


@pytest.fixture(params=[k for k in STORE_KINDS if not k.startswith("redis")])
async def local_store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[LocalStore]:
    s = make_store(request.param, tmp_path, clock)
    yield s
    await s.close()


async def _scan_all(store: LocalStore, between: Any = None, count: int = 10) -> list[str]:
    seen: list[str] = []
    cursor, rounds = 0, 0
    while True:
        cursor, keys = await store.scan(cursor, None, count)
        seen.extend(keys)
        rounds += 1
        assert rounds < 100_000
        if cursor == 0:
            return seen
        if between is not None:
            await between(rounds)


async def test_a_scan_survives_any_number_of_other_scans(local_store: LocalStore) -> None:
    """Cursors are stateless: 1,100 scans started (and abandoned) between two steps of one scan
    do not end it early (they did, past 1,024 remembered cursors)."""
    store = local_store
    for i in range(100):
        await store.set(f"k{i}", b"v")

    async def others(round_: int) -> None:
        if round_ <= 2:
            for _ in range(1100):
                await store.scan(0, None, 1)

    assert sorted(await _scan_all(store, others)) == sorted(f"k{i}" for i in range(100))


async def test_a_scan_returns_every_key_present_throughout_while_the_store_grows_and_shrinks(
    local_store: LocalStore,
) -> None:
    store = local_store
    keep = [f"keep:{i}" for i in range(300)]
    for k in keep:
        await store.set(k, b"v")
    churn = [f"churn:{i}" for i in range(3000)]

    async def grow_then_shrink(round_: int) -> None:
        if round_ < 10:  # the index doubles several times under the scan
            await store.set_many([Write(k, b"v") for k in churn[round_ * 300 : (round_ + 1) * 300]])
        elif round_ < 20:  # and halves again
            await store.delete(churn[(round_ - 10) * 300 : (round_ - 9) * 300])

    seen = await _scan_all(store, grow_then_shrink, count=5)
    assert set(keep) <= set(seen)


async def test_keymiss_records_are_not_listed_counted_or_flushed(local_store: LocalStore) -> None:
    store = local_store
    await store.set("keymiss:ctx:doc", b"tokens")
    await store.set("user:1", b"v")
    assert await store.dbsize() == 1
    assert await _scan_all(store) == ["user:1"]
    assert await store.flush_data() == 1
    assert await store.dbsize() == 0 and await store.get("user:1") is None
    assert (await store.get("keymiss:ctx:doc")).value == b"tokens"  # type: ignore[union-attr]
    assert store.matching_keys("keymiss:*") == ["keymiss:ctx:doc"]  # operators still reach it
