"""Size- and cost-aware admission near maxmemory, on a real Valkey and redis-server 7.0.

Memory is filled with keyspace values (with a TTL, as computed ones have) read a few times, up to
just under maxmemory, so that the server has nothing to evict and only the module's admission
acts. Then a big value read once is computed: it is worth less per byte than any of them, so its
FILL is answered to its reader and not stored (``admission_rejects``). A small value several
readers wait on is worth more: its FILL deletes a sampled lower-worth value to make room and is
stored (``admission_evictions``).

The other tests hold a few small computed values (with their companions) and fill the rest of
memory with one big list (no victim: not a string with a TTL), so that every sample meets them.
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
from .conftest import binary, raw_worker, take_one, valgrind_valkey

MAXMEMORY = 8 * 1024 * 1024
HOT = 8 * 1024  # bytes of each value already held


def start(
    kind: str, tmp_path: Path, policy: str = "volatile-lfu", maxmemory: int = MAXMEMORY
) -> RedisProcess:
    return RedisProcess(
        tmp_path / "server",
        "--loadmodule",
        str(module_path()),
        "--maxmemory",
        str(maxmemory),
        "--maxmemory-policy",
        policy,
        binary=binary(kind),
        log=True,
    )


@pytest.fixture
def tight(kind: str, tmp_path: Path) -> Iterator[RedisProcess]:
    proc = start(kind, tmp_path)
    yield proc
    proc.stop()


async def memory_ratio(port: int, wait: float = 10.0, maxmemory: int = MAXMEMORY) -> float:
    info = (await resp(port, "INFO", "memory", wait=wait)).decode()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    return int(fields["used_memory"]) / maxmemory


async def counters(port: int, wait: float = 10.0) -> dict[str, int]:
    info = (await resp(port, "INFO", protocol.INFO_SECTION, wait=wait)).decode()
    out = {}
    for name in ("admission_rejects", "admission_evictions"):
        prefix = f"{protocol.INFO_SECTION}_{name}:"
        line = next(line for line in info.splitlines() if line.startswith(prefix))
        out[name] = int(line[len(prefix) :])
    return out


async def compute(
    port: int, w: RespTestClient, key: str, value: bytes, readers: int = 1, wait: float = 10.0, codec: int = 0
) -> tuple[int, list]:
    """``readers`` GETs of ``key`` (a miss: they wait on one computation), the worker's FILL of
    ``value``: (FILL's reply, what each reader got)."""
    waiting = [asyncio.ensure_future(resp(port, "GET", key, wait=wait)) for _ in range(readers)]
    taken, token = await take_one(w, block_ms=int(wait * 1000))
    assert taken in (key, key.encode())
    # every reader is waiting before the fill (each reader's GET is counted by the sketch)
    blocked = f"{protocol.INFO_SECTION}_blocked_readers:{readers}\r"

    async def all_waiting() -> bool:
        return blocked in (await resp(port, "INFO", protocol.INFO_SECTION, wait=wait)).decode()

    await aeventually(all_waiting, timeout=wait, message=f"{readers} readers wait")
    reply = await w.call(*protocol.fill(key, token, value, cost=0.005, codec=codec))
    return reply, await asyncio.gather(*waiting)


async def scenario(port: int, wait: float = 10.0) -> None:
    """Fill memory with values read five times, then compute a cold 32 KB value (rejected) and a
    1 KB one four readers wait on (stored, one held value deleted for it)."""
    w = await raw_worker(port, protocol.register("a", "a:*"), wait=wait)
    try:
        # a first computation: the module has read maxmemory (the filter's sketch counts from then)
        assert (await compute(port, w, "a:warm", b"w", wait=wait))[0] == protocol.FILL_STORED
        assert await resp(port, "DEL", "a:warm", wait=wait) == 1  # read once: of no worth, gone
        async with RespTestClient(port, timeout=wait) as c:
            n = 0
            while await memory_ratio(port, wait) < 0.955 and n < 1000:  # bounded: 8 MB of 8 KB values
                replies = await c.call_many(
                    [("SET", f"a:hot:{n + i}", b"h" * HOT, "PX", 3_600_000) for i in range(8)]
                )
                n += sum(r == "OK" for r in replies)
                if any(r != "OK" for r in replies):  # over maxmemory: refused (nothing evictable)
                    break
            assert await memory_ratio(port, wait) >= 0.95, "memory did not fill"
            for _ in range(5):  # every held value is read a few times (16 at once: replies count
                for i in range(0, n, 16):  # in used_memory too, and the server must not evict)
                    await c.call_many([("GET", f"a:hot:{j}") for j in range(i, min(n, i + 16))])
            held = await c.call("DBSIZE")

        # read once, 32 KB: worth less per byte than anything it would displace
        reply, got = await compute(port, w, "a:cold", b"c" * 32 * 1024, wait=wait)
        assert reply == protocol.FILL_NOT_STORED
        assert got == [b"c" * 32 * 1024]  # its reader has it all the same
        assert await resp(port, "EXISTS", "a:cold", wait=wait) == 0
        assert await counters(port, wait) == {"admission_rejects": 1, "admission_evictions": 0}
        assert await resp(port, "DBSIZE", wait=wait) == held

        # 4 readers wait on 1 KB: worth more than a sampled 8 KB value read 5 times (few readers:
        # each connection's buffers count in used_memory, and the server refuses FILL over it)
        reply, got = await compute(port, w, "a:star", b"s" * 1024, readers=4, wait=wait)
        assert reply == protocol.FILL_STORED
        assert got == [b"s" * 1024] * 4
        assert await resp(port, "GET", "a:star", wait=wait) == b"s" * 1024
        # one 8 KB value made room for 1 KB
        assert await counters(port, wait) == {"admission_rejects": 1, "admission_evictions": 1}
        assert await resp(port, "DBSIZE", wait=wait) == held
    finally:
        await w.close()


async def test_a_low_worth_fill_is_answered_not_stored_and_a_high_worth_one_displaces(
    tight: RedisProcess,
) -> None:
    await scenario(tight.port)


async def test_the_admission_path_runs_clean_under_valgrind(tmp_path: Path) -> None:
    server, vlog = valgrind_valkey(
        tmp_path, "--maxmemory", str(MAXMEMORY), "--maxmemory-policy", "volatile-lfu"
    )
    try:
        await scenario(server.port, wait=60.0)
    finally:
        server.stop()
    text = vlog.read_text()
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]


async def test_without_maxmemory_every_fill_is_stored(kind: str, tmp_path: Path) -> None:
    proc = RedisProcess(
        tmp_path / "server", "--loadmodule", str(module_path()), binary=binary(kind), log=True
    )
    try:
        w = await raw_worker(proc.port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        reply, got = await compute(proc.port, w, "a:big", b"b" * 256 * 1024)
        assert reply == protocol.FILL_STORED and got == [b"b" * 256 * 1024]
        assert await counters(proc.port) == {"admission_rejects": 0, "admission_evictions": 0}
        await w.close()
    finally:
        proc.stop()


HELD = [f"a:c:{i}" for i in range(8)]


async def hold_computed(port: int, w: RespTestClient) -> None:
    """A first fill (the module reads maxmemory), then HELD: 8 KB values read once, each stored
    with its companion (CODEC 1)."""
    assert (await compute(port, w, "a:warm", b"w"))[0] == protocol.FILL_STORED
    assert await resp(port, "DEL", "a:warm") == 1
    for key in HELD:
        assert (await compute(port, w, key, b"c" * HOT, codec=1))[0] == protocol.FILL_STORED


async def ballast(port: int, upto: float, maxmemory: int = MAXMEMORY) -> None:
    """One list (no victim) grown in 64 KB steps until memory is at ``upto`` of maxmemory."""
    for _ in range(2000):  # bounded: 128 MB at most
        if await memory_ratio(port, maxmemory=maxmemory) >= upto:
            return
        assert await resp(port, "RPUSH", "a:ballast", b"b" * 65536) > 0
    raise AssertionError("memory did not fill")


async def held_pairs(port: int) -> list[tuple[int, int]]:
    """(value exists, companion exists) of each HELD key."""
    out = []
    for key in HELD:
        companion = protocol.companion_key(key.encode())
        out.append((await resp(port, "EXISTS", key), await resp(port, "EXISTS", companion)))
    return out


@pytest.mark.parametrize(
    "glob,policy",
    [("*", "volatile-lfu"), ("a:*", "volatile-lfu"), ("a:*", "noeviction"), ("a:*", "allkeys-lru")],
)
async def test_admission_deletes_a_value_with_its_companion_never_a_record_and_nothing_under_noeviction(
    kind: str, tmp_path: Path, glob: str, policy: str
) -> None:
    """A glob matching ``keymiss:`` keys leaves keymiss's records alone; a value goes with its
    companion; under noeviction nothing is deleted (the newcomer is stored if the server lets it)."""
    proc = start(kind, tmp_path, policy)
    try:
        w = await raw_worker(proc.port, protocol.register("a", glob, ttl_ms=3_600_000))
        await hold_computed(proc.port, w)
        assert await held_pairs(proc.port) == [(1, 1)] * len(HELD)
        await ballast(proc.port, 0.955)
        # 4 readers wait on 1 KB: worth more than any 8 KB value read once
        reply, got = await compute(proc.port, w, "a:star", b"s" * 1024, readers=4)
        assert reply == protocol.FILL_STORED and got == [b"s" * 1024] * 4
        pairs = await held_pairs(proc.port)
        evicted = 0 if policy == "noeviction" else 1
        assert await counters(proc.port) == {"admission_rejects": 0, "admission_evictions": evicted}
        assert sorted(pairs) == [(0, 0)] * evicted + [(1, 1)] * (len(HELD) - evicted)
        await w.close()
    finally:
        proc.stop()


async def test_after_maxmemory_is_set_at_runtime_a_fill_ties_and_is_stored(kind: str, tmp_path: Path) -> None:
    """Nothing was counted before ``CONFIG SET maxmemory`` (its reader's GET neither): every value
    weighs 0, and a tie admits the newcomer (as the server would store it), deleting one held
    value for it."""
    proc = start(kind, tmp_path, maxmemory=0)
    port = proc.port
    try:
        w = await raw_worker(
            port,
            protocol.register("a", "a:*", ttl_ms=3_600_000),
            protocol.register("p", "p:*", share_ppm=1),  # a probe: oversized once maxmemory is seen
        )
        await hold_computed(port, w)
        await ballast(port, 1.0, maxmemory=2 * 1024 * 1024)
        reader = asyncio.ensure_future(resp(port, "GET", "a:new"))
        taken, token = await take_one(w)
        assert taken in ("a:new", b"a:new")
        info = (await resp(port, "INFO", "memory")).decode()
        used = int(next(line for line in info.splitlines() if line.startswith("used_memory:")).split(":")[1])
        assert await resp(port, "CONFIG", "SET", "maxmemory", str(int(used / 0.97))) == "OK"

        async def module_sees_maxmemory() -> bool:
            probe = asyncio.ensure_future(resp(port, "GET", "p:probe"))
            _, probe_token = await take_one(w)
            reply = await w.call(*protocol.fill("p:probe", probe_token, b"p" * 64))
            assert await probe == b"p" * 64
            await resp(port, "DEL", "p:probe")
            return reply == protocol.FILL_NOT_STORED

        await aeventually(module_sees_maxmemory, timeout=5.0, message="the module reads maxmemory")
        reply = await w.call(*protocol.fill("a:new", token, b"n" * 1024, cost=0.005))
        assert reply == protocol.FILL_STORED and await reader == b"n" * 1024
        assert await counters(port) == {"admission_rejects": 0, "admission_evictions": 1}
        await w.close()
    finally:
        proc.stop()


async def test_favourites_keep_their_counts_through_a_few_thousand_reads_of_other_keys(
    kind: str, tmp_path: Path
) -> None:
    """32 values read 9 times, then 6,400 reads of 40 other keys (a few hundred reads per key the
    server holds): the sketch still counts the favourites above a newcomer 2 readers wait on, of
    the same size and cost, so that one is answered, not stored. Halving every 10 reads per key
    held (as the module once did) had them at 1 by then, and the newcomer displaced one."""
    proc = start(kind, tmp_path)
    port = proc.port
    try:
        w = await raw_worker(
            port,
            protocol.register("a", "a:*", ttl_ms=3_600_000),
            protocol.register("p", "p:*"),
        )
        assert (await compute(port, w, "a:warm", b"w"))[0] == protocol.FILL_STORED
        assert await resp(port, "DEL", "a:warm") == 1
        favourites = [f"a:f:{i}" for i in range(32)]
        for key in favourites:  # each read once by its computation's reader
            assert (await compute(port, w, key, b"f" * 2048))[0] == protocol.FILL_STORED
        async with RespTestClient(port) as c:
            for _ in range(8):
                assert await c.call_many([("GET", k) for k in favourites]) == [b"f" * 2048] * 32
            # other keys, no TTL (never victims), read 160 times each
            pumps = [f"p:{i}" for i in range(40)]
            assert await c.call_many([("SET", k, b"p") for k in pumps]) == ["OK"] * 40
            for _ in range(160):
                assert await c.call_many([("GET", k) for k in pumps]) == [b"p"] * 40
        await ballast(port, 0.955)
        reply, got = await compute(port, w, "a:new", b"n" * 2048, readers=2)
        assert got == [b"n" * 2048] * 2
        assert await counters(port) == {"admission_rejects": 1, "admission_evictions": 0}
        assert reply == protocol.FILL_NOT_STORED
        assert [await resp(port, "EXISTS", k) for k in favourites] == [1] * 32
        await w.close()
    finally:
        proc.stop()


async def test_the_sketch_follows_the_keys_held_while_memory_fills(kind: str, tmp_path: Path) -> None:
    """600 computed values far below maxmemory: the sketch already has 8 counters a row for each
    (8,192 wide: 40 KB with its cost slots, INFO ``admission_sketch_bytes``). Sized only once memory
    was tight, it stayed 4,096 wide while the cache filled, and halved every 10,240 reads."""
    proc = start(kind, tmp_path, maxmemory=64 * 1024 * 1024)
    port = proc.port
    try:
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        async with RespTestClient(port) as c:
            for batch in range(6):
                keys = [f"a:k:{batch}:{i}" for i in range(100)]
                # in MULTI a miss queues its computation and answers nil instead of waiting
                replies = await c.call_many([("MULTI",), *[("GET", k) for k in keys], ("EXEC",)])
                assert replies[-1] == [None] * 100
                taken = protocol.decode_take(await w.call(*protocol.take(1000, 1000, 10_000)))
                assert sorted(k for k, _ in taken) == sorted(keys)
                fills = await w.call_many(
                    [protocol.fill(k, token, b"v" * 64, cost=0.005) for k, token in taken]
                )
                assert fills == [protocol.FILL_STORED] * 100
            assert await c.call("DBSIZE") == 600
        info = (await resp(port, "INFO", protocol.INFO_SECTION)).decode()
        assert f"{protocol.INFO_SECTION}_admission_sketch_bytes:{5 * 8192}\r" in info
        assert await counters(port) == {"admission_rejects": 0, "admission_evictions": 0}
        await w.close()
    finally:
        proc.stop()
