"""keymiss nodes on a shared Redis: hit cost against Redis itself, and computations per key.

(a) GET hits with ``redis-benchmark -t get -r 100000`` straight to redis-server, through a keymiss
    node whose store is that Redis, and through a keymiss node with the near cache on; ratio to
    direct. (b) 2 and 3 keymiss nodes on a real 3-master Redis Cluster, 64 concurrent clients spread
    over the nodes asking Zipf-distributed keys of a 20 ms keyspace: computations per unique key
    (target: exactly 1).

Run: ``python bench/cluster.py`` (needs redis-server and redis-tools).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.resp_hits import preload  # noqa: E402
from tests.redis_servers import RedisCluster3, RedisProcess  # noqa: E402
from tests.server.conftest import start_server  # noqa: E402


def hits(port: int, requests: int, pipeline: int, keys: int = 100_000) -> float:
    cmd = ["redis-benchmark", "-p", str(port), "-t", "get", "-n", str(requests), "-r", str(keys)]
    cmd += ["-c", "50", "-P", str(pipeline), "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    return float(list(csv.DictReader(io.StringIO(out)))[-1]["rps"])


#: (pipeline, keys asked): all 100k preloaded keys uniformly, then a hot set of 1,000
CASES = ((1, 100_000), (16, 100_000), (16, 1_000))


def computations(port: int) -> int:
    r = redis.Redis(port=port)
    try:
        return sum(int(v["computations"]) for k, v in r.info("keymiss").items() if k.startswith("keyspace_"))
    finally:
        r.close()


async def zipf_load(ports: list[int], requests: int, keys: int, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1) ** 0.9
    ranks = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(requests))
    wanted = [f"work:{seed}:{int(r)}" for r in ranks]
    clients = [aioredis.Redis(port=ports[i % len(ports)]) for i in range(64)]
    queue = list(enumerate(wanted))

    async def worker(c: aioredis.Redis) -> None:
        while queue:
            _, key = queue.pop()
            assert await c.get(key) == f"result of {key}".encode()

    try:
        await asyncio.gather(*(worker(c) for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return set(wanted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--zipf-requests", type=int, default=4000)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = RedisProcess(work / "redis")
        try:
            preload(server.port, 100_000, b"xxx")
            url = f"redis://127.0.0.1:{server.port}/0"
            for label, store in (
                ("keymiss → Redis", url),
                ("keymiss → Redis + near cache", url + "?near_cache=64MB"),
            ):
                node = start_server(work, "--store", store, app="bench.cluster_app:app")
                try:
                    for p, keys in CASES:
                        rows.append((label, p, keys, hits(node.port, args.requests, p, keys)))
                finally:
                    node.stop()
            for p, keys in CASES:
                rows.append(("redis-server direct", p, keys, hits(server.port, args.requests, p, keys)))
        finally:
            server.stop()
        cluster = RedisCluster3(work / "cluster")
        flights = []
        try:
            for n_nodes in (2, 3):
                nodes = [
                    start_server(work, "--store", cluster.url, app="bench.cluster_app:app")
                    for _ in range(n_nodes)
                ]
                try:
                    t0 = time.perf_counter()
                    unique = asyncio.run(
                        zipf_load([x.port for x in nodes], args.zipf_requests, 1500, n_nodes)
                    )
                    elapsed = time.perf_counter() - t0
                    total = sum(computations(x.port) for x in nodes)
                    flights.append((n_nodes, args.zipf_requests, len(unique), total, elapsed))
                finally:
                    for x in nodes:
                        x.stop()
        finally:
            cluster.stop()

    direct = {(p, k): r for label, p, k, r in rows if label == "redis-server direct"}
    print(f"# keymiss on a shared Redis (python {sys.version.split()[0]}, {os.cpu_count()} cores)\n")
    print(f"## (a) GET hits, redis-benchmark -t get -n {args.requests} -c 50 (-r keys asked)\n")
    print("| path | -P | -r | ops/s | × direct |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, p, k, r in rows:
        print(f"| {label} | {p} | {k:,} | {r:,.0f} | {r / direct[(p, k)]:.2f} |")
    print("\n## (b) computations per unique key, Zipf 0.9 over 1500 keys, 64 clients, 3-master cluster\n")
    print("| keymiss nodes | requests | unique keys | computations | per unique key | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n_nodes, req, uniq, total, secs in flights:
        print(f"| {n_nodes} | {req} | {uniq} | {total} | {total / uniq:.3f} | {secs:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
