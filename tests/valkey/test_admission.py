"""Size- and cost-aware admission near maxmemory, on a real Valkey and redis-server 7.0.

Memory is filled with keyspace values a client wrote and reads often (no TTL: under volatile-lfu
the server cannot evict them, so only the module's admission may). Then a big value read once is
computed: it is worth less per byte than any of them, so its FILL is answered to its reader and not
stored (``admission_rejects``). A small value several readers wait on is worth more: its FILL deletes a
sampled lower-worth value to make room and is stored (``admission_evictions``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path

from ..redis_servers import RedisProcess
from ..support import RespTestClient, aeventually, resp
from .conftest import binary, raw_worker, take_one

MAXMEMORY = 8 * 1024 * 1024
HOT = 8 * 1024  # bytes of each value already held


@pytest.fixture
def tight(kind: str, tmp_path: Path) -> Iterator[RedisProcess]:
    proc = RedisProcess(
        tmp_path / "server",
        "--loadmodule",
        str(module_path()),
        "--maxmemory",
        str(MAXMEMORY),
        "--maxmemory-policy",
        "volatile-lfu",
        binary=binary(kind),
        log=True,
    )
    yield proc
    proc.stop()


async def memory_ratio(port: int) -> float:
    info = (await resp(port, "INFO", "memory")).decode()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return int(fields["used_memory"]) / MAXMEMORY


async def counters(port: int) -> dict[str, int]:
    info = (await resp(port, "INFO", protocol.INFO_SECTION)).decode()
    out = {}
    for name in ("admission_rejects", "admission_evictions"):
        prefix = f"{protocol.INFO_SECTION}_{name}:"
        line = next(line for line in info.splitlines() if line.startswith(prefix))
        out[name] = int(line[len(prefix) :])
    return out


async def compute(port: int, w: RespTestClient, key: str, value: bytes, readers: int = 1) -> tuple[int, list]:
    """``readers`` GETs of ``key`` (a miss: they wait on one computation), the worker's FILL of
    ``value``: (FILL's reply, what each reader got)."""
    waiting = [asyncio.ensure_future(resp(port, "GET", key)) for _ in range(readers)]
    taken, token = await take_one(w)
    assert taken in (key, key.encode())
    # every reader is waiting before the fill (each reader's GET is counted by the sketch)
    blocked = f"{protocol.INFO_SECTION}_blocked_readers:{readers}\r"

    async def all_waiting() -> bool:
        return blocked in (await resp(port, "INFO", protocol.INFO_SECTION)).decode()

    await aeventually(all_waiting, message=f"{readers} readers wait")
    reply = await w.call(*protocol.fill(key, token, value, cost=0.005))
    return reply, await asyncio.gather(*waiting)


async def test_a_low_worth_fill_is_answered_not_stored_and_a_high_worth_one_displaces(
    tight: RedisProcess,
) -> None:
    port = tight.port
    w = await raw_worker(port, protocol.register("a", "a:*"))
    try:
        # a first computation: the module has read maxmemory (the filter's sketch counts from then)
        assert (await compute(port, w, "a:warm", b"w"))[0] == protocol.FILL_STORED
        assert await resp(port, "DEL", "a:warm") == 1  # read once: a value of no worth, gone
        async with RespTestClient(port) as c:
            n = 0
            while await memory_ratio(port) < 0.955 and n < 1000:  # bounded: 8 MB of 8 KB values
                reply = await c.call("SET", f"a:hot:{n}", b"h" * HOT)
                if reply != "OK":  # over maxmemory: the server refuses (nothing it may evict)
                    break
                n += 1
            assert await memory_ratio(port) >= 0.95, "memory did not fill"
            for _ in range(5):  # every held value is read a few times
                await c.call_many([("GET", f"a:hot:{i}") for i in range(n)])
            held = await c.call("DBSIZE")

        # read once, 32 KB: worth less per byte than anything it would displace
        reply, got = await compute(port, w, "a:cold", b"c" * 32 * 1024)
        assert reply == protocol.FILL_NOT_STORED
        assert got == [b"c" * 32 * 1024]  # its reader has it all the same
        assert await resp(port, "EXISTS", "a:cold") == 0
        assert await counters(port) == {"admission_rejects": 1, "admission_evictions": 0}
        assert await resp(port, "DBSIZE") == held

        # 4 readers wait on 1 KB: worth more than a sampled 8 KB value read 5 times (few readers:
        # each connection's buffers count in used_memory, and the server refuses FILL over it)
        reply, got = await compute(port, w, "a:star", b"s" * 1024, readers=4)
        assert reply == protocol.FILL_STORED
        assert got == [b"s" * 1024] * 4
        assert await resp(port, "GET", "a:star") == b"s" * 1024
        after = await counters(port)
        assert after["admission_rejects"] == 1 and after["admission_evictions"] >= 1
        assert after["admission_evictions"] == 1  # one 8 KB value makes room for 1 KB
        assert await resp(port, "DBSIZE") == held
    finally:
        await w.close()


async def test_without_maxmemory_every_fill_is_stored(kind: str, tmp_path: Path) -> None:
    proc = RedisProcess(
        tmp_path / "server", "--loadmodule", str(module_path()), binary=binary(kind), log=True
    )
    try:
        w = await raw_worker(proc.port, protocol.register("a", "a:*"))
        reply, got = await compute(proc.port, w, "a:big", b"b" * 256 * 1024)
        assert reply == protocol.FILL_STORED and got == [b"b" * 256 * 1024]
        assert await counters(proc.port) == {"admission_rejects": 0, "admission_evictions": 0}
        await w.close()
    finally:
        proc.stop()
