"""The module front end against writes and deletes meant to break the read contract
(docs/architecture.md), in Redis 7.0 and Valkey 9: a client's write to a versioned keyspace is
never replaced by a computation, however many keys it wrote at once and whatever bytes it wrote;
a delete that never runs (refused, discarded, sent in another database) does not keep a computed
value from being stored, where the server tells the module who sent it; the counters mean what
the Python server's do."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from keymiss import Keymiss
from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from ..support import Gate, ReplyError, RespTestClient, aeventually, resp
from .conftest import counter, keyspace_info, make_app, raw_worker, running, take_one, url
from .test_contract_fixes import Versions, loaded, switch, versioned

OLD_NOTE_CAP = 100_000  # the client writes an earlier module noted per tick at most


async def companion_of(port: int, key: str) -> bytes | None:
    """The companion key of ``key`` (its name has the tag of the key's slot)."""
    names = await resp(port, "KEYS", f"{protocol.COMPANION_PREFIX}*}}{key}")
    return names[0] if names else None


async def record_of(port: int, key: str) -> bytes | None:
    name = await companion_of(port, key)
    return None if name is None else await resp(port, "GET", name)


# --- a client's writes to a versioned keyspace --------------------------------------------------


async def test_every_key_of_a_huge_mset_stays_the_clients(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    async with running(versioned(versions, calls), url(server)):
        n = OLD_NOTE_CAP + 100
        args: list[bytes] = []
        for i in range(n):
            args += [b"ans:m%06d" % i, b"client %d" % i]
        async with RespTestClient(server.port, timeout=30) as c:
            assert await c.call("MSET", *args) == "OK"
        last = f"ans:m{n - 1:06d}"  # written after the first OLD_NOTE_CAP keys
        assert await resp(server.port, "GET", last) == b"client %d" % (n - 1)  # served while noted
        assert calls == []

        async def marked() -> bytes | None:  # the tick works through every note, a share at a time
            return await record_of(server.port, last)

        record = await aeventually(marked, message="the last key's companion is written", timeout=10)
        assert record is not None and record.endswith(b":")  # a client's record: no version
        await switch(server, versions, "v2")
        assert await resp(server.port, "MGET", "ans:m000000", last) == [b"client 0", b"client %d" % (n - 1)]
        assert calls == []


async def test_a_clients_set_of_the_computed_bytes_is_the_clients(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    async with running(versioned(versions, calls, ttl=2), url(server)):
        assert await resp(server.port, "GET", "ans:c") == b"ans:c by v1"
        assert await resp(server.port, "SET", "ans:c", "ans:c by v1") == "OK"  # the same bytes, no TTL

        async def clients_record() -> bool:
            record = await record_of(server.port, "ans:c")
            return record is not None and record.endswith(b":")

        await aeventually(clients_record, message="the companion marks a client's write")
        name = await companion_of(server.port, "ans:c")
        assert await resp(server.port, "PTTL", name) == -1  # as the value: it outlives the old TTL
        await switch(server, versions, "v2")
        assert await resp(server.port, "GET", "ans:c") == b"ans:c by v1"  # the client's, served
        assert calls == ["ans:c"]


async def test_a_value_computed_after_a_clients_delete_keeps_its_version(server: RedisProcess) -> None:
    versions, calls = Versions(), list[str]()
    async with running(versioned(versions, calls), url(server)):
        assert await resp(server.port, "GET", "ans:zz") == b"ans:zz by v1"
        n = 20_000  # notes ahead of ans:zz's (the tick takes them in key order, a share a tick)
        args: list[bytes] = []
        for i in range(n):
            args += [b"ans:m%06d" % i, b"client"]
        async with RespTestClient(server.port, timeout=30) as c:
            assert await c.call("MSET", *args) == "OK"
            assert await c.call("DEL", "ans:zz") == 1  # noted: a client's write
            assert await c.call("GET", "ans:zz") == b"ans:zz by v1"  # computed, stored while noted

        async def behind() -> bytes | None:  # every note before ans:zz's is worked through
            return await record_of(server.port, f"ans:m{n - 1:06d}")

        await aeventually(behind, timeout=10)
        record = await record_of(server.port, "ans:zz")
        assert record is not None and not record.endswith(b":"), record  # the computed value's record
        await switch(server, versions, "v2")
        assert await resp(server.port, "GET", "ans:zz") == b"ans:zz by v2"
        assert calls == ["ans:zz", "ans:zz", "ans:zz"]


async def test_another_connections_companion_write_keeps_the_clients_value(server: RedisProcess) -> None:
    """Only the writer of a value, in the same script, may leave its own record beside it: a later
    write of the companion from another connection (garbage here) is no record of the value."""
    versions, calls = Versions(), list[str]()
    async with running(versioned(versions, calls), url(server)):
        n = 20_000  # notes ahead of ans:zz's: the tick reaches it after the garbage is written
        args: list[bytes] = []
        for i in range(n):
            args += [b"ans:m%06d" % i, b"client"]
        async with RespTestClient(server.port, timeout=30) as c:
            assert await c.call("MSET", *args) == "OK"
            assert await c.call("SET", "ans:zz", "client's") == "OK"
        name = protocol.companion_key(b"ans:zz")
        assert await resp(server.port, "SET", name, "garbage") == "OK"  # another connection

        async def rewritten() -> bool:  # the tick wrote the client's record over the garbage
            record = await record_of(server.port, "ans:zz")
            return record is not None and record.endswith(b":")

        await aeventually(rewritten, message="the companion marks a client's write", timeout=10)
        await switch(server, versions, "v2")
        assert await resp(server.port, "GET", "ans:zz") == b"client's"
        assert calls == []


# --- a delete that never runs supersedes nothing ------------------------------------------------


async def computed_despite(
    server: RedisProcess, *commands: list[str], user: tuple[str, str] | None = None
) -> None:
    """``commands`` sent on one connection (as ``user``) while ``slow:w`` computes: none of them
    deletes it, so the computed value is stored and the next read is a hit."""
    calls: list[str] = []
    gate = Gate()
    async with running(make_app(calls, gate=gate), url(server)) as worker:
        reader = asyncio.ensure_future(resp(server.port, "GET", "slow:w"))
        await gate.wait_started()
        async with RespTestClient(server.port) as c:
            if user is not None:
                assert await c.call("AUTH", *user) == "OK"
            for command in commands:
                await c.call(*command)
        gate.open()
        assert await reader == b"value of slow:w"
        await aeventually(lambda: worker.stats.fills, expect=1)
        assert await resp(server.port, "GET", "slow:w") == b"value of slow:w"  # stored
        assert calls == ["slow:w"]
        assert await counter(server.port, "slow:*", "superseded") == 0


async def test_a_getdel_of_the_wrong_arity_supersedes_nothing(server: RedisProcess) -> None:
    await computed_despite(server, ["GETDEL", "slow:w", "extra"])


def needs_client_id(kind: str) -> None:
    if kind == "redis":  # Redis 7.0's filter cannot tell who sent a command (no CommandFilterGetClientId)
        pytest.skip("Redis 7.0 does not tell a command filter its client")


@pytest.mark.parametrize("end", ["DISCARD", "EXEC-aborted"])
async def test_a_delete_queued_in_a_transaction_supersedes_nothing(
    server: RedisProcess, kind: str, end: str
) -> None:
    needs_client_id(kind)
    if end == "DISCARD":
        await computed_despite(server, ["MULTI"], ["DEL", "slow:w"], ["DISCARD"])
    else:  # WATCH of another key that changes: EXEC runs nothing
        await computed_despite(
            server, ["WATCH", "other"], ["SET", "other", "x"], ["MULTI"], ["DEL", "slow:w"], ["EXEC"]
        )


async def test_a_delete_refused_by_acl_supersedes_nothing(server: RedisProcess, kind: str) -> None:
    needs_client_id(kind)
    assert await resp(server.port, "ACL", "SETUSER", "reader", "on", ">pw", "~other*", "+@all") == "OK"
    await computed_despite(
        server, ["DEL", "slow:w"], ["UNLINK", "slow:w"], ["GETDEL", "slow:w"], user=("reader", "pw")
    )


async def test_a_delete_in_another_database_supersedes_nothing(server: RedisProcess, kind: str) -> None:
    needs_client_id(kind)
    await computed_despite(server, ["SELECT", "1"], ["DEL", "slow:w"], ["GETDEL", "slow:w"])


async def test_a_delete_that_runs_still_supersedes(server: RedisProcess) -> None:
    calls: list[str] = []
    gate = Gate()
    async with running(make_app(calls, gate=gate), url(server)) as worker:
        reader = asyncio.ensure_future(resp(server.port, "GET", "slow:w"))
        await gate.wait_started()
        assert await resp(server.port, "DEL", "slow:w") == 0
        gate.open()
        assert await reader == b"value of slow:w"
        await aeventually(lambda: worker.stats.discarded, expect=1)
        assert await resp(server.port, "EXISTS", "slow:w") == 0
        assert await counter(server.port, "slow:*", "superseded") == 1


async def test_a_read_in_another_database_refreshes_nothing_of_database_0(
    server: RedisProcess, kind: str
) -> None:
    needs_client_id(kind)
    calls: list[str] = []
    km = Keymiss(sweep_interval=0)

    @km.keyspace("sdb:*", ttl=0.3, stale=60)
    async def sdb(key: str) -> str:
        calls.append(key)
        return f"{key} #{len(calls)}"

    async with running(km, url(server)):
        assert await resp(server.port, "GET", "sdb:h") == b"sdb:h #1"
        await asyncio.sleep(0.4)  # past the TTL, inside the stale window (real server time)
        async with RespTestClient(server.port) as c:
            assert await c.call("SELECT", "1") == "OK"
            assert await c.call("GET", "sdb:h") is None  # database 1 has no such key
        assert await counter(server.port, "sdb:*", "stale_hits") == 0  # and refreshed nothing
        assert calls == ["sdb:h"]
        assert await resp(server.port, "GET", "sdb:h") == b"sdb:h #1"  # database 0: served stale
        await aeventually(lambda: len(calls), expect=2)  # while one refresh runs
        assert not isinstance(await resp(server.port, "PING"), ReplyError)


# --- the counters mean what the Python server's do ----------------------------------------------


async def test_computations_and_errors_count_what_the_function_did(server: RedisProcess) -> None:
    """``computations``: keys the function computed a value for; ``errors``: keys it failed; a key
    that does not fit its template ran nothing and counts in neither (as keymiss.stats says)."""
    km = Keymiss(sweep_interval=0)

    @km.keyspace("tpl:<a>_<b>", ttl=30)
    async def tpl(a: str, b: str) -> str:
        if a == "bad":
            raise ValueError("no answer")
        return f"{a}+{b}"

    async with running(km, url(server)):
        misfits = [f"tpl:nofields{i}" for i in range(8)]
        assert await resp(server.port, "MGET", *misfits) == [None] * 8
        assert isinstance(await resp(server.port, "GET", "tpl:nofields"), ReplyError)
        assert isinstance(await resp(server.port, "GET", "tpl:bad_1"), ReplyError)
        assert await resp(server.port, "GET", "tpl:x_y") == b"x+y"
        info = await keyspace_info(server.port, "tpl:<a>_<b>")
        assert (info["computations"], info["errors"]) == ("1", "1"), info


async def test_a_key_without_a_worker_is_no_computation(kind: str, tmp_path: Path) -> None:
    proc = loaded(kind, tmp_path, protocol.OPT_GRACE, "100", protocol.OPT_KEYSPACE, "none:*")
    try:  # the reader waits GRACE for a worker, then is refused: nothing was computed
        assert isinstance(await resp(proc.port, "GET", "none:k"), ReplyError)
        info = await keyspace_info(proc.port, "none:*")
        assert info["computations"] == "0" and int(info["no_worker"]) >= 1, info
    finally:
        proc.stop()


# --- a version is switched by a worker, and a computation chases it at most twice ----------------


async def test_only_a_worker_of_the_keyspace_switches_its_version(server: RedisProcess) -> None:
    w = await raw_worker(server.port, protocol.register("v", "v:*", version="aa"))
    try:
        refused = await resp(server.port, *protocol.switch_version("v", "bb", "two"))
        assert isinstance(refused, ReplyError) and "REGISTER" in str(refused), refused
        assert (await keyspace_info(server.port, "v"))["version"] == "aa"
        assert await w.call(*protocol.switch_version("v", "bb", "two")) == "OK"
        assert (await keyspace_info(server.port, "v"))["version"] == "two"
    finally:
        await w.close()


async def test_a_fill_discarded_twice_for_its_version_fails_its_reader(server: RedisProcess) -> None:
    """A worker that computes under another version than the server's: its first fill is computed
    again, its second fails the reader (who would otherwise wait while the key is recomputed)."""
    w = await raw_worker(server.port, protocol.register("v", "v:*", version="aa"))
    try:
        reading = asyncio.ensure_future(resp(server.port, "GET", "v:1", wait=30))
        for _ in range(2):
            key, token = await take_one(w, block_ms=10_000)
            assert await w.call(*protocol.fill(key, token, "stale", version="zz")) == 0
        answer = await reading
        assert isinstance(answer, ReplyError) and "version changed" in str(answer), answer
        assert await w.call(*protocol.take(10, 100, 10_000)) in ([], None)  # not queued again
        assert int((await keyspace_info(server.port, "v"))["version_discards"]) == 2
    finally:
        await w.close()
