"""The module in servers configured to stress it: under valgrind, under maxmemory, with a replica,
and with limits on what the server will store."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import zlib
from pathlib import Path

from keymiss import Keymiss
from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path

from ..redis_servers import RedisProcess
from ..support import ReplyError, RespTestClient, aeventually, resp
from .conftest import (
    binary,
    companions,
    keyspace_info,
    make_app,
    raw_worker,
    running,
    take_one,
    url,
    valgrind_valkey,
)


async def test_the_module_runs_clean_under_valgrind(tmp_path: Path) -> None:
    """Valkey's binary uses libc malloc, so valgrind sees every allocation the module makes."""
    server, vlog = valgrind_valkey(tmp_path)
    port = server.port

    async def computations(pattern: str) -> int:  # started: computed (FILLs), queued or taken
        info = await keyspace_info(port, pattern)
        return sum(int(info[name]) for name in ("computations", "queued", "in_flight"))

    try:
        calls: list[str] = []
        async with running(make_app(calls, compute=0.3), url(server)) as worker:
            got = await asyncio.gather(*(resp(port, "GET", "slow:v", wait=30) for _ in range(10)))
            assert got == [b"value of slow:v"] * 10
            assert await resp(port, "MGET", "slow:v", "slow:w", "x", wait=30) == [
                b"value of slow:v",
                b"value of slow:w",
                None,
            ]
            assert isinstance(await resp(port, "GET", "fail:v", wait=30), ReplyError)
            # a blocked MGET whose client goes away, and a client write over a pending key
            before = await computations("slow:*")
            leaving = await RespTestClient(port, timeout=30).connect()
            gone = asyncio.ensure_future(leaving.call("MGET", "slow:gone1", "slow:gone2"))
            await aeventually(lambda: computations("slow:*"), expect=before + 2, timeout=30)
            await leaving.close()
            with contextlib.suppress(ConnectionError):
                await gone
            waiter = asyncio.ensure_future(resp(port, "GET", "slow:over", wait=30))
            await aeventually(lambda: computations("slow:*"), expect=before + 3, timeout=30)
            await resp(port, "SET", "slow:over", "mine", wait=30)
            assert await waiter == b"value of slow:over"  # the computed value, not stored
            await aeventually(lambda: worker.stats.discarded, timeout=30)  # slow:over's fill came back
            assert await resp(port, "GET", "slow:over", wait=30) == b"mine"
            assert isinstance(await resp(port, "GET", "hang:v", wait=30), ReplyError)
            # a full queue read inside Lua (nil), and a worker's BUSY answer (counted, not kept)
            tiny = [asyncio.ensure_future(resp(port, "GET", f"tiny:{i}", wait=30)) for i in range(2)]
            await aeventually(lambda: computations("tiny:*"), expect=2, timeout=30)
            lua = "return redis.call('GET', KEYS[1])"
            assert await resp(port, "EVAL", lua, 1, "tiny:lua", wait=30) is None
            await asyncio.gather(*tiny)
            w = await raw_worker(port, protocol.register("b", "busy:*", error_ttl_ms=60000), wait=30)
            busy = asyncio.ensure_future(resp(port, "GET", "busy:1", wait=30))
            key, token = await take_one(w, block_ms=10_000)
            assert await w.call(*protocol.fail(key, token, "BUSY keymiss: all slots are held")) == 1
            assert isinstance(await busy, ReplyError)
            await w.close()
            # INFO's percent-encoded names, one cut short at INFO's text size
            name = "o,d=d %\x1b:" + "," * 120 + "*"
            odd = await raw_worker(port, protocol.register(name, name), wait=30)
            info = (await resp(port, "INFO", "keymiss", wait=30)).decode()
            assert "pattern=o%2Cd%3Dd%20%25%1B:%2C%2C" in info
            await odd.close()
            # versions, stale refreshes and their failure backoff, client writes' companions
            v = await raw_worker(
                port,
                protocol.register("v", "v:*", ttl_ms=200, stale_ms=60000, version="aa", label="one"),
                wait=30,
            )
            reading = asyncio.ensure_future(resp(port, "GET", "v:1", wait=30))
            key, token = await take_one(v, block_ms=10_000)
            assert await v.call(*protocol.fill(key, token, "old", version="zz")) == 0  # computed again
            key, token = await take_one(v, block_ms=10_000)
            assert await v.call(*protocol.fill(key, token, "one", px=60200, version="aa")) == 1
            assert await reading == b"one"

            # stale now (less than the stale window left): served, and refreshed
            async def stale() -> bool:
                return bool(await resp(port, "PTTL", "v:1", wait=30) < 59_990)

            await aeventually(stale, timeout=30)
            assert await resp(port, "GET", "v:1", wait=30) == b"one"
            key, token = await take_one(v, block_ms=10_000)
            assert await v.call(*protocol.fail(key, token, "ERR the model is down")) == 1  # backoff
            assert await resp(port, "GET", "v:1", wait=30) == b"one"
            assert await v.call(*protocol.switch_version("v", "bb", "two")) == "OK"
            hidden = asyncio.ensure_future(resp(port, "GET", "v:1", wait=30))
            key, token = await take_one(v, block_ms=10_000)
            assert await v.call(*protocol.fill(key, token, "two", version="bb")) == 1
            assert await hidden == b"two"
            await resp(port, "SET", "v:2", "client", wait=30)
            await resp(port, "DEL", "v:1", wait=30)

            async def v2_marked_v1_dropped() -> bool:  # the tick's work
                marks = await companions(port)
                mark = protocol.parse_companion(marks.get("v:2", b"-"))  # a client's write: no version
                return mark == (0, zlib.crc32(b"client"), b"") and "v:1" not in marks

            await aeventually(v2_marked_v1_dropped, timeout=30)
            assert await resp(port, "GET", "v:2", wait=30) == b"client"
            assert await v.call(*protocol.register("v", "v:*", version="cc")) == "OK"
            await v.close()
            # VSTALE: the replaced tag kept, served with one refresh, replaced, freed on re-register
            p = await raw_worker(
                port, protocol.register("p", "p:*", version="aa", version_stale_ms=60000), wait=30
            )
            first = asyncio.ensure_future(resp(port, "GET", "p:1", wait=30))
            key, token = await take_one(p, block_ms=10_000)
            assert await p.call(*protocol.fill(key, token, "old", version="aa")) == 1
            assert await first == b"old"
            assert await p.call(*protocol.switch_version("p", "bb", "two")) == "OK"
            assert await resp(port, "GET", "p:1", wait=30) == b"old"  # the replaced version
            key, token = await take_one(p, block_ms=10_000)
            assert await p.call(*protocol.fill(key, token, "new", version="bb")) == 1
            assert await resp(port, "GET", "p:1", wait=30) == b"new"
            assert await p.call(*protocol.switch_version("p", "cc", "three")) == "OK"
            assert await p.call(*protocol.register("p", "p:*", version="dd", version_stale_ms=9)) == "OK"
            await p.close()
    finally:
        server.stop()
    text = vlog.read_text()
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]


async def test_under_maxmemory_volatile_lfu_evicts_answers_never_contexts(kind: str, tmp_path: Path) -> None:
    """Contexts have no TTL; computed values always have one (the keyspace's, or the worker's
    default): a server that evicts only keys with a TTL keeps every context."""
    server = RedisProcess(
        tmp_path / "mm",
        "--loadmodule",
        str(module_path()),
        "--maxmemory",
        "4mb",
        "--maxmemory-policy",
        "volatile-lfu",
        binary=binary(kind),
    )
    km = Keymiss(sweep_interval=0)

    @km.keyspace("big:*")  # no TTL of its own
    async def big(key: str) -> bytes:
        return b"x" * 20_000

    try:
        contexts = [f"keymiss:ctx:doc{i}" for i in range(50)]
        for c in contexts:
            assert await resp(server.port, "SET", c, "y" * 10_000) == "OK"
        async with running(km, url(server), default_ttl=3600):
            for i in range(400):  # 8 MB of answers through a 4 MB server
                got = await resp(server.port, "GET", f"big:{i}")
                assert got == b"x" * 20_000, got
            # the answers kept carry the default TTL (what lets either eviction take them); the
            # newest may have lost the module's admission contest (answered, not stored)
            kept = [i for i in range(400) if await resp(server.port, "EXISTS", f"big:{i}") == 1]
            ttls = [await resp(server.port, "TTL", f"big:{i}") for i in kept[-5:]]
            assert kept and all(0 < t <= 3600 for t in ttls), ttls
        for c in contexts:
            assert await resp(server.port, "EXISTS", c) == 1
        stats = (await resp(server.port, "INFO", "stats")) + (await resp(server.port, "INFO", "keymiss"))
        made_room = sum(
            int(m)
            for m in re.findall(rb"(?:evicted_keys|admission_evictions|admission_rejects):(\d+)", stats)
        )
        assert made_room > 0, stats
    finally:
        server.stop()


async def test_an_expired_value_is_computed_again_and_the_expiry_replicates(
    kind: str, tmp_path: Path
) -> None:
    """The filter's lookup must not serve, or half-delete, a value past its TTL."""
    primary = RedisProcess(tmp_path / "p", "--loadmodule", str(module_path()), binary=binary(kind))
    replica = RedisProcess(
        tmp_path / "r",
        "--loadmodule",
        str(module_path()),
        "--replicaof",
        "127.0.0.1",
        str(primary.port),
        binary=binary(kind),
    )
    try:

        async def linked() -> bool:
            return b"master_link_status:up" in await resp(replica.port, "INFO", "replication")

        await aeventually(linked, timeout=15)
        calls: list[str] = []
        async with running(make_app(calls), url(primary)):
            assert await resp(primary.port, "SET", "slow:brief", "old", "PX", "100") == "OK"
            assert await resp(primary.port, "GET", "slow:brief") == b"old"
            await asyncio.sleep(0.2)  # its TTL passes, unseen: no read may expire it first
            assert await resp(primary.port, "GET", "slow:brief") == b"value of slow:brief"
            assert calls == ["slow:brief"]
            await aeventually(
                lambda: resp(replica.port, "GET", "slow:brief"), expect=b"value of slow:brief", timeout=15
            )
            # a replica never computes: a missing key reads as missing there, at once
            assert await resp(replica.port, "GET", "slow:not-on-replica", wait=2) is None
    finally:
        replica.stop()
        primary.stop()


async def test_a_value_the_server_will_not_store_fails_its_readers_at_once(kind: str, tmp_path: Path) -> None:
    """Over proto-max-bulk-len, or refused with -OOM: the readers get the reason now, not a
    "did not compute" timeout later, and other keys go on being filled."""
    server = RedisProcess(
        tmp_path / "server",
        "--loadmodule",
        str(module_path()),
        "--proto-max-bulk-len",
        "1mb",
        "--maxmemory",
        "3mb",
        "--maxmemory-policy",
        "noeviction",
        binary=binary(kind),
    )
    km = Keymiss(sweep_interval=0)

    @km.keyspace("big:*")
    async def big(key: str) -> bytes:
        return b"x" * int(key.split(":")[1])

    try:
        # a share of all of maxmemory: the OOM path, not the one for values over the share
        async with running(km, url(server), max_value_share=1.0):
            t0 = time.monotonic()
            got = await resp(server.port, "GET", "big:2000000")
            assert isinstance(got, ReplyError) and "larger than the server's proto-max-bulk-len" in str(
                got
            ), got
            assert await resp(server.port, "GET", "big:10") == b"x" * 10
            for i in range(4):  # fill the server up to maxmemory (noeviction); the last SETs get -OOM
                await resp(server.port, "SET", f"ballast:{i}", "y" * 900_000)
            got = await resp(server.port, "GET", "big:900000")
            assert isinstance(got, ReplyError) and "refused to store the value: OOM" in str(got), got
            assert time.monotonic() - t0 < 5  # the module's timeout would be 60 s and more
    finally:
        server.stop()
