"""Admission near maxmemory under hostile or unlucky use, on a real Valkey and redis-server 7.0."""

from __future__ import annotations

import resource
from pathlib import Path

from keymiss.valkey import protocol

from ..support import RespTestClient, aeventually, resp
from .conftest import info_field, raw_worker, valgrind_valkey
from .test_admission import ballast, compute, counters, memory_ratio, start


async def test_a_fill_that_made_some_room_is_stored_though_a_later_sample_outweighs_it(
    kind: str, tmp_path: Path
) -> None:
    """A cold 1 KB value and a hot one are held; a 3 KB newcomer 4 readers wait on outweighs the
    cold one, which is deleted for it, but not the hot one sampled next. The newcomer won its
    contest: it is stored (the server's eviction makes the rest of its room), not answered only
    with the cold value lost for nothing."""
    proc = start(kind, tmp_path)
    port = proc.port
    try:
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        assert (await compute(port, w, "a:warm", b"w"))[0] == protocol.FILL_STORED
        assert await resp(port, "DEL", "a:warm") == 1
        assert (await compute(port, w, "a:cold", b"c" * 1024))[0] == protocol.FILL_STORED
        assert (await compute(port, w, "a:hot", b"h" * 1024))[0] == protocol.FILL_STORED
        async with RespTestClient(port) as c:
            assert await c.call_many([("GET", "a:hot")] * 50) == [b"h" * 1024] * 50
        await ballast(port, 0.955)
        reply, got = await compute(port, w, "a:new", b"n" * 3072, readers=4)
        assert got == [b"n" * 3072] * 4
        assert await resp(port, "EXISTS", "a:hot") == 1
        if await resp(port, "EXISTS", "a:cold"):  # 16 samples missed it (p = (2/3)^16): a fair loss
            assert await counters(port) == {"admission_rejects": 1, "admission_evictions": 0}
            assert reply == protocol.FILL_NOT_STORED
        else:  # deleted for the newcomer: it is stored (it was refused, both lost)
            assert await counters(port) == {"admission_rejects": 0, "admission_evictions": 1}
            assert reply == protocol.FILL_STORED
            assert await resp(port, "GET", "a:new") == b"n" * 3072
        await w.close()
    finally:
        proc.stop()


LOAD = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'ctx:' .. i, 'x') end return 1"


async def info_fields(port: int, section: str) -> dict[str, str]:
    info = (await resp(port, "INFO", section)).decode()
    return dict(line.split(":", 1) for line in info.splitlines() if ":" in line)


async def test_the_sketch_grows_only_into_room_below_maxmemory(kind: str, tmp_path: Path) -> None:
    """100,000 contexts (no TTL) and 50 computed values held, maxmemory set 1 MB above what they
    use: the first FILL must not grow the sketch to 8 counters a row per key (5 MB) at once. It
    did: memory went 4 MB over maxmemory, the server evicted every computed value (the only keys
    with a TTL) and, still over, refused every write after it."""
    proc = start(kind, tmp_path, maxmemory=0)
    port = proc.port
    try:
        assert await resp(port, "EVAL", LOAD, 0, 100_000) == 1
        for i in range(50):
            assert await resp(port, "SET", f"a:held:{i}", b"h" * 100, "PX", 3_600_000) == "OK"
        used = int((await info_fields(port, "memory"))["used_memory"])
        assert await resp(port, "CONFIG", "SET", "maxmemory", used + 1024 * 1024) == "OK"
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        assert (await compute(port, w, "a:new", b"n" * 64))[0] == protocol.FILL_STORED
        memory = await info_fields(port, "memory")
        assert int(memory["used_memory"]) <= int(memory["maxmemory"])
        assert (await info_fields(port, "stats"))["evicted_keys"] == "0"
        assert await resp(port, "SET", "a:later", b"l", "PX", 3_600_000) == "OK"
        assert await resp(port, "DBSIZE") == 100_000 + 50 + 2
        sketch = await info_field(port, "admission_sketch_bytes")
        assert 0 < sketch < 1024 * 1024  # grown into the room it had, not past it
        await w.close()
    finally:
        proc.stop()


def readme_sketch_bytes() -> int:
    """The README's sample ``INFO keymiss`` (one FILL of ``keymiss serve``, which always sets a
    maxmemory, over ten contexts): its ``admission_sketch_bytes``."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    return int(text.split(f"{protocol.INFO_SECTION}_admission_sketch_bytes:")[1].split()[0])


async def test_the_sketch_exists_only_under_maxmemory_as_the_readme_shows(kind: str, tmp_path: Path) -> None:
    """Without maxmemory nothing is counted and nothing weighed: a FILL left a 20 KB sketch all
    the same (INFO 20480), and dropping maxmemory kept one of any size. Under a maxmemory the first
    FILL makes the smallest one, which the README's sample (0) did not show."""
    proc = start(kind, tmp_path, maxmemory=0)
    port = proc.port
    try:
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        assert (await compute(port, w, "a:1", b"v"))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 0
        assert await resp(port, "CONFIG", "SET", "maxmemory", 64 * 1024 * 1024) == "OK"

        async def sized() -> bool:  # the module reads maxmemory once a second
            await compute(port, w, "a:2", b"v")
            await resp(port, "DEL", "a:2")
            return await info_field(port, "admission_sketch_bytes") > 0

        await aeventually(sized, timeout=5, interval=0.2)
        assert await info_field(port, "admission_sketch_bytes") == readme_sketch_bytes()
        assert await resp(port, "CONFIG", "SET", "maxmemory", 0) == "OK"

        async def gone() -> bool:
            await compute(port, w, "a:3", b"v")
            await resp(port, "DEL", "a:3")
            return await info_field(port, "admission_sketch_bytes") == 0

        await aeventually(gone, timeout=5, interval=0.2)
        await w.close()
    finally:
        proc.stop()


def address_space(pid: int) -> int:
    """The bytes of address space process ``pid`` has mapped (VmSize)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024


async def test_a_sketch_growth_the_system_cannot_allocate_keeps_the_table_it_has(
    kind: str, tmp_path: Path
) -> None:
    """The server's address space capped 2 MB above what it maps when 100,000 keys ask the first
    FILL for a 5 MB sketch: the growth fails, the FILL is stored with the 20 KB table kept. The
    growth's allocator aborted the server on failure (out of memory: the whole cache lost for a
    sketch); once the cap is lifted the next FILL grows it."""
    proc = start(kind, tmp_path, maxmemory=1024 * 1024 * 1024)
    port = proc.port
    assert proc.proc is not None
    pid = proc.proc.pid
    try:
        assert await resp(port, "EVAL", LOAD, 0, 100_000) == 1
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        limit = resource.prlimit(pid, resource.RLIMIT_AS)
        resource.prlimit(pid, resource.RLIMIT_AS, (address_space(pid) + 2 * 1024 * 1024, limit[1]))
        try:
            assert (await compute(port, w, "a:1", b"v"))[0] == protocol.FILL_STORED
            assert await info_field(port, "admission_sketch_bytes") == 5 * 4096
        finally:
            resource.prlimit(pid, resource.RLIMIT_AS, limit)
        assert (await compute(port, w, "a:2", b"v"))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 5 * (1 << 20)
        assert await resp(port, "GET", "a:1") == b"v"
        await w.close()
    finally:
        proc.stop()


async def test_a_full_cache_s_sketch_still_grows_into_part_of_the_room_below_maxmemory(
    kind: str, tmp_path: Path
) -> None:
    """1,000 keys held and memory at 95.5 % of 8 MB: no room below the admission mark, but 360 KB
    below maxmemory. The sketch doubles to its 8 counters a row per key (40 KB, half that room at
    most, 1/16 of maxmemory at most) and the contests that follow make room by worth. Grown only
    below the mark, a full cache's sketch never grew (crowded counts: 0.6 to 2.1 points of hits lost
    at 1 % budgets in bench/frontend_replay.py's replay of hit_ratio.py's zipf traces)."""
    proc = start(kind, tmp_path)
    port = proc.port
    try:
        assert await resp(port, "EVAL", LOAD, 0, 1_000) == 1
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        await ballast(port, 0.955)
        assert (await compute(port, w, "a:1", b"v"))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 5 * 8192
        memory = await info_fields(port, "memory")
        assert int(memory["used_memory"]) <= int(memory["maxmemory"])
        assert (await info_fields(port, "stats"))["evicted_keys"] == "0"
        await w.close()
    finally:
        proc.stop()


HOLD = "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'a:h:' .. i, 'h', 'PX', 3600000) end return 1"
DROP = "for i = 1, tonumber(ARGV[1]) do redis.call('UNLINK', 'a:h:' .. i) end return 1"


async def test_a_shrinking_keyspace_halves_the_counts_once_not_until_they_are_gone(
    kind: str, tmp_path: Path
) -> None:
    """100,000 values held and 200,000 reads counted (the halving period: 1.2 million reads), then
    all but one favourite (read 64 times) deleted: the period falls to 10,240 reads and the next
    read halves the counts once, as a period that ends does. It halved them five times in a row
    (the count of reads went on above the new period; 10 ms each for a 20 MB sketch, on the reads'
    path): the favourite's 64 reads weighed 2, and a newcomer 8 readers waited on displaced it."""
    proc = start(kind, tmp_path, maxmemory=64 * 1024 * 1024)
    port = proc.port
    try:
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        assert (await compute(port, w, "a:fav", b"f" * 1024))[0] == protocol.FILL_STORED
        assert await resp(port, "EVAL", HOLD, 0, 100_000) == 1
        assert (await compute(port, w, "a:sized", b"s"))[0] == protocol.FILL_STORED  # 1 M wide
        async with RespTestClient(port) as c:
            assert await c.call_many([("GET", "a:fav")] * 64) == [b"f" * 1024] * 64
            for _ in range(100):
                await c.call_many([("GET", f"a:h:{i}") for i in range(1, 2001)])
        assert await resp(port, "EVAL", DROP, 0, 100_000) == 1
        assert await resp(port, "DEL", "a:sized") == 1
        assert (await compute(port, w, "a:shrunk", b"s"))[0] == protocol.FILL_STORED  # the new period
        assert await resp(port, "DEL", "a:shrunk") == 1
        assert await resp(port, "GET", "a:fav") == b"f" * 1024  # the halving's read
        async with RespTestClient(port) as c:  # most of it in 1 MB steps, then 64 KB ones
            for _ in range(64):  # bounded: 64 MB
                if await memory_ratio(port, maxmemory=64 * 1024 * 1024) >= 0.95:
                    break
                assert await c.call("RPUSH", "a:ballast", b"b" * 1024 * 1024) > 0
        # over the admission mark (99 % of 64 MB: all but 512 KB, at least 1 %), under maxmemory
        await ballast(port, 0.991, maxmemory=64 * 1024 * 1024)
        reply, got = await compute(port, w, "a:new", b"n" * 1024, readers=8)
        assert got == [b"n" * 1024] * 8
        assert reply == protocol.FILL_NOT_STORED  # 8 reads against the favourite's 64, halved once
        assert await resp(port, "EXISTS", "a:fav") == 1
        await w.close()
    finally:
        proc.stop()


async def test_the_sketch_shrinks_when_far_fewer_keys_are_held(kind: str, tmp_path: Path) -> None:
    """100,000 contexts grow the sketch to 8 counters a row for each (5 MB, within 1 GB); once they
    are flushed, the next FILL folds it back to the width its keys need (the smallest), so its bytes
    go back to the values. It never shrank: a table once grown for millions of keys kept its bytes
    until the server restarted."""
    proc = start(kind, tmp_path, maxmemory=1024 * 1024 * 1024)
    port = proc.port
    try:
        assert await resp(port, "EVAL", LOAD, 0, 100_000) == 1
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000))
        assert (await compute(port, w, "a:1", b"v"))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 5 * (1 << 20)
        assert await resp(port, "FLUSHALL", "SYNC") == "OK"
        assert (await compute(port, w, "a:2", b"v"))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 5 * 4096
        await w.close()
    finally:
        proc.stop()


async def test_the_sketch_grows_folds_back_and_goes_clean_under_valgrind(tmp_path: Path) -> None:
    """Growth for 10,000 keys held, the fold back after a FLUSHALL, and the table freed when
    maxmemory goes to 0, under valgrind: no invalid access, nothing definitely lost."""
    server, vlog = valgrind_valkey(tmp_path, "--maxmemory", str(1024 * 1024 * 1024))
    port = server.port
    try:
        assert await resp(port, "EVAL", LOAD, 0, 10_000, wait=60.0) == 1
        w = await raw_worker(port, protocol.register("a", "a:*", ttl_ms=3_600_000), wait=60.0)
        assert (await compute(port, w, "a:1", b"v", wait=60.0))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 5 * (1 << 17)
        assert await resp(port, "FLUSHALL", "SYNC", wait=60.0) == "OK"
        assert (await compute(port, w, "a:2", b"v", wait=60.0))[0] == protocol.FILL_STORED
        assert await info_field(port, "admission_sketch_bytes") == 5 * 4096
        assert await resp(port, "CONFIG", "SET", "maxmemory", 0, wait=60.0) == "OK"

        async def freed() -> bool:  # the module reads maxmemory once a second
            await compute(port, w, "a:3", b"v", wait=60.0)
            await resp(port, "DEL", "a:3", wait=60.0)
            return await info_field(port, "admission_sketch_bytes") == 0

        await aeventually(freed, timeout=30, interval=0.5)
        await w.close()
    finally:
        server.stop()
    text = vlog.read_text()
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]
