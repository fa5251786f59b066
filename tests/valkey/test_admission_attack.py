"""Admission near maxmemory under hostile or unlucky use, on a real Valkey and redis-server 7.0."""

from __future__ import annotations

from pathlib import Path

from keymiss.valkey import protocol

from ..support import RespTestClient, resp
from .conftest import raw_worker
from .test_admission import ballast, compute, counters, start


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
