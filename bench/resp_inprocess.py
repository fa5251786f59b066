"""Per-command cost of the RESP server without sockets: where the time goes.

Feeds the same pipelined GET stream a ``redis-benchmark -P 16`` run sends (100k preloaded keys)
through a real ``Connection`` whose transport only counts bytes, and prints µs per GET for the full
path and for request parsing alone, with the exact Python parser as the baseline for the hiredis
fast path. ``--profile`` adds a cProfile table.

Run: ``python bench/resp_inprocess.py``
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import random
import sys
import time

from keymiss import Keymiss
from keymiss.config import Settings
from keymiss.server import Server
from keymiss.server.connection import Connection
from keymiss.server.resp import RequestParser


class CountingTransport:
    """Just enough of a transport: counts bytes written, never pauses."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> tuple[str, int]:
        return ("127.0.0.1", 0)

    def set_write_buffer_limits(self, high: int) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


def make_stream(batches: int, pipeline: int, keys: int) -> list[bytes]:
    rnd = random.Random(1)
    return [
        b"".join(b"*2\r\n$3\r\nGET\r\n$16\r\nkey:%012d\r\n" % rnd.randrange(keys) for _ in range(pipeline))
        for _ in range(batches)
    ]


def parse_cost(stream: list[bytes], use_hiredis: bool) -> float:
    p = RequestParser(use_hiredis=use_hiredis)
    n = 0
    t0 = time.perf_counter()
    for chunk in stream:
        p.feed(chunk)
        while p.next() is not None:
            n += 1
    return (time.perf_counter() - t0) / n


async def serve_cost(stream: list[bytes], keys: int, profile: bool) -> float:
    km = Keymiss(store="memory", max_memory="1GB", sweep_interval=0)
    server = Server(km, Settings())
    for i in range(keys):
        km.store.set_now(f"key:{i:012d}", b"xxx")  # type: ignore[attr-defined]
    conn = Connection(server)
    conn.connection_made(CountingTransport())  # type: ignore[arg-type]
    count = sum(chunk.count(b"GET") for chunk in stream)
    t0 = time.perf_counter()
    for chunk in stream:
        conn.data_received(chunk)
    per = (time.perf_counter() - t0) / count
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        for chunk in stream:
            conn.data_received(chunk)
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(14)
    await km.close()
    return per


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--commands", type=int, default=64_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    print("| pipeline | parse, Python (µs) | parse, hiredis path (µs) | × Python | full GET path (µs) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for pipeline in (1, 16):
        stream = make_stream(args.commands // pipeline, pipeline, args.keys)
        pure = min(parse_cost(stream, False) for _ in range(3))
        fast = min(parse_cost(stream, True) for _ in range(3))
        full = asyncio.run(serve_cost(stream, args.keys, args.profile and pipeline == 16))
        print(f"| {pipeline} | {pure * 1e6:.2f} | {fast * 1e6:.2f} | {pure / fast:.1f} | {full * 1e6:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
