"""MULTI/EXEC/DISCARD/WATCH on the Python server: Redis's replies byte for byte (as in Redis's
tests/unit/multi.tcl), redis-py's default pipeline, atomicity against other clients, and a miss
inside a transaction that does not wait."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ..support import RawClient, eventually
from .conftest import ServerProcess, call_bytes, start_server
from .test_string_surface import assert_same_replies


@pytest.fixture(scope="module", params=["memory", "lmdb"])
def node(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tx")
    extra = ("--store", f"lmdb:{tmp}/db") if request.param == "lmdb" else ()
    srv = start_server(tmp, *extra, front="python")
    yield srv
    srv.stop()


SCRIPTS: dict[str, list[tuple[str, ...]]] = {
    "exec runs the queue": [
        ("MULTI",),
        ("SET", "a", "1"),
        ("INCR", "a"),
        ("GET", "a"),
        ("APPEND", "a", "x"),
        ("MGET", "a", "nothing"),
        ("EXEC",),
        ("GET", "a"),
    ],
    "errors while queueing abort": [
        ("MULTI",),
        ("SET", "a", "1"),
        ("SET", "a"),
        ("EXEC",),
        ("EXISTS", "a"),
        ("MULTI",),
        ("NOSUCHCOMMAND", "x"),
        ("SET", "a", "2"),
        ("EXEC",),
        ("EXISTS", "a"),
    ],
    "errors while running stay in the array": [
        ("SET", "s", "abc"),
        ("MULTI",),
        ("INCR", "s"),
        ("SET", "t", "1"),
        ("SET", "t", "2", "NX"),
        ("SET", "u", "1", "BADOPTION"),
        ("EXEC",),
        ("GET", "t"),
    ],
    "state errors": [
        ("EXEC",),
        ("DISCARD",),
        ("MULTI",),
        ("MULTI",),
        ("WATCH", "a"),
        ("SET", "a", "1"),
        ("EXEC",),
        ("GET", "a"),
        ("MULTI",),
        ("SET", "a", "2"),
        ("DISCARD",),
        ("GET", "a"),
        ("EXEC",),
    ],
    "watch": [
        ("WATCH", "w"),
        ("SET", "w", "1"),  # our own write touches it too
        ("MULTI",),
        ("PING",),
        ("EXEC",),
        ("WATCH", "w"),
        ("MULTI",),
        ("PING",),
        ("EXEC",),  # unchanged: runs
        ("WATCH", "w"),
        ("UNWATCH",),
        ("SET", "w", "2"),
        ("MULTI",),
        ("PING",),
        ("EXEC",),  # unwatched: runs
        ("WATCH", "w", "v"),
        ("DEL", "v"),  # deleting a missing key changes nothing... but Redis does not touch it
        ("MULTI",),
        ("GET", "w"),
        ("EXEC",),
        ("WATCH", "w"),
        ("INCR", "w"),
        ("MULTI",),
        ("GET", "w"),
        ("EXEC",),
    ],
    "empty transaction": [("MULTI",), ("EXEC",), ("MULTI",), ("DISCARD",)],
    "writes that change nothing do not fail exec": [
        ("SET", "n", "1"),
        ("WATCH", "n", "m"),
        ("SET", "n", "2", "NX"),
        ("SETNX", "n", "3"),
        ("SET", "m", "1", "XX"),
        ("GETEX", "n"),
        ("PERSIST", "n"),
        ("SETRANGE", "n", "0", ""),
        ("DEL", "m"),
        ("EXPIRE", "m", "10"),
        ("MULTI",),
        ("GET", "n"),
        ("EXEC",),
        ("WATCH", "n"),
        ("SET", "n", "2"),
        ("SET", "n", "1"),  # changed, then changed back: still a change
        ("MULTI",),
        ("GET", "n"),
        ("EXEC",),
    ],
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_transactions_answer_as_redis_does(node: ServerProcess, redis_standalone: Any, script: str) -> None:
    prefix = f"tx:{script.replace(' ', '_')}:"

    def keyed(cmd: tuple[str, ...]) -> tuple[str, ...]:
        if cmd[0] in ("MGET", "WATCH", "EXISTS"):
            return (cmd[0], *(prefix + k for k in cmd[1:]))
        if len(cmd) > 1 and cmd[0] not in ("PING", "NOSUCHCOMMAND"):
            return (cmd[0], prefix + cmd[1], *cmd[2:])
        return cmd

    assert_same_replies(redis_standalone.port, node.port, [keyed(c) for c in SCRIPTS[script]], prefix)


def test_redis_py_default_pipeline_is_a_transaction_that_works(node: ServerProcess) -> None:
    r = redis.Redis(port=node.port)
    try:
        with r.pipeline() as p:  # transaction=True is redis-py's default
            p.set("pl:a", "1").incr("pl:a").get("pl:a").incrbyfloat("pl:f", 1.5).delete("pl:a")
            assert p.execute() == [True, 2, b"2", 1.5, 1]
        with r.pipeline() as p, pytest.raises(redis.ResponseError):
            p.set("pl:s", "x").incr("pl:s")
            p.execute()  # INCR's error is raised, after SET was applied (as in Redis)
        assert r.get("pl:s") == b"x"
    finally:
        r.delete("pl:s", "pl:f")
        r.close()


def test_watch_fails_exec_when_another_client_writes(node: ServerProcess) -> None:
    a, b = redis.Redis(port=node.port), redis.Redis(port=node.port)
    try:
        a.set("wt:k", "1")
        with a.pipeline() as p:
            p.watch("wt:k")
            assert p.get("wt:k") == b"1"
            b.set("wt:k", "2")  # another client's write between WATCH and EXEC
            p.multi()
            p.set("wt:k", "from-a")
            with pytest.raises(redis.WatchError):
                p.execute()
        assert a.get("wt:k") == b"2"

        def bump(pipe: Any) -> None:  # redis-py's optimistic-locking helper retries until it wins
            current = int(pipe.get("wt:n") or 0)
            pipe.multi()
            pipe.set("wt:n", current + 1)

        threads = [threading.Thread(target=lambda: [a.transaction(bump, "wt:n") for _ in range(50)])]
        threads.append(threading.Thread(target=lambda: [b.transaction(bump, "wt:n") for _ in range(50)]))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert a.get("wt:n") == b"100"  # every increment kept, though they raced
    finally:
        a.delete("wt:k", "wt:n")
        a.close(), b.close()


def test_watch_sees_a_value_changed_by_expiry_and_flush(node: ServerProcess) -> None:
    r = redis.Redis(port=node.port)
    try:
        r.set("we:k", "1", px=200)
        with r.pipeline() as p:
            p.watch("we:k")
            time.sleep(0.4)  # it expires between WATCH and EXEC, unread: the clock is what is tested
            p.multi()
            p.set("we:other", "1")
            with pytest.raises(redis.WatchError):
                p.execute()
        with r.pipeline() as p:
            p.watch("we:absent")  # absent at WATCH, a flush touches nothing for it
            r.execute_command("FLUSHDB")
            p.multi()
            p.set("we:absent", "1")
            assert p.execute() == [True]
    finally:
        r.delete("we:absent", "we:other")
        r.close()


def test_exec_is_atomic_to_other_clients(node: ServerProcess) -> None:
    """One client moves a unit between two keys in transactions; another reads both with MGET
    meanwhile and must never see the move half done (on LMDB the writes wait for the disk)."""
    writer, reader = redis.Redis(port=node.port), redis.Redis(port=node.port)
    writer.mset({"at:a": 1000, "at:b": 0})
    torn: list[tuple[bytes, bytes]] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            a, b = reader.mget("at:a", "at:b")
            if int(a) + int(b) != 1000:
                torn.append((a, b))

    t = threading.Thread(target=read)
    t.start()
    try:
        deadline = time.monotonic() + 20
        for _ in range(200):
            assert time.monotonic() < deadline
            with writer.pipeline() as p:
                p.decr("at:a").incr("at:b")
                p.execute()
    finally:
        stop.set()
        t.join(10)
    try:
        assert torn == []
        assert writer.mget("at:a", "at:b") == [b"800", b"200"]
    finally:
        writer.delete("at:a", "at:b")
        writer.close(), reader.close()


def test_a_miss_inside_exec_does_not_wait_and_is_computed(tmp_path: Path) -> None:
    srv = start_server(tmp_path, front="python")
    r = redis.Redis(port=srv.port)
    try:
        with r.pipeline() as p:
            p.get("slow:tx1").set("tx:after", "1").get("tx:after")
            # nil: had EXEC waited for the computation (0.3 s in the sample app), it would be the value
            assert p.execute() == [None, True, b"1"]
        deadline = time.monotonic() + 10
        while r.get("slow:tx1") is None:  # a plain GET waits for the computation started by EXEC
            assert time.monotonic() < deadline
        assert r.get("slow:tx1") is not None
    finally:
        r.close()
        srv.stop()


def test_a_client_gone_mid_transaction_leaves_nothing_behind(node: ServerProcess) -> None:
    w = RawClient(node.port, timeout=10)
    gone = call_bytes(w, "CLIENT", "ID")  # b":<id>\r\n"
    call_bytes(w, "WATCH", "gone:k")
    call_bytes(w, "MULTI")
    call_bytes(w, "SET", "gone:k", "1")
    w.close()  # never EXECs
    r = redis.Redis(port=node.port)
    try:
        gone_id = gone[1:-2].decode()
        eventually(lambda: all(c["id"] != gone_id for c in r.client_list()))  # the server let it go
        assert r.get("gone:k") is None
        assert r.set("gone:k", "2") and r.get("gone:k") == b"2"  # and the server goes on serving
        assert "multi=-1" in r.execute_command("CLIENT", "INFO").decode()
    finally:
        r.delete("gone:k")
        r.close()


def test_a_transaction_cannot_queue_without_bound(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--query-buffer", "1MB", front="python")
    w = RawClient(srv.port, timeout=10)
    try:
        call_bytes(w, "MULTI")
        value = "x" * 100_000
        replies = [call_bytes(w, "SET", f"big:{i}", value) for i in range(20)]
        assert replies[0] == b"+QUEUED\r\n" and replies[-1].startswith(b"-ERR transaction too large")
        assert call_bytes(w, "EXEC").startswith(b"-EXECABORT")
        assert call_bytes(w, "EXISTS", "big:0") == b":0\r\n"
    finally:
        w.close()
        srv.stop()


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory, redis_standalone: Any) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("txshared")
    srv = start_server(tmp, "--store", f"redis://127.0.0.1:{redis_standalone.port}", front="python")
    yield srv
    srv.stop()


@pytest.mark.parametrize(
    "script", ["exec runs the queue", "errors while running stay in the array", "empty transaction"]
)
def test_a_transaction_relayed_to_a_shared_redis_answers_as_redis_does(
    shared_node: ServerProcess, redis_standalone: Any, script: str
) -> None:
    prefix = f"txs:{script.replace(' ', '_')}:"

    def keyed(cmd: tuple[str, ...]) -> tuple[str, ...]:
        if cmd[0] == "MGET":
            return (cmd[0], *(prefix + k for k in cmd[1:]))
        return (cmd[0], prefix + cmd[1], *cmd[2:]) if len(cmd) > 1 else cmd

    want_wire = RawClient(redis_standalone.port, timeout=10)
    got_wire = RawClient(shared_node.port, timeout=10)
    direct = redis.Redis(port=redis_standalone.port)
    try:
        want = [call_bytes(want_wire, *keyed(c)) for c in SCRIPTS[script]]
        for k in direct.keys(prefix + "*"):
            direct.delete(k)
        got = [call_bytes(got_wire, *keyed(c)) for c in SCRIPTS[script]]
        assert got == want
    finally:
        for k in direct.keys(prefix + "*"):
            direct.delete(k)
        direct.close()
        want_wire.close(), got_wire.close()


def test_redis_py_default_pipeline_works_on_a_shared_redis(
    shared_node: ServerProcess, redis_standalone: Any
) -> None:
    r = redis.Redis(port=shared_node.port)
    direct = redis.Redis(port=redis_standalone.port)
    try:
        with r.pipeline() as p:
            p.set("txp:a", "1").incr("txp:a").hset("txp:h", "f", "v").lpush("txp:l", "x").get("txp:a")
            assert p.execute() == [True, 2, 1, 1, b"2"]
        assert direct.hget("txp:h", "f") == b"v" and direct.lrange("txp:l", 0, -1) == [b"x"]
        with r.pipeline() as p:  # a miss of a keyspace key: nil inside, computed after
            p.get("slow:txp").set("txp:b", "1")
            assert p.execute() == [None, True]
        eventually(
            lambda: direct.get("slow:txp") is not None,
            timeout=10,
            interval=0.05,
            message="the miss inside EXEC to be computed",
        )
    finally:
        direct.delete("txp:a", "txp:h", "txp:l", "txp:b", "slow:txp")
        r.close(), direct.close()


def test_a_relayed_transaction_holding_a_refused_command_is_discarded_whole(
    shared_node: ServerProcess, redis_standalone: Any
) -> None:
    w = RawClient(shared_node.port, timeout=10)
    direct = redis.Redis(port=redis_standalone.port)
    try:
        assert call_bytes(w, "MULTI") == b"+OK\r\n"
        assert call_bytes(w, "SET", "txr:a", "1") == b"+QUEUED\r\n"
        assert call_bytes(w, "EVAL", "return redis.call('flushall')", "0") == b"+QUEUED\r\n"
        answer = call_bytes(w, "EXEC")
        assert answer.startswith(b"-EXECABORT") and b"script" in answer, answer
        assert direct.exists("txr:a") == 0
        assert call_bytes(w, "MULTI") == b"+OK\r\n"
        assert call_bytes(w, "INFO").startswith(b"-ERR 'info' is keymiss's own command")
        assert call_bytes(w, "EXEC").startswith(b"-EXECABORT")
        with pytest.raises(redis.ResponseError, match="send WATCH and its transaction to Redis directly"):
            redis.Redis(port=shared_node.port).execute_command("WATCH", "txr:a")
        assert call_bytes(w, "SET", "txr:a", "2") == b"+OK\r\n"  # and it goes on serving
    finally:
        direct.delete("txr:a")
        w.close(), direct.close()


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """LMDB with fsync: every write inside EXEC waits, so EXEC holds the other clients."""
    tmp = tmp_path_factory.mktemp("txdurable")
    srv = start_server(tmp, "--store", f"lmdb:{tmp}/db", front="python")
    yield srv
    srv.stop()


def _tx(prefix: bytes, n: int) -> bytes:
    return b"MULTI\r\n" + b"".join(b"SET %s:%d 1\r\n" % (prefix, i) for i in range(n)) + b"EXEC\r\n"


def test_every_client_held_by_an_exec_is_answered_when_it_ends(durable: ServerProcess) -> None:
    """Held behind A's EXEC: B's EXEC, which holds them again, and C's GET: C used to be forgotten."""
    for r in range(10):
        a, b, c = (RawClient(durable.port) for _ in range(3))
        try:
            a.send_raw(_tx(b"ha%d" % r, 2))
            b.send_raw(_tx(b"hb%d" % r, 2))
            c.send_raw(b"GET nothing\r\n")
            assert c.reply_bytes() == b"$-1\r\n"
        finally:
            for s in (a, b, c):
                s.close()


def test_an_exec_runs_whole_when_its_client_leaves_and_others_stay_atomic(durable: ServerProcess) -> None:
    r = redis.Redis(port=durable.port)
    try:
        for rnd in range(3):
            a, b = RawClient(durable.port, timeout=20), RawClient(durable.port, timeout=20)
            a.send_raw(_tx(b"pa%d" % rnd, 30))
            b.send_raw(_tx(b"pb%d" % rnd, 30))
            time.sleep(0.005)  # a moment into A's EXEC
            a.close()  # gone while its EXEC waits on the disk
            seen: list[int] = []
            replies = 0
            deadline = time.monotonic() + 20
            while replies < 1 + 30 + 1 and time.monotonic() < deadline:  # MULTI, 30 SETs queued, EXEC
                seen.append(r.exists(*[f"pb{rnd}:{i}" for i in range(30)]))
                with contextlib.suppress(TimeoutError):  # B's next reply, if it is there
                    b.reply_bytes(timeout=0.0005)
                    replies += 1
            b.close()
            assert all(n in (0, 30) for n in seen), seen  # B's transaction never seen half done
            a_keys = [f"pa{rnd}:{i}" for i in range(30)]
            eventually(lambda keys=a_keys: r.exists(*keys) == 30, timeout=10, interval=0.05)  # A's ran whole
    finally:
        r.close()


def test_a_large_exec_on_a_durable_store_shares_one_fsync_and_holds_others_briefly(
    durable: ServerProcess,
) -> None:
    """20,000 SETs in one EXEC used to fsync each one while every other client waited (9 s)."""
    a, b = RawClient(durable.port, timeout=60), RawClient(durable.port, timeout=60)
    try:
        a.send_raw(_tx(b"fs", 20_000))
        time.sleep(0.2)  # B arrives while A's EXEC runs
        t0 = time.monotonic()
        b.send_raw(b"PING\r\n")
        assert b.reply_bytes() == b"+PONG\r\n"
        assert time.monotonic() - t0 < 3.0
    finally:
        a.close(), b.close()
    r = redis.Redis(port=durable.port)
    try:
        eventually(lambda: r.exists("fs:19999"), timeout=20, interval=0.05)
        assert r.dbsize() >= 20_000
    finally:
        r.close()
