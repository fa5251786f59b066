"""The module's hardening paths under valgrind: values answered but not stored (held once per
reader slot, GET and MGET), computations dropped from a full queue (by a miss and by a TAKE), and
TAKEs with LIMITs, blocked, woken and gone."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from keymiss.valkey import protocol

from ..support import RespTestClient, aeventually, resp
from .conftest import counter, info_field, raw_worker, take_one, valgrind_valkey


async def test_the_hardening_paths_run_clean_under_valgrind(tmp_path: Path) -> None:
    """Valkey's binary uses libc malloc, so valgrind sees every allocation the module makes."""
    server, vlog = valgrind_valkey(tmp_path, "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    port = server.port
    wait = 60.0
    try:
        # values over the share: answered to a GET and an MGET (the key twice), stored nowhere
        big = await raw_worker(port, protocol.register("big:*", "big:*"), wait=wait)
        value = b"v" * 8_000_000  # over a tenth of 64 MB
        readers = [
            asyncio.ensure_future(resp(port, "GET", "big:1", wait=wait)),
            asyncio.ensure_future(resp(port, "MGET", "big:1", "x", "big:1", wait=wait)),
        ]
        await aeventually(lambda: counter(port, "big:*", "misses"), expect=3, timeout=wait)  # big:1 thrice
        key, token = await take_one(big, block_ms=10_000)
        assert await big.call(*protocol.fill(key, token, value)) == protocol.FILL_NOT_STORED
        assert await asyncio.gather(*readers) == [value, [value, None, value]]
        # NOSTORE for a reader that left first, and one nobody waits for (queued from Lua)
        leaving = await RespTestClient(port, timeout=wait).connect()
        gone = asyncio.ensure_future(leaving.call("GET", "big:2"))
        key, token = await take_one(big, block_ms=10_000)
        await leaving.close()
        with contextlib.suppress(ConnectionError):
            await gone
        await aeventually(lambda: info_field(port, "blocked_readers"), expect=0, timeout=wait)
        assert await big.call(*protocol.fill(key, token, "x", store=False)) == protocol.FILL_NOT_STORED
        assert await resp(port, "EVAL", "return redis.call('GET', KEYS[1])", 1, "big:3", wait=wait) is None
        key, token = await take_one(big, block_ms=10_000)
        assert await big.call(*protocol.fill(key, token, value)) == protocol.FILL_NOT_STORED
        await big.close()

        # a full queue drops what nobody waits for: by a new miss, then by a TAKE
        drop = await raw_worker(port, protocol.register("drop:*", "drop:*", queue=2), wait=wait)
        left = [await RespTestClient(port, timeout=wait).connect() for _ in range(2)]
        gets = [asyncio.ensure_future(c.call("GET", f"drop:{i}")) for i, c in enumerate(left)]
        await aeventually(lambda: info_field(port, "blocked_readers"), expect=2, timeout=wait)
        for c in left:
            await c.close()
        await asyncio.gather(*gets, return_exceptions=True)
        await aeventually(lambda: info_field(port, "blocked_readers"), expect=0, timeout=wait)
        reader = asyncio.ensure_future(resp(port, "MGET", "drop:new", "drop:new", wait=wait))
        await aeventually(lambda: counter(port, "drop:*", "misses"), expect=4, timeout=wait)
        taken = protocol.decode_take(await drop.call(*protocol.take(10, 1000, 10_000), wait=wait))
        assert [k for k, _ in taken] == ["drop:new"], taken
        assert await counter(port, "drop:*", "dropped") == 2
        assert await drop.call(*protocol.fill("drop:new", taken[0][1], "n")) == protocol.FILL_STORED
        assert await reader == [b"n", b"n"]

        # TAKE with LIMITs: blocked while its only keyspace is limited to 0, woken by another's key,
        # and one blocked TAKE whose connection goes away
        two = await raw_worker(
            port, protocol.register("drop:*", "drop:*", queue=2), protocol.register("b", "b:*"), wait=wait
        )
        blocked = asyncio.ensure_future(two.call(*protocol.take(5, 20_000, 10_000, {"drop:*": 0}), wait=wait))
        await aeventually(lambda: info_field(port, "workers"), expect=2, timeout=wait)
        queued = asyncio.ensure_future(resp(port, "GET", "b:1", wait=wait))
        got = protocol.decode_take(await blocked)
        assert [k for k, _ in got] == ["b:1"], got
        assert await two.call(*protocol.fill("b:1", got[0][1], "one")) == protocol.FILL_STORED
        assert await queued == b"one"
        doomed = asyncio.ensure_future(two.call(*protocol.take(5, 20_000, 10_000, {"b": 0}), wait=wait))
        await two.close()
        with contextlib.suppress(ConnectionError):
            await doomed
        await drop.close()
    finally:
        server.stop()
    text = vlog.read_text()
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]
