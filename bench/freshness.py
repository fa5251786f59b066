"""Read latency across expiry: a hot key with a TTL, read continuously, with and without
``stale`` and ``early_refresh``, side by side in one run.

Without either, every TTL ends in a cliff: the first reader after expiry misses and every reader
in the next compute time waits for the recomputation (single-flight, so the model runs once, but
they all wait). ``stale`` serves the old value while one refresh runs; ``early_refresh`` (XFetch)
recomputes before the TTL runs out. The three keyspaces run in one event loop, read by the same
readers in turn, so the machine's state is the same for all.

Run: ``python bench/freshness.py`` (``--seconds 10`` for a quick run).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keymiss import Keymiss

VARIANTS = {
    "ttl only": {},
    "stale=30": {"stale": 30.0},
    "early_refresh=1": {"early_refresh": 1.0},
}


async def run(
    seconds: float, ttl: float, compute: float, readers: int, interval: float
) -> list[tuple[str, int, float, float, float, float, int, int]]:
    km = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    calls = dict.fromkeys(VARIANTS, 0)
    for i, (name, opts) in enumerate(VARIANTS.items()):

        async def handler(key: str, name: str = name) -> str:
            calls[name] += 1
            await asyncio.sleep(compute)
            return f"{name} #{calls[name]}"

        km.add_keyspace(f"v{i}:*", handler, ttl=ttl, **opts)
    latencies: dict[str, list[float]] = {name: [] for name in VARIANTS}
    loop = asyncio.get_running_loop()
    for i in range(len(VARIANTS)):
        await km.get(f"v{i}:hot")  # each key's first miss, not counted

    async def reader() -> None:
        end = loop.time() + seconds
        while loop.time() < end:
            for i, name in enumerate(VARIANTS):
                t0 = time.perf_counter()
                await km.get(f"v{i}:hot")
                latencies[name].append(time.perf_counter() - t0)
            await asyncio.sleep(interval)

    await asyncio.gather(*(reader() for _ in range(readers)))
    await km.close()
    rows = []
    for name, lat in latencies.items():
        lat.sort()
        p99 = lat[int(0.99 * (len(lat) - 1))]
        p999 = lat[int(0.999 * (len(lat) - 1))]
        waited = sum(1 for x in lat if x >= compute * 0.5)
        rows.append((name, len(lat), statistics.median(lat), p99, p999, lat[-1], waited, calls[name]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--compute", type=float, default=0.3, help="seconds a computation takes")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between a reader's reads")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.seconds, args.ttl, args.compute, args.readers, args.interval))
    print(
        f"# Read latency across expiry ({args.seconds:g} s, TTL {args.ttl:g} s, compute {args.compute:g} s, "
        f"{args.readers} readers every {args.interval * 1000:g} ms)\n"
    )
    cols = "reads | p50 µs | p99 µs | p99.9 ms | max ms | reads that waited | computations | per TTL"
    print(f"| keyspace | {cols} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    periods = args.seconds / args.ttl
    for name, n, p50, p99, p999, worst, waited, calls in rows:
        print(
            f"| {name} | {n:,} | {p50 * 1e6:,.0f} | {p99 * 1e6:,.0f} | {p999 * 1e3:,.1f} | "
            f"{worst * 1e3:,.1f} | {waited} | {calls} | {calls / periods:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
