"""Defects found by attacking the module front end from outside, each pinned in real servers:
fill tokens that could be predicted, workers that one hung keyspace could starve, queues held by
computations nobody waits for, one value that wiped the cache, fills lost to a CLUSTERDOWN window,
a noisy shutdown, and credentials refused without a count."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keymiss import Keymiss
from keymiss.valkey import protocol
from keymiss.valkey.worker import Worker

from ..redis_servers import RedisProcess
from ..support import Gate, ReplyError, RespTestClient, aeventually, resp
from .conftest import (
    WORKER_APP_DIR,
    counter,
    has_workers,
    info_field,
    keyspace_info,
    keyspaces,
    make_app,
    raw_worker,
    running,
    take_one,
    url,
)

# --- fill tokens --------------------------------------------------------------------------------------

_MASK = (1 << 64) - 1
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _unshift(y: int, s: int) -> int:
    """The x with ``x ^ (x >> s) == y`` (64 bits)."""
    x = y
    for _ in range(64 // s + 1):
        x = y ^ (x >> s)
    return x & _MASK


def _mix(z: int) -> int:
    """splitmix64's finalizer, as the module once made its tokens (the top two bits cleared)."""
    z = ((z ^ (z >> 30)) * _C1) & _MASK
    z = ((z ^ (z >> 27)) * _C2) & _MASK
    return (z ^ (z >> 31)) & 0x3FFFFFFFFFFFFFFF


def _unmix(token: int) -> list[int]:
    """Every counter-plus-secret whose mixed value is ``token`` (its two cleared bits unknown)."""
    out = []
    for top in range(4):
        z = _unshift(token | (top << 62), 31)
        z = (z * pow(_C2, -1, 1 << 64)) & _MASK
        z = _unshift(z, 27)
        z = (z * pow(_C1, -1, 1 << 64)) & _MASK
        out.append(_unshift(z, 30))
    return out


def predicted_next(token: int, ahead: int = 16) -> set[int]:
    """The tokens that would follow ``token`` if tokens were a secret counter run through splitmix64:
    one observed token gives the secret away."""
    return {_mix((state + step) & _MASK) for state in _unmix(token) for step in range(1, ahead + 1)}


def test_the_predictor_predicts_splitmix64_tokens() -> None:
    secret = 0x1234_5678_9ABC_DEF0
    assert _mix(secret + 8) in predicted_next(_mix(secret + 7))


async def test_fill_tokens_are_unique_unordered_and_not_derived_from_one_another(
    server: RedisProcess,
) -> None:
    w = await raw_worker(server.port, protocol.register("t", "tok:*"))
    try:
        tokens = []
        for i in range(64):  # one key at a time: consecutive computations, consecutive tokens
            assert await w.call("EVAL", "return redis.call('GET', KEYS[1])", 1, f"tok:{i}") is None
            reply = await w.call(*protocol.take(10, 0, 10_000))
            assert len(reply) == 2, reply
            tokens.append(int(reply[1]))
        assert len(set(tokens)) == len(tokens)
        assert all(0 < t < 1 << 63 for t in tokens)
        steps = {b - a for a, b in itertools.pairwise(tokens)}
        assert len(steps) == len(tokens) - 1, "tokens advance by a constant step"
        assert tokens != sorted(tokens)
        for before, after in itertools.pairwise(tokens):
            assert after not in predicted_next(before), "the next token follows from the one before"
    finally:
        await w.close()


# --- fair workers ---------------------------------------------------------------------------------


def hung_app(gate: Gate) -> Keymiss:
    """``hung1:*`` and ``hung2:*`` hold every key until the gate opens; ``fast:*`` answers at once."""
    km = Keymiss(sweep_interval=0)

    async def hung(key: str) -> str:
        await gate.hold(key)
        return "late"

    km.keyspace("hung1:*", timeout=60)(hung)
    km.keyspace("hung2:*", timeout=60)(hung)

    @km.keyspace("fast:*")
    async def fast(key: str) -> str:
        return f"fast {key}"

    return km


async def test_two_hung_keyspaces_leave_a_third_answering(server: RedisProcess) -> None:
    gate = Gate()
    port = server.port
    async with running(hung_app(gate), url(server), max_in_flight=24, batch=8) as worker:
        try:
            readers = [
                asyncio.ensure_future(resp(port, "MGET", *[f"hung{n}:{i}" for i in range(100)], wait=60))
                for n in (1, 2)
            ]

            async def held() -> bool:  # all but the third keyspace's reserve, nearly
                found = await keyspaces(port)
                return sum(int(found.get(p, {}).get("in_flight", 0)) for p in ("hung1:*", "hung2:*")) >= 16

            await aeventually(held, timeout=15)
            t0 = time.monotonic()
            got = await asyncio.wait_for(resp(port, "GET", "fast:1"), 5)
            took = time.monotonic() - t0
            assert got == b"fast fast:1"
            assert took < 0.5, took
            assert worker.reserve() == 4
            found = await keyspaces(port)  # the healthy keyspace's reserve was left to it
            assert sum(int(found[p]["in_flight"]) for p in ("hung1:*", "hung2:*")) <= 24 - 4
        finally:
            gate.open()
        assert [len(r) for r in await asyncio.gather(*readers)] == [100, 100]


async def test_take_limits_keyspaces_and_takes_them_in_turn(server: RedisProcess) -> None:
    w = await raw_worker(server.port, protocol.register("a", "a:*"), protocol.register("b", "b:*"))
    try:
        for key in ("a:0", "a:1", "a:2", "b:0", "b:1", "b:2"):  # queued from Lua: nobody waits
            assert await w.call("EVAL", "return redis.call('GET', KEYS[1])", 1, key) is None
        got = protocol.decode_take(await w.call(*protocol.take(10, 0, 10_000, {"a": 0, "gone": 5})))
        assert sorted(k for k, _ in got) == ["b:0", "b:1", "b:2"]
        got = protocol.decode_take(await w.call(*protocol.take(10, 0, 10_000, {"a": 2})))
        assert [k for k, _ in got] == ["a:0", "a:1"]
        # a keyspace limited to 0 is not waited for: the TAKE blocks its whole time
        t0 = time.monotonic()
        assert await w.call(*protocol.take(10, 300, 10_000, {"a": 0})) == []
        assert time.monotonic() - t0 >= 0.25
        bad = await w.call(*protocol.take(10, 0, 10_000, {"a": -1}))
        assert isinstance(bad, ReplyError) and protocol.OPT_LIMIT in str(bad)
        for key in ("a:3", "a:4", "b:3", "b:4"):
            assert await w.call("EVAL", "return redis.call('GET', KEYS[1])", 1, key) is None
        firsts = [protocol.decode_take(await w.call(*protocol.take(1, 0, 10_000)))[0][0][0] for _ in range(5)]
        assert {firsts[0], firsts[1]} == {"a", "b"} and {firsts[2], firsts[3]} == {"a", "b"}, firsts
    finally:
        await w.close()


async def test_a_full_queue_drops_computations_whose_readers_left_and_keeps_running_ones(
    server: RedisProcess,
) -> None:
    """Readers that GET distinct slow keys and disconnect no longer hold the queue: a new miss is
    queued (not BUSY), the computations nobody waits for are dropped before they start, and one
    already running is finished and its value kept."""
    port = server.port
    w = await raw_worker(port, protocol.register("drop:*", "drop:*", queue=4))
    try:
        first = await RespTestClient(port).connect()
        running_get = asyncio.ensure_future(first.call("GET", "drop:run"))
        run_key, run_token = await take_one(w)
        assert run_key == b"drop:run"
        leaving = [await RespTestClient(port).connect() for _ in range(3)]
        gets = [asyncio.ensure_future(c.call("GET", f"drop:{i}")) for i, c in enumerate(leaving)]
        await aeventually(lambda: info_field(port, "blocked_readers"), expect=4)
        for c in [first, *leaving]:
            await c.close()
        await asyncio.gather(running_get, *gets, return_exceptions=True)
        await aeventually(lambda: info_field(port, "blocked_readers"), expect=0)
        info = await keyspace_info(port, "drop:*")
        assert (info["queued"], info["in_flight"]) == ("3", "1")  # full: 3 + 1 of 4

        reader = asyncio.ensure_future(resp(port, "GET", "drop:new"))
        await aeventually(lambda: counter(port, "drop:*", "misses"), expect=5)
        taken = protocol.decode_take(await w.call(*protocol.take(10, 1000, 10_000)))
        assert [k for k, _ in taken] == ["drop:2", "drop:new"], taken  # drop:0 and drop:1 dropped
        assert await counter(port, "drop:*", "dropped") == 2
        token = dict(taken)["drop:new"]
        assert await w.call(*protocol.fill("drop:new", token, "computed")) == protocol.FILL_STORED
        assert await reader == b"computed"
        # the computation that was running when its reader left: finished, its value kept
        assert await w.call(*protocol.fill(run_key, run_token, "ran")) == protocol.FILL_STORED
        assert await resp(port, "GET", "drop:run") == b"ran"
    finally:
        await w.close()


# --- a quiet shutdown -------------------------------------------------------------------------------


async def test_sigterm_under_load_logs_the_abandoned_keys_once_and_no_tracebacks(
    server: RedisProcess, tmp_path: Path
) -> None:
    """``keymiss serve`` with keys computing past its grace: they are abandoned (the server hands
    them on) with one line that counts them, not one "Future exception was never retrieved"
    traceback per key."""
    port = server.port
    out = tmp_path / "serve.log"
    env = {
        **os.environ,
        "KEYMISS_TEST_CALLS": str(tmp_path / "calls.txt"),
        "KEYMISS_TEST_COMPUTE": "60",
        "PYTHONPATH": str(WORKER_APP_DIR),
    }
    command = [sys.executable, "-m", "keymiss", "serve", "--app", "worker_app:app"]
    command += ["--redis", f"redis://127.0.0.1:{port}", "--grace-seconds", "1"]
    with out.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    reader = await RespTestClient(port, timeout=120).connect()
    try:
        await aeventually(lambda: has_workers(port), timeout=30)
        keys = [f"slow:{i}" for i in range(120)]
        waiting = asyncio.ensure_future(reader.call("MGET", *keys))
        await aeventually(lambda: counter_gauge(port, "slow:*", "in_flight"), expect=len(keys), timeout=30)
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 60) is not None
        log = out.read_text()
        noise = (log.count("never retrieved"), log.count("Traceback"))
        assert noise == (0, 0), log[-1500:]
        counted = [line for line in log.splitlines() if "still computing" in line]
        assert len(counted) == 1, log[-1500:]
        assert f"{len(keys)} key(s) still computing" in counted[0], counted
        waiting.cancel()
    finally:
        proc.kill()
        proc.wait(10)
        await reader.close()


async def counter_gauge(port: int, pattern: str, name: str) -> int:
    """One of the keyspace ``pattern``'s INFO gauges (``protocol.INFO_GAUGES``)."""
    assert name in protocol.INFO_GAUGES, name
    return int((await keyspace_info(port, pattern)).get(name, 0))


# --- credentials refused ------------------------------------------------------------------------------


async def test_refused_credentials_are_counted_and_said(
    server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """NOPERM at REGISTER, WRONGPASS at AUTH, NOAUTH without a password: each refusal of a session
    counts in ``stats.auth_refusals`` (what a supervisor reads to give up) and is logged as such."""
    port = server.port
    cannot_register = ["on", ">pw", "~*", "-@all", "+" + protocol.CMD_TAKE.lower(), "+ping"]
    assert await resp(port, "ACL", "SETUSER", "noreg", *cannot_register) == "OK"
    urls = {
        "NOPERM": f"redis://noreg:pw@127.0.0.1:{port}",
        "WRONGPASS": f"redis://noreg:not-the-password@127.0.0.1:{port}",
    }
    for code, target in urls.items():
        caplog.clear()
        await refused(target, code, caplog)
    assert await resp(port, "CONFIG", "SET", "requirepass", "secret") == "OK"
    try:
        caplog.clear()
        await refused(f"redis://127.0.0.1:{port}", "NOAUTH", caplog)
    finally:
        async with RespTestClient(port, password="secret") as c:
            assert await c.call("CONFIG", "SET", "requirepass", "") == "OK"


async def refused(target: str, code: str, caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(make_app([]), target, block_ms=100)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await aeventually(lambda: worker.stats.auth_refusals >= 2, timeout=5, message=f"{code} is counted")
        assert not worker.stats.nodes
        said = [
            r.getMessage() for r in caplog.records if "refused the worker's credentials" in r.getMessage()
        ]
        assert said and code in said[0] and protocol.CMD_REGISTER.lower() in said[0].lower(), said
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)


# --- fair workers, however many keyspaces hang --------------------------------------------------------


def many_hung_app(gate: Gate, n: int) -> Keymiss:
    """``hung0:*`` … ``hung<n-1>:*`` hold every key until the gate opens; ``fast:*`` answers at once."""
    km = Keymiss(sweep_interval=0)

    async def hung(key: str) -> str:
        await gate.hold(key)
        return "late"

    for i in range(n):
        km.keyspace(f"hung{i}:*", timeout=60, queue=4096)(hung)

    @km.keyspace("fast:*")
    async def fast(key: str) -> str:
        return f"fast {key}"

    return km


@pytest.mark.parametrize("hung", [4, 6])
async def test_any_number_of_hung_keyspaces_leave_a_healthy_one_answering(
    server: RedisProcess, hung: int
) -> None:
    """Four hung keyspaces once held every slot (a quarter each): each keyspace keeps a reserve
    that the others cannot take, however many of them hang."""
    gate = Gate()
    port = server.port
    async with running(many_hung_app(gate, hung), url(server), max_in_flight=1024, batch=64) as worker:
        readers = [
            asyncio.ensure_future(resp(port, "MGET", *[f"hung{n}:{s}:{i}" for i in range(300)], wait=120))
            for n in range(hung)
            for s in range(4)
        ]
        try:
            await aeventually(lambda: worker._in_flight >= 1000, timeout=30)
            t0 = time.monotonic()
            got = await asyncio.wait_for(resp(port, "GET", "fast:1"), 3)
            took = time.monotonic() - t0
            assert got == b"fast fast:1"
            assert took < 0.5, took
        finally:
            for reader in readers:
                reader.cancel()
            gate.open()
            await asyncio.gather(*readers, return_exceptions=True)


async def test_one_busy_keyspace_uses_nearly_every_slot_while_the_others_are_idle(
    server: RedisProcess,
) -> None:
    gate = Gate()
    port = server.port
    async with running(many_hung_app(gate, 4), url(server), max_in_flight=256, batch=64) as worker:
        reader = asyncio.ensure_future(resp(port, "MGET", *[f"hung0:{i}" for i in range(400)], wait=120))
        try:
            # the four idle keyspaces keep their reserves, no more
            await aeventually(lambda: worker._in_flight >= 256 - 4 * worker.reserve(), timeout=15)
            assert worker._in_flight <= 256 - 4 * worker.reserve()
            assert worker.reserve() <= 8
        finally:
            gate.open()
        assert len(await reader) == 400
