"""The module's protocol driven by hand, at its edges: databases, SWAPDB and flushes, stale
keyspaces, tokens of requeued keys, globs, huge MGETs, stalls, error texts, dying workers."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from ..support import ReplyError, RespTestClient, aeventually, resp
from .conftest import info_field, make_app, raw_worker, running, take_one, url

SLOW = protocol.register("s", "slow:*")

# --- found by trying to break it ------------------------------------------------------------------


async def test_a_fill_from_a_worker_in_another_database_lands_in_database_0(server: RedisProcess) -> None:
    from keymiss.errors import ConfigError
    from keymiss.valkey.topology import parse_url

    with pytest.raises(ConfigError, match="database 0"):
        parse_url(f"redis://127.0.0.1:{server.port}/1")
    w = await raw_worker(server.port, SLOW)
    assert await w.call("SELECT", "1") == "OK"
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:db"))
    key, token = await take_one(w)
    assert await w.call(*protocol.fill(key, token, "computed")) == 1
    assert await reader == b"computed"
    assert await resp(server.port, "GET", "slow:db") == b"computed"
    assert await w.call("GET", "slow:db") is None  # nothing in the worker's database 1
    await w.close()


@pytest.mark.parametrize("wholesale", [["SWAPDB", "0", "1"], ["FLUSHALL"], ["FLUSHDB"]])
async def test_swapdb_and_flushes_answer_pending_keys_and_store_nothing(
    server: RedisProcess, wholesale: list[str]
) -> None:
    w = await raw_worker(server.port, SLOW)
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:s"))
    key, token = await take_one(w)
    assert await w.call("SELECT", "1") == "OK"
    assert await w.call("SET", "slow:s", "client") == "OK"  # what SWAPDB brings into db 0
    assert await w.call("SELECT", "0") == "OK"
    assert await resp(server.port, *wholesale) == "OK"
    expected = b"client" if wholesale[0] == "SWAPDB" else None
    assert await w.call(*protocol.fill(key, token, "STALE")) == 0  # its reader gets it; not stored
    assert await asyncio.wait_for(reader, 5) == b"STALE"
    assert await w.call("EXISTS", "slow:s") == (1 if expected else 0)  # the stale fill stored nothing
    if expected:
        assert await w.call("GET", "slow:s") == expected
    await w.close()


async def test_a_keyspace_whose_workers_are_gone_never_shadows_a_live_one(server: RedisProcess) -> None:
    stale = await raw_worker(server.port, protocol.register("old", "slow:*"))
    await stale.close()
    await aeventually(lambda: info_field(server.port, "workers"), expect=0)
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        assert await resp(server.port, "GET", "slow:q1") == b"value of slow:q1"


async def test_a_live_keyspace_cannot_be_retargeted_by_another_connection(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        err = await resp(server.port, *protocol.register("slow:*", "*"))
        assert isinstance(err, ReplyError) and "another glob" in str(err)
        assert await resp(server.port, "GET", "session:nope") is None


async def test_keyspaces_nobody_serves_give_way_when_the_table_is_full(server: RedisProcess) -> None:
    for i in range(protocol.MAX_KEYSPACES + 2):
        got = await resp(server.port, *protocol.register(f"junk{i}", f"junk{i}:*"))
        assert got == "OK", got  # each from a connection that closes: no worker keeps it
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        assert await resp(server.port, "GET", "slow:after-junk") == b"value of slow:after-junk"


async def test_scripts_cannot_register_or_take(server: RedisProcess) -> None:
    for script in (
        f"return redis.call('{protocol.CMD_REGISTER}','lua','lua:*')",
        f"return redis.call('{protocol.CMD_TAKE}',1,0,1000)",
    ):
        assert isinstance(await resp(server.port, "EVAL", script, "0"), ReplyError)
    assert isinstance(await resp(server.port, "GET", "lua:1"), type(None))  # no keyspace was made


async def test_a_requeued_key_gets_a_new_token_so_only_its_current_taker_fills(server: RedisProcess) -> None:
    a = await raw_worker(server.port, SLOW)
    b = await raw_worker(server.port, SLOW)
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:tok"))
    key, old = await take_one(a, lease_ms=100)  # a 100 ms lease
    key2, new = await take_one(b)  # blocks until the lease has passed and the key is queued again
    assert key2 == key and new != old
    assert await a.call(*protocol.fill(key, old, "OLD")) == 0
    assert await b.call(*protocol.fill(key, new, "NEW")) == 1
    assert await reader == b"NEW"
    await a.close()
    await b.close()


@pytest.mark.parametrize(
    ("glob", "key"),
    [
        ("slow:*", "slow:x"),
        ("a?c", "abc"),
        ("a\\*b", "a*b"),
        ("a\\*b", "axb"),
        ("[a-c]x", "bx"),
        ("[^a]x", "ax"),
        ("[^a]x", "bx"),
        ("[b", "b"),
        ("[^", "*"),
        ("*[a?", "a"),
        ("[*-]^]", "?"),
        ("[*-]^]", "-"),
        ("[*-]^]", "\\"),
        ("[]a]", "a"),
        ("x[c-a]", "xb"),
        ("*a*a*a*b", "aaaaaaaaaaaaaaaaab"),
        ("*a*a*a*b", "aaaaaaaaaaaaaaaaaa"),
    ],
)
async def test_keyspace_globs_match_as_redis_keys_does(server: RedisProcess, glob: str, key: str) -> None:
    assert await resp(server.port, *protocol.register("g", glob)) == "OK"  # its connection closes
    await resp(server.port, "SELECT", "1")
    async with RespTestClient(server.port) as c:
        _, _, matches, _ = await c.call_many(
            [["SELECT", "1"], ["SET", key, "v"], ["KEYS", glob], ["FLUSHDB"]]
        )
    redis_matches = key.encode() in matches
    got = await resp(server.port, "GET", key)  # routed: "no worker"; not routed: a plain nil
    assert isinstance(got, ReplyError) == redis_matches, (glob, key, got)


# --- found by reading the module's code ---------------------------------------------------------


async def test_an_mget_naming_one_missing_key_100k_times_then_leaving_does_not_stall_the_server(
    server: RedisProcess,
) -> None:
    w = await raw_worker(server.port, SLOW)
    leaving = await RespTestClient(server.port).connect()
    mget = asyncio.ensure_future(leaving.call("MGET", *(["slow:same"] * 100_000)))
    await aeventually(lambda: info_field(server.port, "blocked_readers"), expect=1)
    await leaving.close()  # abandoning 100k slots of one entry: one pass, not 100k
    with contextlib.suppress(ConnectionError):
        await mget
    t0 = time.monotonic()
    assert await resp(server.port, "PING", wait=5) == "PONG"
    assert time.monotonic() - t0 < 0.5
    await w.close()


async def test_a_take_unblocked_right_after_a_stall_still_gets_its_reply(server: RedisProcess) -> None:
    """Redis 7.0 dropped the reply of a client unblocked in the loop iteration its server-side
    block timeout came due: a worker's TAKE, woken by a GET that ran after a long script."""
    w = await raw_worker(server.port, SLOW)
    taking = asyncio.ensure_future(w.call(*protocol.take(10, 1000, 30000)))
    await aeventually(lambda: client_blocked_on(server.port, protocol.CMD_TAKE))
    busy = (
        "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
        "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 > s + 1.5 return 1"
    )
    async with RespTestClient(server.port) as c:
        replies = asyncio.ensure_future(c.call_many([["EVAL", busy, "0"], ["GET", "slow:stalled"]], wait=10))
        taken = await asyncio.wait_for(taking, 10)
        assert taken and taken[0] == b"slow:stalled", taken
        assert await w.call(*protocol.fill(taken[0], taken[1], "v")) == 1
        assert await asyncio.wait_for(replies, 5) == [1, b"v"]
    await w.close()


async def client_blocked_on(port: int, command: str) -> bool:
    """Whether a client of the server is blocked (flag ``b``) in ``command``."""
    clients = (await resp(port, "CLIENT", "LIST")).decode().splitlines()
    return any(" flags=b " in f" {c} " and f" cmd={command.lower()} " in f" {c} " for c in clients)


async def test_a_workers_error_text_never_passes_for_a_redirect(server: RedisProcess) -> None:
    w = await raw_worker(server.port, SLOW)
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:evil"))
    key, token = await take_one(w)
    assert await w.call(*protocol.fail(key, token, "MOVED 0 evil:6379")) == 1
    got = await reader
    assert isinstance(got, ReplyError) and str(got) == "ERR MOVED 0 evil:6379"
    await w.close()


async def test_a_key_whose_workers_keep_dying_fails_after_three_tries(server: RedisProcess) -> None:
    reader = None
    for attempt in range(3):
        w = await raw_worker(server.port, protocol.register("s", "slow:doomed"))
        if reader is None:
            reader = asyncio.ensure_future(resp(server.port, "GET", "slow:doomed"))
        got = await w.call(*protocol.take(10, 2000, 10000))  # blocks until the key is queued (again)
        assert got and got[0] == b"slow:doomed", (attempt, got)
        await w.close()  # the worker dies holding it
    assert reader is not None
    err = await asyncio.wait_for(reader, 5)
    assert isinstance(err, ReplyError) and "lost the key's computation 3 times" in str(err)
