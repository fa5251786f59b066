"""Engine benchmark: what a hit costs, and how many times a stampede runs the function.

(a) Hit cost per ``get`` of a present key, against a plain dict, ``cachetools.LRUCache`` and
    ``diskcache.Cache`` (the last two are what Python services use today), measured in one run.
(b) Handler calls and wall time for N concurrent ``get``s of one missing key, against cashews (with
    and without its lock) and aiocache — the stampede an inference cache must absorb.

Run: ``python bench/engine.py`` (``--quick`` for a smoke run). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from keymiss import Keymiss


def best_of(repeats: int, fn: Callable[[], float]) -> float:
    """Median of several timed runs, so a scheduler hiccup does not decide the table."""
    return statistics.median(fn() for _ in range(repeats))


def time_sync(n: int, keys: list[str], get: Callable[[str], Any]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n):
        get(keys[i % len(keys)])
    return (time.perf_counter() - t0) / n


def time_async(n: int, keys: list[str], get: Callable[[str], Awaitable[Any]]) -> float:
    async def run() -> float:
        gc.collect()
        t0 = time.perf_counter()
        for i in range(n):
            await get(keys[i % len(keys)])
        return (time.perf_counter() - t0) / n

    return asyncio.run(run())


def hit_table(n: int, repeats: int) -> list[tuple[str, float]]:
    import cachetools
    import diskcache

    keys = [f"bertqa{{T{i % 97}}}_ctx{i}_question {i}" for i in range(10_000)]
    value = "the answer span " * 4
    rows: list[tuple[str, float]] = []

    plain = dict.fromkeys(keys, value)
    rows.append(("dict lookup", best_of(repeats, lambda: time_sync(n, keys, plain.__getitem__))))

    lru: cachetools.LRUCache[str, str] = cachetools.LRUCache(maxsize=len(keys) * 2)
    for k in keys:
        lru[k] = value
    rows.append(("cachetools.LRUCache", best_of(repeats, lambda: time_sync(n, keys, lru.__getitem__))))

    with tempfile.TemporaryDirectory() as tmp:
        dc = diskcache.Cache(tmp)
        for k in keys:
            dc.set(k, value)
        rows.append(("diskcache.Cache", best_of(repeats, lambda: time_sync(n // 5, keys, dc.get))))
        dc.close()

    for label, url in (
        ("keymiss memory, lru", "memory?eviction=lru"),
        ("keymiss memory, tinylfu", "memory?eviction=tinylfu"),
        ("keymiss lmdb", None),
    ):
        with tempfile.TemporaryDirectory() as tmp:
            store = url or f"lmdb:{tmp}/db?durable=0"

            async def setup(km: Keymiss) -> None:
                for k in keys:
                    await km.set(k, value)

            def measure(store: str = store) -> float:
                km = Keymiss(store=store, max_memory="512MB", sweep_interval=0)

                @km.keyspace("bertqa{<tag>}_<context>_<question>")
                def qa(tag: str, context: str, question: str) -> str:
                    raise AssertionError("every key is present")

                async def run() -> float:
                    await setup(km)
                    gc.collect()
                    t0 = time.perf_counter()
                    for i in range(n):
                        await km.get(keys[i % len(keys)])
                    per = (time.perf_counter() - t0) / n
                    await km.close()
                    return per

                return asyncio.run(run())

            rows.append((f"{label} Keymiss.get", best_of(repeats, measure)))
    return rows


def policy_table(n: int, repeats: int) -> list[tuple[str, float, float]]:
    """Per-hit and per-operation cost of each policy inside a MemoryStore."""
    from keymiss.stores.memory import MemoryStore
    from keymiss.stores.tinylfu import TinyLFUPolicy

    keys = [f"bertqa{{T{i % 97}}}_ctx{i}_question {i}" for i in range(10_000)]
    value = b"the answer span " * 4

    def make(policy: str) -> MemoryStore:
        store = MemoryStore(
            10_000 * 500, eviction=policy if policy != "tinylfu, no read buffer" else "tinylfu"
        )
        if policy == "tinylfu, no read buffer":  # every hit does the policy's work at once
            p = store.policy
            assert isinstance(p, TinyLFUPolicy)
            store._touch = p.touch = p._touched  # type: ignore[method-assign]
        for k in keys:
            store.set_now(k, value)
        return store

    def hits(policy: str) -> float:
        store = make(policy)
        get, nk = store.get_now, len(keys)
        gc.collect()
        t0 = time.perf_counter()
        for i in range(n):
            get(keys[i % nk])
        return (time.perf_counter() - t0) / n

    def mixed(policy: str) -> float:
        store = make(policy)
        get, put, nk = store.get_now, store.set_now, len(keys)
        fresh = [f"new:{i}" for i in range(n // 10 + 1)]
        gc.collect()
        t0 = time.perf_counter()
        for i in range(n):
            if i % 10 == 9:
                put(fresh[i // 10], value)
            else:
                get(keys[i % nk])
        return (time.perf_counter() - t0) / n

    rows = []
    for policy in ("lru", "tinylfu", "tinylfu-cost", "tinylfu, no read buffer"):
        rows.append(
            (policy, best_of(repeats, lambda p=policy: hits(p)), best_of(repeats, lambda p=policy: mixed(p)))
        )
    return rows


async def stampede_keymiss(n: int, compute: float) -> tuple[int, float]:
    km = Keymiss(sweep_interval=0)
    calls = 0

    @km.keyspace("stampede:*")
    async def handler(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(compute)
        return "v"

    t0 = time.perf_counter()
    await asyncio.gather(*(km.get("stampede:1") for _ in range(n)))
    elapsed = time.perf_counter() - t0
    await km.close()
    return calls, elapsed


async def stampede_cashews(n: int, compute: float, lock: bool) -> tuple[int, float]:
    from cashews import Cache

    cache = Cache()
    cache.setup("mem://")
    calls = 0

    @cache(ttl="10m", lock=lock)
    async def handler(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(compute)
        return "v"

    t0 = time.perf_counter()
    await asyncio.gather(*(handler("stampede:1") for _ in range(n)))
    elapsed = time.perf_counter() - t0
    await cache.close()
    return calls, elapsed


async def stampede_aiocache(n: int, compute: float) -> tuple[int, float]:
    from aiocache import cached

    calls = 0

    @cached(ttl=600)
    async def handler(key: str) -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(compute)
        return "v"

    t0 = time.perf_counter()
    await asyncio.gather(*(handler("stampede:1") for _ in range(n)))
    return calls, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--stampede", type=int, default=1000, help="concurrent gets of one missing key")
    parser.add_argument("--compute-ms", type=float, default=50.0, help="simulated inference time")
    args = parser.parse_args(argv)
    n, repeats = (20_000, 1) if args.quick else (300_000, 5)

    print(f"# keymiss engine benchmark (python {sys.version.split()[0]}, n={n}, median of {repeats})\n")
    rows = hit_table(n, repeats)
    base = rows[0][1]
    lru = rows[1][1]
    print("## (a) hit cost per get\n")
    print("| implementation | ns per hit | × dict | × cachetools.LRUCache |")
    print("| --- | ---: | ---: | ---: |")
    for label, per in rows:
        print(f"| {label} | {per * 1e9:,.0f} | {per / base:.1f} | {per / lru:.2f} |")

    compute = args.compute_ms / 1000
    n_st = 100 if args.quick else args.stampede
    results = [
        ("keymiss", asyncio.run(stampede_keymiss(n_st, compute))),
        ("cashews (no lock)", asyncio.run(stampede_cashews(n_st, compute, lock=False))),
        ("cashews (lock=True)", asyncio.run(stampede_cashews(n_st, compute, lock=True))),
        ("aiocache @cached", asyncio.run(stampede_aiocache(n_st, compute))),
    ]
    km_calls = results[0][1][0]
    print(f"\n## (b) {n_st} concurrent gets of one missing key ({args.compute_ms:.0f} ms handler)\n")
    print("| implementation | handler calls | × keymiss calls | wall ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, (calls, elapsed) in results:
        print(f"| {label} | {calls} | {calls / km_calls:.0f} | {elapsed * 1000:,.1f} |")

    policy_rows = policy_table(n, repeats)
    lru_hit, lru_mixed = policy_rows[0][1], policy_rows[0][2]
    print("\n## (c) what the eviction policy costs, in the store (no engine, no await)\n")
    print("Hits only: every get finds its key. Mixed: 9 hits for each write of a new key to a full")
    print("store (evictions), so the read buffer is replayed as it would be in use.\n")
    print("| policy | ns per hit | × lru | ns per op, mixed | × lru |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, hit, mixed in policy_rows:
        ratios = f"{hit / lru_hit:.2f} | {mixed * 1e9:,.0f} | {mixed / lru_mixed:.2f}"
        print(f"| {label} | {hit * 1e9:,.0f} | {ratios} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
