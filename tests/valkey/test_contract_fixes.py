"""Rows of the read contract (docs/architecture.md) the module front end holds, in Redis 7.0 and
Valkey 9: a key event counts by what it does (a TTL change, an expiry or an eviction is no
client's write), a client's write during a computation leaves the computed value to its readers
unstored, a key that does not fit its template is an error naming it, and a keyspace without a
worker (declared at load, or whose last worker went) makes its readers wait ``GRACE`` for one."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keymiss import Keymiss
from keymiss.errors import KeyMismatchError, error_line
from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path

from ..redis_servers import RedisProcess
from ..support import Gate, ReplyError, RespTestClient, aeventually, resp
from .conftest import (
    binary,
    counter,
    has_workers,
    info_field,
    keyspace_info,
    make_app,
    raw_worker,
    running,
    start_worker_process,
    take_one,
    url,
    valgrind_valkey,
)

NO_WORKER = "ERR keymiss: no worker for keyspace 'slow:*'"


class Versions:
    """A keyspace's version source the test switches."""

    def __init__(self) -> None:
        self.current = "v1"

    def __call__(self) -> str:
        return self.current


def versioned(versions: Versions, calls: list[str], *, ttl: float = 60, gate: Gate | None = None) -> Keymiss:
    """``ans:*``, versioned by ``versions``; with a ``gate``, computations under v2 are held."""
    km = Keymiss(sweep_interval=0)

    @km.keyspace("ans:*", ttl=ttl, version=versions)
    async def answer(key: str) -> str:
        version = versions.current
        calls.append(key)
        if gate is not None and version != "v1":
            await gate.hold(key)
        return f"{key} by {version}"

    return km


async def switch(server: RedisProcess, versions: Versions, version: str) -> None:
    """Switch the workers' version and wait until the server has it."""
    versions.current = version

    async def server_version() -> str | None:
        return (await keyspace_info(server.port, "ans:*")).get("version")

    await aeventually(server_version, expect=version, timeout=3)


def loaded(kind: str, tmp_path: Path, *args: str) -> RedisProcess:
    """A server whose module is loaded with ``args`` (GRACE, KEYSPACE)."""
    return RedisProcess(
        tmp_path / "server", "--loadmodule", str(module_path()), *args, binary=binary(kind), log=True
    )


@pytest.fixture
def graced(kind: str, tmp_path: Path) -> Iterator[RedisProcess]:
    """``slow:*`` declared at load, misses waiting half a second for a worker."""
    proc = loaded(kind, tmp_path, protocol.OPT_GRACE, "500", protocol.OPT_KEYSPACE, "slow:*")
    yield proc
    proc.stop()


async def blocked(port: int) -> int:
    """Clients blocked now (CLIENT LIST's flag ``b``)."""
    text = (await resp(port, "CLIENT", "LIST")).decode()
    return sum("b" in line.split(" flags=", 1)[1].split(" ", 1)[0] for line in text.splitlines())


# --- key events by what they do ------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        ["EXPIRE", "ans:t", "100"],
        ["PEXPIRE", "ans:t", "100000"],
        ["PERSIST", "ans:t"],
        ["GETEX", "ans:t", "EX", "100"],
    ],
)
async def test_a_ttl_change_keeps_the_version_mark(server: RedisProcess, change: list[str]) -> None:
    versions, calls = Versions(), list[str]()
    async with running(versioned(versions, calls), url(server)):
        assert await resp(server.port, "GET", "ans:t") == b"ans:t by v1"
        assert not isinstance(await resp(server.port, *change), ReplyError)
        await switch(server, versions, "v2")
        assert await resp(server.port, "GET", "ans:t") == b"ans:t by v2"  # not served as a client's
        assert calls == ["ans:t", "ans:t"]


@pytest.mark.parametrize(
    ("change", "expect"), [(["PERSIST", "ans:r"], -1), (["EXPIRE", "ans:r", "500"], 500)]
)
async def test_a_ttl_change_gives_the_companion_the_values_ttl(
    server: RedisProcess, change: list[str], expect: int
) -> None:
    versions, calls = Versions(), list[str]()
    async with running(versioned(versions, calls), url(server)):
        assert await resp(server.port, "GET", "ans:r") == b"ans:r by v1"
        (companion,) = await resp(server.port, "KEYS", f"{protocol.COMPANION_PREFIX}*}}ans:r")
        assert 0 < await resp(server.port, "TTL", companion) <= 60
        assert await resp(server.port, *change) == 1

        async def companion_ttl() -> int:  # the tick's work: the version mark lives as the value does
            return int(await resp(server.port, "TTL", companion))

        await aeventually(companion_ttl, expect=expect)
        assert await resp(server.port, "GET", "ans:r") == b"ans:r by v1" and calls == ["ans:r"]


@pytest.mark.parametrize("change", [["EXPIRE", "ans:d", "100"], ["PERSIST", "ans:d"]])
async def test_a_ttl_change_during_a_recomputation_supersedes_nothing(
    server: RedisProcess, change: list[str]
) -> None:
    versions, calls, gate = Versions(), list[str](), Gate()
    async with running(versioned(versions, calls, gate=gate), url(server)) as worker:
        assert await resp(server.port, "GET", "ans:d") == b"ans:d by v1"
        await switch(server, versions, "v2")
        reader = asyncio.ensure_future(resp(server.port, "GET", "ans:d"))  # the v1 value is hidden
        await gate.wait_started()
        assert await resp(server.port, *change) == 1  # of the hidden v1 value
        gate.open()
        assert await reader == b"ans:d by v2"
        await aeventually(lambda: worker.stats.fills, expect=2)
        assert await resp(server.port, "GET", "ans:d") == b"ans:d by v2"  # stored
        assert calls == ["ans:d", "ans:d"]
        assert await counter(server.port, "ans:*", "superseded") == 0


async def test_an_expiry_during_a_recomputation_is_no_clients_write(server: RedisProcess) -> None:
    versions, calls, gate = Versions(), list[str](), Gate()
    async with running(versioned(versions, calls, ttl=1, gate=gate), url(server)) as worker:
        assert await resp(server.port, "GET", "ans:e") == b"ans:e by v1"
        await switch(server, versions, "v2")
        reader = asyncio.ensure_future(resp(server.port, "GET", "ans:e", wait=20))
        await gate.wait_started()

        async def expired() -> bool:  # EXISTS expires it (the "expired" event), as the server's cycle would
            return await resp(server.port, "EXISTS", "ans:e") == 0

        await aeventually(expired, timeout=5)
        gate.open()
        assert await reader == b"ans:e by v2"  # not nil
        await aeventually(lambda: worker.stats.fills, expect=2)
        assert await resp(server.port, "GET", "ans:e") == b"ans:e by v2"  # stored: not computed again
        assert calls == ["ans:e", "ans:e"]


# --- a client's write during a computation -------------------------------------------------------

WRITES: dict[str, tuple[list[list[Any]], bytes | None]] = {
    # the commands, and what the key holds afterwards
    "set": ([["SET", "slow:w", "client"]], b"client"),
    "del": ([["SET", "slow:w", "x"], ["DEL", "slow:w"]], None),
    "unlink": ([["SET", "slow:w", "x"], ["UNLINK", "slow:w"]], None),
    "getdel": ([["SET", "slow:w", "x"], ["GETDEL", "slow:w"]], None),
    "del-absent": ([["DEL", "slow:w"]], None),  # a delete of the missing key: no keyspace event
    "unlink-absent": ([["UNLINK", "slow:w"]], None),
    "getdel-absent": ([["GETDEL", "slow:w"]], None),
    "rename": ([["SET", "other", "renamed"], ["RENAME", "other", "slow:w"]], b"renamed"),
    "flushall": ([["FLUSHALL"]], None),
    "flushdb": ([["FLUSHDB"]], None),
    "swapdb": ([["SWAPDB", "0", "1"]], None),
}


@pytest.mark.parametrize("write", sorted(WRITES))
async def test_a_clients_write_during_the_computation_leaves_its_value_unstored(
    server: RedisProcess, write: str
) -> None:
    commands, after = WRITES[write]
    calls: list[str] = []
    gate = Gate()
    async with running(make_app(calls, gate=gate), url(server)) as worker:
        readers = [asyncio.ensure_future(resp(server.port, "GET", "slow:w")) for _ in range(3)]
        await gate.wait_started()
        async with RespTestClient(server.port) as c:
            for command in commands:
                assert not isinstance(await c.call(*command), ReplyError), command
        gate.open()
        assert await asyncio.gather(*readers) == [b"value of slow:w"] * 3  # the computed value
        await aeventually(lambda: worker.stats.discarded, expect=1)
        assert await resp(server.port, "GET", "slow:w") == (after or b"value of slow:w")
        # the client's write stays; after a delete nothing was stored, and the next read computes
        assert calls == (["slow:w"] if after else ["slow:w", "slow:w"])
        assert await counter(server.port, "slow:*", "superseded") == 1


# --- an MGET that waits answers its other keys as they were -------------------------------------


async def test_an_mget_that_waits_answers_a_stale_key_as_it_was_read(server: RedisProcess) -> None:
    calls: dict[str, int] = {}
    gate = Gate()
    km = Keymiss(sweep_interval=0)

    @km.keyspace("st:*", ttl=0.2, stale=30)
    async def stale(key: str) -> str:
        calls[key] = calls.get(key, 0) + 1
        return f"{key}#{calls[key]}"

    @km.keyspace("held:*", ttl=30)
    async def held(key: str) -> str:
        await gate.hold(key)
        return f"value of {key}"

    async with running(km, url(server)):
        assert await resp(server.port, "GET", "st:a") == b"st:a#1"

        async def past_ttl() -> bool:  # inside the stale window: served, and refreshed
            return bool(0 < await resp(server.port, "PTTL", "st:a") < 30_000 - 5)

        await aeventually(past_ttl)
        mget = asyncio.ensure_future(resp(server.port, "MGET", "st:a", "held:m"))
        await gate.wait_started()
        await aeventually(lambda: calls["st:a"], expect=2)  # the MGET's refresh ran ...

        async def refreshed() -> bytes:
            return bytes(await resp(server.port, "GET", "st:a"))

        await aeventually(refreshed, expect=b"st:a#2")  # ... and is stored while the MGET waits
        gate.open()
        assert await mget == [b"st:a#1", b"value of held:m"]  # as a GET at the MGET's time answered


# --- a key that does not fit its template --------------------------------------------------------


async def test_a_key_that_does_not_fit_its_template_is_an_error_naming_it(server: RedisProcess) -> None:
    calls: list[str] = []
    km = Keymiss(sweep_interval=0)

    @km.keyspace("tpl:<a>_<b>", ttl=30)
    async def tpl(a: str, b: str) -> str:
        calls.append(f"{a}/{b}")
        return f"{a}+{b}"

    ks = km.registry.get("tpl:<a>_<b>")
    assert ks is not None
    with pytest.raises(KeyMismatchError) as mismatch:
        ks.argument("tpl:nofields")
    async with running(km, url(server)):
        assert await resp(server.port, "GET", "tpl:x_y") == b"x+y"
        got = await resp(server.port, "GET", "tpl:nofields")
        assert isinstance(got, ReplyError) and str(got) == error_line(mismatch.value), (
            got
        )  # as the engine says
        assert "tpl:<a>_<b>" in str(got)
        assert await resp(server.port, "GET", "tpx:other") is None  # not the template's: a plain nil
        assert calls == ["x/y"]


# --- keyspaces without a worker ------------------------------------------------------------------


async def test_a_declared_keyspace_waits_grace_for_a_worker_then_says_none(graced: RedisProcess) -> None:
    assert "slow:*" in (await resp(graced.port, "INFO", protocol.INFO_SECTION)).decode()  # before any worker
    t0 = time.monotonic()
    got = await resp(graced.port, "GET", "slow:early")
    waited = time.monotonic() - t0
    assert isinstance(got, ReplyError) and str(got) == NO_WORKER, got  # never nil
    assert 0.4 <= waited < 3, waited
    assert await resp(graced.port, "MGET", "slow:early", "plain") == [None, None]  # an MGET's failed key
    async with RespTestClient(graced.port) as c:  # where blocking is forbidden: refused at once
        got = await c.call_many([["MULTI"], ["GET", "slow:tx"], ["EXEC"]], wait=2)
        assert got[:2] == ["OK", "QUEUED"] and str(got[2][0]) == NO_WORKER, got
    assert await resp(graced.port, "GET", "other:key") is None  # no keyspace: a plain GET


async def test_a_miss_before_any_worker_gets_the_value_when_one_registers(kind: str, tmp_path: Path) -> None:
    server = loaded(kind, tmp_path, protocol.OPT_KEYSPACE, "slow:*", protocol.OPT_GRACE, "10000")
    try:
        reader = asyncio.ensure_future(resp(server.port, "GET", "slow:first", wait=20))
        await aeventually(lambda: blocked(server.port), expect=1)
        calls: list[str] = []
        async with running(make_app(calls, compute=0.05), url(server)):
            assert await reader == b"value of slow:first"
            assert calls == ["slow:first"]
            info = await keyspace_info(server.port, "slow:*")
            assert info["workers"] == "1" and info["computations"] == "1", info
    finally:
        server.stop()


async def test_the_modules_arguments_are_checked(kind: str, tmp_path: Path) -> None:
    for i, args in enumerate([("GRACE",), ("GRACE", "-1"), ("KEYSPACE",), ("FAST", "1")]):
        with pytest.raises(RuntimeError, match="exited"):  # the module refuses to load
            loaded(kind, tmp_path / str(i), *args)


async def test_a_dead_worker_is_seen_within_grace(graced: RedisProcess, tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    log.touch()
    proc = start_worker_process(graced.port, log, compute=60)
    try:
        await aeventually(lambda: has_workers(graced.port), timeout=15)
        reader = asyncio.ensure_future(resp(graced.port, "GET", "slow:dying", wait=30))
        await aeventually(lambda: log.read_text().split(), expect=["slow:dying"], timeout=15)
        os.kill(proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        got = await reader
        assert isinstance(got, ReplyError) and str(got) == NO_WORKER, got  # not the keyspace's deadline
        assert time.monotonic() - t0 < 3
        t0 = time.monotonic()
        got = await resp(graced.port, "GET", "slow:after")
        assert isinstance(got, ReplyError) and str(got) == NO_WORKER, got  # new misses too
        assert time.monotonic() - t0 < 3
    finally:
        proc.kill()
        proc.wait(10)


async def test_readers_of_a_dead_worker_get_the_value_when_another_takes_over(
    graced: RedisProcess, tmp_path: Path
) -> None:
    log = tmp_path / "calls.txt"
    log.touch()
    proc = start_worker_process(graced.port, log, compute=60)
    try:
        await aeventually(lambda: has_workers(graced.port), timeout=15)
        reader = asyncio.ensure_future(resp(graced.port, "GET", "slow:handover", wait=30))
        await aeventually(lambda: log.read_text().split(), expect=["slow:handover"], timeout=15)
        calls: list[str] = []
        async with running(make_app(calls, compute=0.05), url(graced)):
            os.kill(proc.pid, signal.SIGKILL)  # the other worker takes the key it held
            assert await reader == b"value of slow:handover"
            assert calls == ["slow:handover"]
    finally:
        proc.kill()
        proc.wait(10)


# --- the same paths under valgrind ----------------------------------------------------------------


async def test_the_contract_paths_run_clean_under_valgrind(tmp_path: Path) -> None:
    """Declared keyspaces, misses waiting GRACE and failing, a worker gone while it holds a key, and
    client writes during computations (waiters answered, nothing stored), with every allocation seen."""
    server, vlog = valgrind_valkey(
        tmp_path, protocol.OPT_GRACE, "300", protocol.OPT_KEYSPACE, "w:*", protocol.OPT_KEYSPACE, "t:<a>_<b>"
    )
    port, wait = server.port, 60.0
    try:
        # before any worker: a GET and an MGET wait GRACE, then the no-worker error (MGET: nil)
        got = await asyncio.gather(
            resp(port, "GET", "w:1", wait=wait), resp(port, "MGET", "w:1", "t:x", wait=wait)
        )
        assert str(got[0]) == "ERR keymiss: no worker for keyspace 'w:*'" and got[1] == [None, None], got
        # a worker registers while a reader waits; then goes away holding the key: the reader's
        # key is requeued, and fails GRACE later
        reader = asyncio.ensure_future(resp(port, "GET", "w:2", wait=wait))
        w = await raw_worker(port, protocol.register("w:*", "w:*"), wait=wait)
        key, _ = await take_one(w, block_ms=10_000)
        assert key == b"w:2"
        await w.close()
        assert "no worker" in str(await reader)
        # client writes during computations: the waiters get the value, nothing is stored
        w = await raw_worker(port, protocol.register("w:*", "w:*"), wait=wait)
        writes = [
            [["SET", "w:3", "client"]],
            [["SET", "w:3", "x"], ["DEL", "w:3"]],
            [["DEL", "w:3"]],
            [["FLUSHALL"]],
        ]
        for commands in writes:
            readers = [asyncio.ensure_future(resp(port, "GET", "w:3", wait=wait)) for _ in range(2)]
            key, token = await take_one(w, block_ms=10_000)
            await aeventually(lambda: info_field(port, "blocked_readers"), expect=2, timeout=wait)
            for command in commands:
                await resp(port, *command, wait=wait)
            assert await w.call(*protocol.fill(key, token, "computed")) == protocol.FILL_DISCARDED
            assert await asyncio.gather(*readers) == [b"computed"] * 2
            await resp(port, "DEL", "w:3", wait=wait)
        # an MGET that waits: its hit is read when it is decided
        assert await resp(port, "SET", "w:h", "h", wait=wait) == "OK"
        mget = asyncio.ensure_future(resp(port, "MGET", "w:h", "w:5", "none", wait=wait))
        key, token = await take_one(w, block_ms=10_000)
        assert await w.call(*protocol.fill(key, token, "five")) == protocol.FILL_STORED
        assert await mget == [b"h", b"five", None]
        # a computation nobody waits for (queued from Lua) is given up by a client's write
        assert await resp(port, "EVAL", "return redis.call('GET', KEYS[1])", 1, "w:4", wait=wait) is None
        key, token = await take_one(w, block_ms=10_000)
        assert await resp(port, "SET", "w:4", "mine", wait=wait) == "OK"
        assert await w.call(*protocol.fill(key, token, "late")) == protocol.FILL_DISCARDED
        assert await resp(port, "GET", "w:4", wait=wait) == b"mine"
        # deletes that never run (refused by the user's ACL, queued and discarded) supersede nothing
        assert (
            await resp(port, "ACL", "SETUSER", "narrow", "on", ">pw", "~other*", "+@all", wait=wait) == "OK"
        )
        reader = asyncio.ensure_future(resp(port, "GET", "w:6", wait=wait))
        key, token = await take_one(w, block_ms=10_000)
        async with RespTestClient(port, timeout=wait) as c:
            assert await c.call("AUTH", "narrow", "pw") == "OK"
            assert isinstance(await c.call("DEL", "w:6"), ReplyError)
            await c.call_many([["MULTI"], ["DEL", "w:6"], ["DISCARD"]])
        assert await w.call(*protocol.fill(key, token, "six")) == protocol.FILL_STORED
        assert await reader == b"six"
        # a key its template refuses: FAIL says so
        reader = asyncio.ensure_future(resp(port, "GET", "w:7", wait=wait))
        key, token = await take_one(w, block_ms=10_000)
        assert await w.call(*protocol.fail(key, token, "ERR misfit", protocol.OPT_MISMATCH)) == 1
        assert str(await reader) == "ERR misfit"
        # a versioned keyspace: a client's SET is noted; one written with its companion (in the same
        # script, naming the value's CRC) keeps that record
        v = await raw_worker(port, protocol.register("v:*", "v:*", version="v1"), wait=wait)
        record = protocol.companion(0, zlib.crc32(b"x"), "v1")
        await resp(port, "SET", "v:client", "mine", wait=wait)
        await resp(
            port,
            "EVAL",
            "redis.call('SET', KEYS[1], 'x') redis.call('SET', KEYS[2], ARGV[1])",
            2,
            "v:store",
            protocol.companion_key(b"v:store"),
            record,
            wait=wait,
        )
        await aeventually(
            lambda: resp(port, "EXISTS", protocol.companion_key(b"v:client")), expect=1, timeout=wait
        )
        assert await resp(port, "GET", protocol.companion_key(b"v:store"), wait=wait) == record
        await v.close()
        await w.close()
    finally:
        server.stop()
    text = vlog.read_text()
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]
