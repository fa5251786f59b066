"""keymiss inside Valkey / Redis: GET hits with the module against the same server without it,
and against ``keymiss serve``; then what a miss costs and how often a key is computed.

Hits: each server gets the same 100k keys (``key:%012d``, the keyspace ``key:*`` registered on the
module-loaded ones) and ``redis-benchmark -t get -r 100000 -c 50`` at ``-P 1`` and ``-P 16``, the
rounds interleaved so that every target sees the same machine; the table has the median.

Misses: one client GETs unique keys of a keyspace whose handler returns at once, through a module
server and an in-process worker; the latency beyond the handler's own time, p50 and p99.

Zipf: a 3-master cluster with the module, one worker, 8 cluster clients asking Zipf-distributed
keys: computations per unique key asked.

Run: ``python bench/module.py`` (``--requests 200000 --rounds 2`` for a shorter run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.resp_hits import bench, free_port, preload, running
from keymiss import Keymiss
from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path
from keymiss.valkey.worker import Worker
from tests.valkey.conftest import valkey_binary

# One client: GET a new key (a miss), then the same key (a hit); seconds of each, one line per key.
CLIENT = """
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def get(key):
    k = key.encode()
    s.sendall(b"*2\\r\\n$3\\r\\nGET\\r\\n$%d\\r\\n%s\\r\\n" % (len(k), k))
    data = b""
    while not data.endswith(b"\\r\\n") or data.count(b"\\r\\n") < 2:
        data += s.recv(65536)
    assert data.startswith(b"$"), data
for i in range(n + 100):
    key = "miss:%d" % i
    t = time.perf_counter(); get(key); m = time.perf_counter() - t
    t = time.perf_counter(); get(key); h = time.perf_counter() - t
    print(m, h)
"""


def server_cmd(
    binary: str, port: int, tmp: str, module: bool | str, maxmemory: str | None = None
) -> list[str]:
    """The server's command line; ``module``: this build's, or the path of another build;
    ``maxmemory``: set where given (the module's admission sketch counts reads only under one)."""
    cmd = [
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
    ]
    if maxmemory:
        cmd += ["--maxmemory", maxmemory, "--maxmemory-policy", "volatile-lfu"]
    if module:
        cmd += ["--loadmodule", module if isinstance(module, str) else str(module_path())]
    return cmd


def register(port: int, glob: str) -> None:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), *map(str, protocol.register(glob, glob))],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert out.stdout.strip() == "OK", out.stdout + out.stderr


def hits(args: argparse.Namespace, tmp: str) -> list[str]:
    pipelines = [int(p) for p in args.pipelines.split(",")]
    targets: dict[str, list[str] | None] = {}
    vk = valkey_binary()
    for name, binary in (("redis-server", "redis-server"), ("valkey-server", vk)):
        if binary is None or name not in args.servers.split(","):
            continue
        targets[name] = server_cmd(binary, 0, tmp, False, args.maxmemory)
        targets[f"{name} + module"] = server_cmd(binary, 0, tmp, True, args.maxmemory)
        if args.old_module:  # the same hits through another build (e.g. main's), same rounds
            targets[f"{name} + old module"] = server_cmd(binary, 0, tmp, args.old_module, args.maxmemory)
    if "redis-server" in targets:
        targets["keymiss serve (default front end)"] = None
    ports: dict[str, int] = {}
    stack = []
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for name, cmd in targets.items():
            port = free_port()
            if cmd is None:
                cmd = [
                    sys.executable,
                    "-m",
                    "keymiss",
                    "--log-level",
                    "WARNING",
                    "serve",
                    "--port",
                    str(port),
                ]
                cmd += ["--store", "memory", "--max-memory", "1GB"]
            else:
                cmd[cmd.index("--port") + 1] = str(port)
            ctx = running(cmd, port)
            ctx.__enter__()
            stack.append(ctx)
            preload(port, args.keys, b"x" * 3)
            if "module" in name:
                register(port, "key:*")
            ports[name] = port
        for rnd in range(args.rounds):
            for p in pipelines:
                for name, port in ports.items():
                    r = bench(port, args.requests, p, args.clients, args.keys)
                    results.setdefault((name, p), []).append(r)
                    print(f"  round {rnd + 1} {name:24} -P {p:<3} {r['rps']:>12,.0f} ops/s", file=sys.stderr)
    finally:
        for ctx in reversed(stack):
            ctx.__exit__(None, None, None)
    lines = [
        f"redis-benchmark -t get -n {args.requests} -r {args.keys} -c {args.clients}, "
        f"{args.rounds} interleaved rounds (median); "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores\n",
        "| server | -P | ops/s | p50 ms | p99 ms | × same server without module |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in pipelines:
        for name in ports:
            rs = results[(name, p)]
            rps = statistics.median(r["rps"] for r in rs)
            base_name = name.replace(" + old module", "").replace(" + module", "")
            if name.startswith("keymiss"):
                base_name = "redis-server"
            base = statistics.median(r["rps"] for r in results[(base_name, p)])
            p50 = statistics.median(r["p50"] for r in rs)
            p99 = statistics.median(r["p99"] for r in rs)
            ratio = f"{rps / base:.2f}" if "module" in name else ""
            if name.startswith("keymiss"):
                ratio = f"{rps / base:.2f} (× redis-server)"
            lines.append(f"| {name} | {p} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {ratio} |")
    return lines


async def misses(args: argparse.Namespace, tmp: str) -> list[str]:
    lines = [
        "| server | misses | p50 ms | p99 ms | hit p50 ms | handler mean ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, binary in (("redis-server", "redis-server"), ("valkey-server", valkey_binary())):
        if binary is None:
            continue
        port = free_port()
        with running(server_cmd(binary, port, tmp, True), port):
            km = Keymiss(sweep_interval=0)
            spent: list[float] = []

            @km.keyspace("miss:*")
            async def instant(key: str, spent: list[float] = spent) -> str:
                t = time.perf_counter()
                out = "v" + key
                spent.append(time.perf_counter() - t)
                return out

            worker = Worker(km, f"redis://127.0.0.1:{port}", block_ms=1000)
            task = asyncio.get_running_loop().create_task(worker.run())
            while not worker.stats.nodes:
                await asyncio.sleep(0.01)
            # the client is another process, so that the worker's event loop is the worker's alone
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLIENT, str(port), str(args.misses), stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            pairs = [tuple(map(float, line.split())) for line in out.decode().split("\n") if line]
            lat = [m for m, _ in pairs[100:]]
            hit = [h for _, h in pairs[100:]]
            worker.stop()
            await task
            await km.close()
            handler = statistics.mean(spent) if spent else 0.0
            q = statistics.quantiles([x - handler for x in lat], n=100)
            lines.append(
                f"| {name} + module + worker | {len(lat)} | {q[49] * 1e3:.3f} | {q[98] * 1e3:.3f} | "
                f"{statistics.median(hit) * 1e3:.3f} | {handler * 1e3:.4f} |"
            )
    return lines


async def zipf(args: argparse.Namespace, tmp: str) -> list[str]:
    from redis.asyncio.cluster import RedisCluster

    from tests.redis_servers import RedisCluster3

    cluster = RedisCluster3(Path(tmp) / "zipf", "--loadmodule", str(module_path()))
    try:
        km = Keymiss(sweep_interval=0)

        @km.keyspace("z:*")
        async def compute(key: str) -> str:
            await asyncio.sleep(0.002)
            return "v" + key

        worker = Worker(km, cluster.url, block_ms=1000)
        task = asyncio.get_running_loop().create_task(worker.run())
        while len(worker.stats.nodes) < 3:
            await asyncio.sleep(0.05)
        rng = random.Random(7)
        weights = [1 / (i + 1) ** args.zipf_s for i in range(args.zipf_keys)]
        asked = rng.choices(range(args.zipf_keys), weights, k=args.zipf_requests)
        rc = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port, max_connections=64)
        await rc.initialize()
        queue = list(asked)

        async def client() -> None:
            while queue:
                i = queue.pop()
                assert await rc.get(f"z:{{{i}}}") == f"vz:{{{i}}}".encode()

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(8)))
        elapsed = time.perf_counter() - t0
        await rc.aclose()
        worker.stop()
        await task
        await km.close()
        computations = 0
        for n in cluster.nodes:
            info = subprocess.run(  # noqa: ASYNC221 - after the load, a one-off
                ["redis-cli", "-p", str(n.port), "INFO", "keymiss"], capture_output=True, text=True, timeout=5
            ).stdout
            computations += sum(int(x) for x in re.findall(r"computations=(\d+)", info))
        unique = len(set(asked))
    finally:
        cluster.stop()
    return [
        "| requests | unique keys | computations | computations per unique key | requests/s |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {len(asked)} | {unique} | {computations} | {computations / unique:.3f} "
        f"| {len(asked) / elapsed:,.0f} |",
    ]


def run(coro: Any) -> Any:
    """The worker's event loop: uvloop where installed, as ``keymiss worker`` runs."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipelines", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--misses", type=int, default=2000)
    parser.add_argument("--zipf-keys", type=int, default=2000)
    parser.add_argument("--zipf-requests", type=int, default=20000)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--only", choices=("hits", "misses", "zipf"))
    parser.add_argument(
        "--old-module", default=None, help="another module build: its hits in the same rounds"
    )
    parser.add_argument("--maxmemory", default=None, help="e.g. 1gb: servers run under it (hits never evict)")
    parser.add_argument("--servers", default="redis-server,valkey-server", help="comma-separated subset")
    args = parser.parse_args(argv)
    for tool in ("redis-server", "redis-benchmark", "redis-cli"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install redis-server redis-tools)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "hits"):
            print("# GET hits: module-loaded servers vs the same servers without the module\n")
            print("\n".join(hits(args, tmp)) + "\n")
        if args.only in (None, "misses"):
            print("# Misses: latency beyond the handler's time (an instant handler, one client)\n")
            print("\n".join(run(misses(args, tmp))) + "\n")
        if args.only in (None, "zipf"):
            print(f"# Computations per unique key: 3-master cluster, 8 clients, Zipf s={args.zipf_s}\n")
            print("\n".join(run(zipf(args, tmp))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
