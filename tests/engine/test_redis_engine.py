"""Several keymiss engines sharing one Redis: one computation per key across all of them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis as redis_sync

from keymiss import Keymiss, StoreError
from keymiss.errors import KeymissError
from keymiss.stores import Write
from keymiss.stores.near import INVALIDATE_CHANNEL
from keymiss.stores.redis import RedisStore

from ..support import Gate, aeventually


def make_nodes(
    url: str, n: int, compute: float, calls: list[str], gate: Gate | None = None, **store: Any
) -> list[Keymiss]:
    """``n`` engines on one Redis; their handler takes ``compute`` seconds, or waits on ``gate``."""
    nodes = []
    for _ in range(n):
        km = Keymiss(store=RedisStore(url, **store), sweep_interval=0)

        @km.keyspace("slow:*")
        async def slow(key: str) -> str:
            calls.append(key)
            if gate is not None:
                await gate.hold(key)
            elif compute:
                await asyncio.sleep(compute)  # a computation that lasts: what waiters wait out
            return f"value of {key}"

        nodes.append(km)
    return nodes


@pytest.fixture(params=["standalone", "cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "standalone":
        return f"redis://127.0.0.1:{request.getfixturevalue('redis_standalone').port}/0"
    return str(request.getfixturevalue("redis_cluster").url)


async def test_200_gets_across_two_nodes_compute_once(redis_url: str) -> None:
    calls: list[str] = []
    gate = Gate()
    a, b = make_nodes(redis_url, 2, 0, calls, gate)
    key = f"slow:{time.monotonic_ns()}"
    try:
        t0 = time.perf_counter()
        gets = asyncio.gather(*((a if i % 2 else b).get(key) for i in range(200)))
        await gate.wait_started()  # one node holds the lease and computes; the others wait
        gate.open()
        results = await gets
        assert time.perf_counter() - t0 < 5  # waiters are woken by the completion message
        assert results == [f"value of {key}"] * 200
        assert calls == [key]
        # the value sits in Redis under the very key, as plain bytes any client can read
        assert (await a.store.get(key)).value == f"value of {key}".encode()  # type: ignore[union-attr]
        assert await a.store.pttl(f"keymiss:lease:{key}") == -2  # the lease was released
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_lease_of_a_dead_holder_expires_and_another_node_computes(redis_url: str) -> None:
    calls: list[str] = []
    (b,) = make_nodes(redis_url + "?lease_ms=800" if "?" not in redis_url else redis_url, 1, 0, calls)
    store: Any = b.store
    key = f"slow:orphan{time.monotonic_ns()}"
    # a node took the lease, then died without a word
    assert await store.client.set(f"keymiss:lease:{key}".encode(), b"dead-node", nx=True, px=800)
    t0 = time.perf_counter()
    assert await b.get(key) == f"value of {key}"
    elapsed = time.perf_counter() - t0
    assert 0.5 < elapsed < 0.8 + 0.1 + 1.0  # waited out the lease, then computed once
    assert calls == [key]
    await b.close()


async def test_completion_message_wakes_waiters_before_lease_expiry(redis_url: str) -> None:
    calls: list[str] = []
    a, b = make_nodes(redis_url, 2, 0.2, calls)
    key = f"slow:wake{time.monotonic_ns()}"
    try:
        first = asyncio.create_task(a.get(key))
        await aeventually(lambda: calls == [key])  # a holds the lease and computes
        t0 = time.perf_counter()
        assert await b.get(key) == f"value of {key}"
        assert time.perf_counter() - t0 < 1.0  # woken by pub/sub, not by the 30 s lease
        assert await first == f"value of {key}"
        assert calls == [key]
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_redis_down_fails_fast_then_recovers(redis_standalone: Any) -> None:
    import signal

    calls: list[str] = []
    url = f"redis://127.0.0.1:{redis_standalone.port}/0?timeout=0.5"
    (km,) = make_nodes(url, 1, 0.0, calls, reply_timeout=0.5)
    assert await km.get("slow:before") == "value of slow:before"
    redis_standalone.signal(signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        # a stopped Redis takes the command and never answers: said as such, not "unavailable"
        with pytest.raises(KeymissError, match=r"did not answer within 0\.5s"):
            await km.get("slow:during")
        assert time.perf_counter() - t0 < 5
    finally:
        redis_standalone.signal(signal.SIGCONT)
    got = await aeventually(  # reconnects by itself
        lambda: km.get("slow:after"),
        ignore=(StoreError,),
        timeout=10,
        interval=0.2,
        message="recovery after Redis came back",
    )
    assert got == "value of slow:after"
    await km.close()


async def test_shared_store_values_decode_to_the_handlers_type(redis_url: str) -> None:
    km = Keymiss(store=RedisStore(redis_url), sweep_interval=0)

    @km.keyspace("doc:*")
    def doc(key: str) -> dict[str, str]:
        return {"key": key}

    key = f"doc:{time.monotonic_ns()}"
    assert await km.get(key) == {"key": key}
    assert await km.get(key) == {"key": key}  # a hit from Redis, decoded as JSON again
    await km.close()


async def test_near_cache_serves_hot_hits_and_is_invalidated_by_other_nodes(redis_url: str) -> None:
    from keymiss.stores import open_store
    from keymiss.stores.near import NearCacheStore

    url = redis_url + ("&" if "?" in redis_url else "?") + "near_cache=4MB&near_ttl=30"
    a = Keymiss(store=open_store(url), sweep_interval=0)
    b = Keymiss(store=open_store(url), sweep_interval=0)
    assert isinstance(a.store, NearCacheStore)
    key = f"near:{time.monotonic_ns()}"
    try:
        await b.set(key, "v1")
        assert await a.get(key) == "v1"  # from Redis (codec tag and all), now also held near
        for _ in range(10):
            assert await a.get(key) == "v1"
        assert a.store.near_hits >= 10  # type: ignore[attr-defined]
        await b.set(key, "v2")  # another node writes: a's copy must go

        async def replaced() -> bool:
            return await a.get(key) == "v2"

        await aeventually(
            replaced,
            timeout=1,
            interval=0.02,
            message="a near copy replaced by another node dropped",
        )
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_a_cold_burst_of_misses_opens_one_completion_listener(redis_url: str) -> None:
    """A fresh node whose first traffic is 100 concurrent misses subscribes once, not 100 times,
    and keeps working afterwards (it used to exhaust its pool with SUBSCRIBE connections)."""
    calls: list[str] = []
    (node,) = make_nodes(redis_url, 1, 0.05, calls)
    tag = time.monotonic_ns()
    try:
        keys = [f"slow:cold{tag}:{i}" for i in range(100)]
        values = await asyncio.gather(*(node.get(k) for k in keys))
        assert values == [f"value of {k}" for k in keys] and len(calls) == 100
        store: Any = node.store
        clients = await store.call(store.client.client_list)
        if isinstance(clients, dict):  # cluster: per node
            clients = [c for per in clients.values() for c in per]
        subscribers = [c for c in clients if "keymiss:done" in str(c) or int(c.get("sub", 0)) > 0]
        assert len(subscribers) <= 1, subscribers
        assert await node.set(f"after:{tag}", "v") and await node.get(f"after:{tag}") == "v"
    finally:
        await node.close()


async def test_codec_tags_never_misdecode_a_value_rewritten_behind_keymiss(redis_url: str) -> None:
    km = Keymiss(store=RedisStore(redis_url), sweep_interval=0)
    calls: list[str] = []

    @km.keyspace("doc:*")
    def doc(key: str) -> dict[str, str]:
        calls.append(key)
        return {"key": key}

    store: Any = km.store
    tag = time.monotonic_ns()
    key = f"doc:{tag}"
    try:
        assert await km.get(key) == {"key": key}
        assert await store.client.get(key.encode()) == f'{{"key":"{key}"}}'.encode()  # plain bytes
        await store.client.set(key.encode(), b"oops")  # a plain client rewrites it; the tag stays
        assert await km.get(key) == b"oops"  # the stale tag is recognised: bytes, no error
        await store.client.delete(key.encode())
        await store.client.set(key.encode(), b'{"other": 1}')
        assert await km.get(key) == b'{"other": 1}'
        assert calls == [key]  # a client's write wins; nothing was recomputed over it
        await km.set(f"free:{tag}", {"a": 1})
        _, keys = await store.scan(0, f"*{tag}*", 1000)
        assert sorted(keys) == sorted([key, f"free:{tag}"])  # the tags are not listed
    finally:
        await km.close()


async def test_a_write_acknowledged_after_a_shared_miss_is_never_overwritten(redis_url: str) -> None:
    km = Keymiss(store=RedisStore(redis_url), sweep_interval=0)

    @km.keyspace("slow:*")
    async def slow(key: str) -> str:
        await asyncio.sleep(0.005)  # short, so the writes below land before, during and after it
        return "computed"

    await km.start()
    tag = time.monotonic_ns()
    lost = []
    try:
        for i in range(40):
            key = f"slow:race{tag}:{i}"
            reader = asyncio.ensure_future(km.get(key))
            await asyncio.sleep((i % 8) * 0.0001)  # the write lands at different points of the miss
            await km.set(key, "client")
            await reader
            await km.drain(5)  # every fill this node began has ended: nothing can land later
            if await km.get(key) != "client":
                lost.append(i)
        assert not lost
    finally:
        await km.close()


async def test_redis_out_of_memory_is_its_own_error_and_leaves_no_tags(redis_standalone: Any) -> None:
    from keymiss import KeymissError

    url = f"redis://127.0.0.1:{redis_standalone.port}/0"
    km = Keymiss(store=RedisStore(url), sweep_interval=0)

    @km.keyspace("oom:*")
    def big(key: str) -> str:
        return "x" * 50_000

    store: Any = km.store
    info = await store.call(store.client.info, "memory")
    await store.call(store.client.config_set, "maxmemory", int(info["used_memory"]) + 300_000)
    await store.call(store.client.config_set, "maxmemory-policy", "noeviction")
    tag = time.monotonic_ns()
    try:
        results = await km.get_many([f"oom:{tag}:{i}" for i in range(20)], return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors and all(isinstance(e, KeymissError) and str(e).startswith("OOM ") for e in errors)
        values = [k async for k in store.client.scan_iter(match=f"oom:{tag}:*")]
        tags = [k async for k in store.client.scan_iter(match=f"keymiss:v:{{*}}oom:{tag}:*")]
        assert len(tags) == len(values) == 20 - len(errors)  # every tag has its value
    finally:
        await store.call(store.client.config_set, "maxmemory", 0)
        await store.call(store.client.config_set, "maxmemory-policy", "noeviction")
        await km.close()


async def test_a_write_on_another_node_wins_over_this_nodes_computation(redis_url: str) -> None:
    calls: list[str] = []
    gate = Gate()
    a, b = make_nodes(redis_url, 2, 0, calls, gate)
    tag = time.monotonic_ns()
    try:
        for i, value in enumerate(("client", {"from": "client"})):
            key = f"slow:cross{tag}:{i}"
            gate.started.clear(), gate.released.clear()
            reader = asyncio.ensure_future(a.get(key))  # node a computes, until released
            await gate.wait_started()
            assert await b.set(key, value)  # node b writes meanwhile: a's watch cannot see it
            gate.open()
            assert await reader == f"value of {key}"
            assert await a.get(key) == value and await b.get(key) == value  # codec tag kept too
        assert a.stats()["keyspaces"]["slow:*"]["superseded"] == 2
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_a_pass_through_write_naming_many_keys_invalidates_every_near_copy(
    redis_standalone: Any,
) -> None:
    from keymiss.stores import open_store

    url = f"redis://127.0.0.1:{redis_standalone.port}/0?near_cache=4MB&near_ttl=30"
    a, b = open_store(url), open_store(url)
    plain = redis_sync.Redis(port=redis_standalone.port)
    tag = time.monotonic_ns()
    keys = [f"many{tag}:{i}" for i in range(70)]

    def listeners() -> int:
        return int(plain.pubsub_numsub(INVALIDATE_CHANNEL)[0][1])

    try:
        before = listeners()
        await b.set_many([Write(k, b"old") for k in keys])
        assert all(i is not None and i.value == b"old" for i in await a.get_many(keys))  # held near
        await aeventually(lambda: listeners() > before)  # a's listener is subscribed
        script = b"for i, k in ipairs(KEYS) do redis.call('set', k, 'new') end return 1"
        await b.raw([b"EVAL", script, b"70", *(k.encode() for k in keys)])  # type: ignore[attr-defined]

        async def all_new() -> bool:
            return all(i is not None and i.value == b"new" for i in await a.get_many(keys))

        await aeventually(
            all_new, timeout=1, interval=0.02, message="every near copy dropped after a pass-through write"
        )
    finally:
        await asyncio.gather(a.close(), b.close())
        plain.close()


async def test_a_reader_never_sees_a_typed_value_before_its_codec_tag(redis_url: str) -> None:
    """The tag is written before the value it describes: a node reading between the two writes (as
    a lease waiter does) got the handler's JSON back as raw bytes."""
    writer, reader = RedisStore(redis_url), RedisStore(redis_url)
    seen: list[tuple[str, int]] = []
    done, turn = asyncio.Event(), asyncio.Event()
    keys = [f"tagorder:{time.monotonic_ns()}:{i}" for i in range(150)]
    current = [keys[0]]

    async def read() -> None:
        while not done.is_set():
            key = current[0]
            item = (await reader.get_many([key]))[0]
            if item is not None:
                seen.append((key, item.codec))
            turn.set()

    try:
        task = asyncio.create_task(read())
        for key in keys:
            current[0] = key
            turn.clear()
            await turn.wait()  # the reader has had a turn before the write, and reads on during it
            assert await writer.set_many([Write(key, b'{"a": 1}', codec=2, ttl=30, nx=True)]) == [True]
        done.set()
        await task
        assert seen and all(codec == 2 for _, codec in seen), [s for s in seen if s[1] != 2][:3]
    finally:
        await asyncio.gather(writer.close(), reader.close())


async def test_a_forged_record_that_does_not_decode_is_recomputed(redis_url: str) -> None:
    from keymiss.stores.redisrecord import tag_key, tag_value

    km = Keymiss(store=RedisStore(redis_url), sweep_interval=0)
    calls: list[str] = []

    @km.keyspace("forged:*")
    def doc(key: str) -> dict[str, str]:
        calls.append(key)
        return {"key": key}

    store: Any = km.store
    key = f"forged:{time.monotonic_ns()}"
    hostile = b"[" * 100_000 + b"]" * 100_000  # JSON nested past Python's recursion limit
    try:
        # a client with write access forges a value and a record whose CRC matches it
        await store.client.set(key.encode(), hostile)
        await store.client.set(tag_key(key), tag_value(2, hostile))
        assert await km.get(key) == {"key": key}  # recomputed, not a RecursionError
        assert calls == [key] and km.decode_failures == 1
    finally:
        await km.close()
