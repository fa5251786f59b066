"""One large value must not wipe the cache: a value over the share of maxmemory is answered to its
readers and not stored (the worker says NOSTORE; the module refuses to SET it on its own too), and
one the server could not even pass through without evicting is failed before it is sent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keymiss import Keymiss
from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path

from ..redis_servers import RedisProcess
from ..support import ReplyError, RespTestClient, aeventually, resp
from .conftest import binary, counter, raw_worker, running, take_one, url

#: keys of the cache every test fills first, and a sample of them checked afterwards
CACHE = 1500
SAMPLE = [f"ctx:{i}" for i in range(0, CACHE, 97)]


def big_app() -> Keymiss:
    km = Keymiss(sweep_interval=0)

    @km.keyspace("big:*", ttl=600)
    async def big(key: str) -> bytes:
        return b"x" * int(key.split(":")[1])

    return km


def limited_server(kind: str, tmp_path: Path, maxmemory: str) -> RedisProcess:
    return RedisProcess(
        tmp_path / "server",
        "--loadmodule",
        str(module_path()),
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "allkeys-lru",
        binary=binary(kind),
        log=True,
    )


async def fill_cache(port: int, n: int = CACHE, size: int = 10_000) -> None:
    async with RespTestClient(port) as c:
        for start in range(0, n, 100):
            replies = await c.call_many(
                [["SET", f"ctx:{i}", "y" * size] for i in range(start, min(n, start + 100))]
            )
            assert replies == ["OK"] * len(replies)


async def stat(port: int, section: str, name: str) -> int:
    text = await resp(port, "INFO", section)
    return int(text.split(f"{name}:".encode())[1].split(b"\r\n")[0])


async def test_an_oversized_value_reaches_its_reader_and_leaves_the_cache_intact(
    kind: str, tmp_path: Path
) -> None:
    server = limited_server(kind, tmp_path, "40mb")
    port = server.port
    try:
        await fill_cache(port)
        before = await resp(port, "DBSIZE")
        async with running(big_app(), url(server)) as worker:  # the share: a tenth, 4 MB
            got = await resp(port, "GET", "big:6000000", wait=30)
            assert got == b"x" * 6_000_000  # its reader has it
            assert await resp(port, "GET", "big:1000") == b"x" * 1000  # small values are stored
        assert await resp(port, "EXISTS", "big:6000000") == 0  # not stored
        assert await resp(port, "DBSIZE") == before + 1  # big:1000 only
        assert [await resp(port, "EXISTS", k) for k in SAMPLE] == [1] * len(SAMPLE)
        assert await stat(port, "stats", "evicted_keys") == 0
        assert await counter(port, "big:*", "oversized") == 1
        assert worker.stats.oversized == 1
    finally:
        server.stop()


async def test_the_module_refuses_to_store_an_oversized_fill_and_answers_its_readers(
    kind: str, tmp_path: Path
) -> None:
    """A worker that does not say NOSTORE (or does not know maxmemory) cannot wipe the cache either."""
    server = limited_server(kind, tmp_path, "20mb")
    port = server.port
    try:
        await fill_cache(port, 1000)
        before = await resp(port, "DBSIZE")
        w = await raw_worker(port, protocol.register("big:*", "big:*"))  # the default share, a tenth
        value = b"z" * 3_000_000
        readers = [
            asyncio.ensure_future(resp(port, "GET", "big:m", wait=30)),
            asyncio.ensure_future(resp(port, "MGET", "big:m", "other", wait=30)),
        ]
        await aeventually(lambda: counter(port, "big:*", "misses"), expect=2)
        key, token = await take_one(w)
        assert await w.call(*protocol.fill(key, token, value, px=60_000)) == protocol.FILL_NOT_STORED
        assert await asyncio.gather(*readers) == [value, [value, None]]
        assert await resp(port, "EXISTS", "big:m") == 0
        # NOSTORE: the worker's own decision, whatever the size
        reader = asyncio.ensure_future(resp(port, "GET", "big:s"))
        key, token = await take_one(w)
        assert await w.call(*protocol.fill(key, token, "small", store=False)) == protocol.FILL_NOT_STORED
        assert await reader == b"small"
        reader = asyncio.ensure_future(resp(port, "GET", "big:t"))
        key, token = await take_one(w)
        assert await w.call(*protocol.fill(key, token, "stored")) == protocol.FILL_STORED
        assert await reader == b"stored"
        await w.close()
        assert await resp(port, "DBSIZE") == before + 1  # big:t only
        assert await stat(port, "stats", "evicted_keys") == 0
        assert await counter(port, "big:*", "oversized") == 2
        log = (tmp_path / "server" / "server.log").read_text()
        assert "a value of 3000000 bytes is answered to its 2 reader(s) and not stored" in log, log[-2000:]
    finally:
        server.stop()


async def test_a_value_larger_than_maxmemory_is_failed_before_it_evicts_anything(
    kind: str, tmp_path: Path
) -> None:
    """``GET big:60000000`` with maxmemory 50MB once evicted every cached value, then failed with
    OOM: passing the value through the server (its FILL, then its reply) is what evicted. Here the
    same at a fifth of the size."""
    server = limited_server(kind, tmp_path, "10mb")
    port = server.port
    try:
        await fill_cache(port, 500)
        before = await resp(port, "DBSIZE")
        async with running(big_app(), url(server)):
            got = await resp(port, "GET", "big:12000000", wait=30)
            assert isinstance(got, ReplyError) and "maxmemory" in str(got), got
        assert await resp(port, "DBSIZE") == before
        assert await stat(port, "stats", "evicted_keys") == 0
    finally:
        server.stop()


def batched_big_app() -> Keymiss:
    km = Keymiss(sweep_interval=0)

    @km.keyspace("bigb:*", ttl=600, batch_size=64, batch_wait_ms=50, timeout=30)
    async def bigb(keys: list[str]) -> list[bytes]:
        return [b"x" * int(key.split(":")[1]) for key in keys]

    return km


@pytest.mark.parametrize("together", [True, False], ids=["one-mget", "separate-gets"])
async def test_oversized_values_answered_together_do_not_wipe_the_cache(
    kind: str, tmp_path: Path, together: bool
) -> None:
    """Twelve 7 MB values (over the share of a 64 MB maxmemory, each of which alone could pass
    through) once all passed the headroom check at once, each seeing the same free memory, and
    their pending replies evicted every cached value: what is committed counts against the room."""
    server = limited_server(kind, tmp_path, "64mb")
    port = server.port
    keys = [f"bigb:7000000:{i}" for i in range(12)]
    try:
        await fill_cache(port, 3000)
        before = await resp(port, "DBSIZE")
        async with running(batched_big_app(), url(server)):
            if together:
                got = [await resp(port, "MGET", *keys, wait=60)]
            else:
                got = await asyncio.gather(*[resp(port, "GET", key, wait=60) for key in keys])
        for reply in got:
            if isinstance(reply, ReplyError):
                assert "too large" in str(reply), reply
        if not together:
            assert b"x" * 7_000_000 in got  # what fits still reaches its reader
        assert await stat(port, "stats", "evicted_keys") == 0
        assert await resp(port, "DBSIZE") == before
        assert [await resp(port, "EXISTS", f"ctx:{i}") for i in range(0, 3000, 97)] == [1] * 31
    finally:
        server.stop()
