"""The embedded default job: a miss, a hit, a stampede of concurrent misses, and the stats.

It stands in for an expensive model with a function that sleeps, so the numbers show what the
cache saves without needing weights on disk.
"""

from __future__ import annotations

import asyncio
import time

from keymiss.api import Keymiss


async def run_demo(
    store: str = "memory", max_memory: str = "64MB", compute_seconds: float = 0.2
) -> dict[str, object]:
    """Run the demo and print what happens; returns the final stats (used by the tests)."""
    km = Keymiss(store=store, max_memory=max_memory)
    calls = 0

    @km.keyspace("square:*", ttl=3600)
    def square(key: str) -> str:
        """A stand-in for inference: slow, and run in a worker thread."""
        nonlocal calls
        calls += 1
        time.sleep(compute_seconds)
        return str(int(key.split(":", 1)[1]) ** 2)

    async with km:
        print(f"keymiss demo: store={km.store.url}, keyspace 'square:*' ({compute_seconds:.2f}s per compute)")
        t0 = time.perf_counter()
        value = await km.get("square:12")
        print(f"  miss  GET square:12 -> {value!r:8} {1000 * (time.perf_counter() - t0):8.2f} ms  (computed)")
        t0 = time.perf_counter()
        value = await km.get("square:12")
        print(f"  hit   GET square:12 -> {value!r:8} {1000 * (time.perf_counter() - t0):8.3f} ms  (stored)")
        before = calls
        t0 = time.perf_counter()
        values = await asyncio.gather(*(km.get("square:7") for _ in range(1000)))
        elapsed = time.perf_counter() - t0
        print(
            f"  1000 concurrent GET square:7 -> {values[0]!r}, {calls - before} computation, "
            f"{1000 * elapsed:.1f} ms"
        )
        stats = km.stats()
        ks = stats["keyspaces"]["square:*"]
        print(
            f"  stats: hits={stats['hits']} misses={stats['misses']} computations={ks['computations']} "
            f"coalesced={ks['coalesced']} compute_s={ks['compute_seconds']:.2f} "
            f"saved_s={ks['seconds_saved']:.2f}"
        )
        print(f"  store: {stats['store']}")
    return stats
