"""Batched keyspaces: distinct misses gathered into one handler call, each caller answered with its
own item or its own error; ``get_many`` over hits, misses and keys no keyspace owns."""

from __future__ import annotations

import asyncio
import time

import pytest

from keymiss import BatchResultError, HandlerError, Keymiss


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
