"""Workers of the module: processes killed or drained, reconnects, ACL users, a server without the
module, and how a worker's answers (a fast key beside a slow one, a BUSY) reach readers."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from keymiss import Keymiss
from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from ..support import Gate, ReplyError, RespTestClient, aeventually, resp
from .conftest import has_workers, make_app, raw_worker, running, start_worker_process, take_one, url


def logged(log: Path) -> list[str]:
    return log.read_text().splitlines()


async def test_kill_9_of_the_worker_holding_a_key_hands_it_to_another(
    server: RedisProcess, tmp_path: Path
) -> None:
    log = tmp_path / "calls.txt"
    log.touch()
    doomed = start_worker_process(server.port, log, compute=30)
    try:
        await aeventually(lambda: has_workers(server.port), timeout=15)
        readers = [asyncio.ensure_future(resp(server.port, "GET", "slow:held", wait=30)) for _ in range(20)]
        # the doomed worker computes it
        await aeventually(lambda: logged(log) == ["slow:held"], timeout=15)
        calls: list[str] = []
        async with running(make_app(calls), url(server)):
            doomed.kill()  # kill -9: its connection closes, the module hands the key on
            assert await asyncio.gather(*readers) == [b"value of slow:held"] * 20
        assert len(logged(log)) + len(calls) <= 2
        assert calls == ["slow:held"]
        info = await resp(server.port, "INFO", protocol.INFO_SECTION)
        assert b"requeues=1" in info
    finally:
        doomed.kill()
        doomed.wait(10)


async def test_workers_reconnect_after_a_server_restart(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)) as worker:
        assert await resp(server.port, "GET", "slow:before") == b"value of slow:before"
        server.stop()
        server.start()
        await aeventually(lambda: worker.stats.reconnects >= 1 and worker.stats.nodes, timeout=15)
        await aeventually(lambda: has_workers(server.port), timeout=15, ignore=(OSError,))
        assert await resp(server.port, "GET", "slow:after") == b"value of slow:after"


WORKER_ACL = ["on", ">worker-pw", "~*", "-@all"]
WORKER_ACL += [
    "+" + c.lower()
    for c in (protocol.CMD_REGISTER, protocol.CMD_TAKE, protocol.CMD_FILL, protocol.CMD_FAIL, "GET", "MGET")
]
WORKER_ACL += ["+" + protocol.CMD_GET.lower(), "+" + protocol.CMD_MGET.lower(), "+ping"]


async def test_workers_run_as_an_acl_user_limited_to_the_worker_commands(server: RedisProcess) -> None:
    assert await resp(server.port, "ACL", "SETUSER", "kmworker", *WORKER_ACL) == "OK"
    reader_acl = ["on", ">r", "~*", "-@all", "+get", "+" + protocol.CMD_GET.lower()]
    assert await resp(server.port, "ACL", "SETUSER", "reader", *reader_acl) == "OK"
    calls: list[str] = []
    async with running(make_app(calls), f"redis://kmworker:worker-pw@127.0.0.1:{server.port}"):
        async with RespTestClient(server.port) as c:
            auth, got, refused = await c.call_many(
                [["AUTH", "reader", "r"], ["GET", "slow:acl"], ["SET", "slow:acl", "x"]]
            )
            assert auth == "OK"
            assert got == b"value of slow:acl"
            assert "NOPERM" in str(refused)  # the reader may only read
        # the worker's user can do nothing else
        async with RespTestClient(server.port) as c:
            auth, flush, write = await c.call_many(
                [["AUTH", "kmworker", "worker-pw"], ["FLUSHALL"], ["SET", "a", "b"]]
            )
            assert auth == "OK"
            assert "NOPERM" in str(flush)
            assert "NOPERM" in str(write)


async def test_sigterm_drains_a_worker_what_it_took_is_finished(server: RedisProcess, tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    log.touch()
    proc = start_worker_process(server.port, log, compute=1.5)
    try:
        await aeventually(lambda: has_workers(server.port), timeout=15)
        reader = asyncio.ensure_future(resp(server.port, "GET", "slow:drain", wait=30))
        await aeventually(lambda: logged(log) == ["slow:drain"], timeout=15)
        proc.terminate()  # SIGTERM while the key is computing
        assert await reader == b"value of slow:drain"
        assert await asyncio.to_thread(proc.wait, 20) == 0
        err = await resp(server.port, "GET", "slow:after-drain")
        assert isinstance(err, ReplyError) and "no worker" in str(err)
    finally:
        proc.kill()
        proc.wait(10)


async def test_a_worker_pointed_at_a_server_without_the_module_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from keymiss.valkey.worker import Worker

    plain = RedisProcess(tmp_path / "plain")
    worker = Worker(make_app([]), url(plain), block_ms=100)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await aeventually(lambda: "has no keymiss module" in caplog.text, timeout=10)
        assert "keymiss redis-module" in caplog.text
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        plain.stop()


async def test_a_fast_key_taken_with_a_slow_one_is_answered_without_waiting_for_it(
    server: RedisProcess,
) -> None:
    km = Keymiss(sweep_interval=0)
    gate = Gate()

    @km.keyspace("snail:*")
    async def snail(key: str) -> str:
        await gate.hold(key)  # until the fast key's reader is answered
        return "slow"

    @km.keyspace("quick:*")
    async def quick(key: str) -> str:
        return "fast"

    async with running(km, url(server)):
        # one MGET queues both keys at once, so one TAKE hands both to the worker
        both = asyncio.create_task(resp(server.port, "MGET", "snail:0", "quick:0"))
        await gate.wait_started()
        t0 = time.monotonic()
        assert await resp(server.port, "GET", "quick:0") == b"fast"  # waits on the same computation
        waited = time.monotonic() - t0
        assert waited < 1.5, waited  # not the slow key taken with it
        gate.open()
        assert await both == [b"slow", b"fast"]


async def test_a_busy_worker_is_counted_as_busy_and_not_remembered_as_a_failure(server: RedisProcess) -> None:
    w = await raw_worker(server.port, protocol.register("b", "busy:*", error_ttl_ms=60000))
    reader = asyncio.ensure_future(resp(server.port, "GET", "busy:1"))
    key, token = await take_one(w)
    assert await w.call(*protocol.fail(key, token, "BUSY keymiss: all 6 handler slots are held")) == 1
    got = await reader
    assert isinstance(got, ReplyError) and str(got).startswith("BUSY")
    info = (await resp(server.port, "INFO", protocol.INFO_SECTION)).decode()
    assert "busy=1" in info and "errors=0" in info, info
    again = asyncio.ensure_future(resp(server.port, "GET", "busy:1"))  # queued again, not the error
    key, token = await take_one(w)
    assert await w.call(*protocol.fill(key, token, "done")) == 1
    assert await again == b"done"
    await w.close()


def readme_worker_acl() -> list[str]:
    """The README's worker ACL recipe (its ``ACL SETUSER kmworker`` line), as the arguments it gives."""
    import re
    import shlex

    text = (Path(__file__).parents[2] / "README.md").read_text()
    line = re.search(r"redis-cli ACL SETUSER kmworker (.*?)\n\s*keymiss worker", text, re.S)
    assert line, "the README's worker ACL recipe"
    return shlex.split(line.group(1).replace("\\\n", " "))


async def test_the_readme_worker_acl_recipe_serves_without_noperm_noise(
    server: RedisProcess, caplog: pytest.LogCaptureFixture
) -> None:
    assert await resp(server.port, "ACL", "SETUSER", "kmworker", *readme_worker_acl()) == "OK"
    km = Keymiss(sweep_interval=0.02)  # the store's sweep (INFO, DBSIZE), as `keymiss worker` runs it

    @km.keyspace("sq:*")
    def sq(key: str) -> str:
        return str(int(key[3:]) ** 2)

    worker_url = f"redis://kmworker:worker-password@127.0.0.1:{server.port}"
    km.configure(store=worker_url)

    async def swept() -> bool:  # the worker's sweep has read the server's numbers (its DBSIZE ran)
        stats = await resp(server.port, "INFO", "commandstats")
        return b"cmdstat_dbsize:calls=" in stats and b"cmdstat_dbsize:calls=0," not in stats

    async with running(km, worker_url):
        assert await resp(server.port, "GET", "sq:12") == b"144"
        await aeventually(swept, timeout=10)
        assert await resp(server.port, "GET", "sq:12") == b"144"
    # refused: only what the README says the worker asks once and does without
    refused = {
        dict(zip(e[::2], e[1::2], strict=True))[b"object"] for e in await resp(server.port, "ACL", "LOG")
    }
    assert refused <= {b"config|get", b"client|no-evict", b"client|setinfo"}, refused
    assert "NOPERM" not in caplog.text
