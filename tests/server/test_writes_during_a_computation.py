"""A client's write while a key is being computed, on the Python server over memory, LMDB and a
shared Redis: the read contract's one rule (write-during, del-during, ttl-during rows). A command
that changes or deletes the key supersedes the computation: the reader waiting gets the computed
value, and it is not stored over the client's write (nor after its delete). A TTL change is not a
write, unless it deletes the key.

The rule is applied to every write command of the command table by its key positions, so each
command below is a case of one rule, not a list kept in sync with it."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from .conftest import ServerProcess, start_server

_names = itertools.count()


@pytest.fixture(scope="module", params=["memory", "lmdb", "redis"])
def node(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("during")
    if request.param == "lmdb":
        extra: tuple[str, ...] = ("--store", f"lmdb:{tmp}/db")
    elif request.param == "redis":
        port = request.getfixturevalue("redis_standalone").port
        extra = ("--store", f"redis://127.0.0.1:{port}/0")
    else:
        extra = ()
    srv = start_server(tmp, *extra, front="python")
    yield srv
    srv.stop()


def during(node: ServerProcess, act: Callable[[redis.Redis, str], Any]) -> tuple[str, Any, redis.Redis]:
    """Start a read of a fresh ``gate:`` key, run ``act`` while its computation is held, then let
    it finish: the key, what ``act`` returned, and a client (closed by the caller's ``with``)."""
    name = f"w{next(_names)}x{threading.get_ident()}"
    key = f"gate:{name}"
    r = redis.Redis(port=node.port)
    reader = redis.Redis(port=node.port)
    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(reader.get(key)))
    try:
        t.start()
        node.wait_started(name)
        done = act(r, key)
        node.release(name)
        t.join(10)
        assert got == [f"gated result for {key}".encode()]  # the reader asked first: it gets it
        return key, done, r
    finally:
        node.release(name)
        t.join(10)
        reader.close()


#: command -> (what it does while the key computes, the value the key holds after)
WRITES: dict[str, tuple[Callable[[redis.Redis, str], Any], bytes | None]] = {
    "SET": (lambda r, k: r.set(k, "w"), b"w"),
    "SET GET": (lambda r, k: r.execute_command("SET", k, "w", "GET"), b"w"),
    "GETSET": (lambda r, k: r.execute_command("GETSET", k, "w"), b"w"),
    "SETNX": (lambda r, k: r.setnx(k, "w"), b"w"),
    "MSET": (lambda r, k: r.mset({k: "w"}), b"w"),
    "MSETNX": (lambda r, k: r.msetnx({k: "w"}), b"w"),
    "APPEND": (lambda r, k: r.append(k, "w"), b"w"),
    "SETRANGE": (lambda r, k: r.setrange(k, 0, "w"), b"w"),
    "INCR": (lambda r, k: r.incr(k), b"1"),
    "INCRBYFLOAT": (lambda r, k: r.incrbyfloat(k, 1.5), b"1.5"),
    "SETBIT": (lambda r, k: r.setbit(k, 1, 1), b"@"),
    "RENAME onto it": (lambda r, k: (r.set(k + "-src", "w"), r.rename(k + "-src", k)), b"w"),
    "RENAMENX onto it": (lambda r, k: (r.set(k + "-src", "w"), r.renamenx(k + "-src", k)), b"w"),
    "DEL": (lambda r, k: r.delete(k), None),
    "UNLINK": (lambda r, k: r.unlink(k), None),
    "GETDEL": (lambda r, k: r.getdel(k), None),
    "SET PXAT past": (lambda r, k: r.execute_command("SET", k, "w", "PXAT", 1), None),
}


@pytest.mark.parametrize("how", list(WRITES))
def test_a_write_while_a_key_computes_supersedes_the_computation(node: ServerProcess, how: str) -> None:
    act, after = WRITES[how]
    key, _, r = during(node, act)
    with r:
        if after is None:
            assert r.exists(key) == 0  # nothing stored after the delete (a GET would compute again)
        else:
            assert r.get(key) == after  # the client's write stays; nothing computed stored over it


def test_a_rename_away_from_a_key_still_computing_finds_no_key_and_supersedes_nothing(
    node: ServerProcess,
) -> None:
    def away(r: redis.Redis, k: str) -> Any:
        with pytest.raises(redis.ResponseError, match="no such key"):
            r.rename(k, k + "-dst")

    key, _, r = during(node, away)
    with r:
        assert r.get(key) == f"gated result for {key}".encode()
        assert r.exists(key + "-dst") == 0


def test_a_rename_away_from_a_stored_key_leaves_it_to_be_computed_again(node: ServerProcess) -> None:
    name = f"a{next(_names)}"
    key = f"gate:{name}"
    node.release(name)
    with redis.Redis(port=node.port) as r:
        assert r.get(key) == f"gated result for {key}".encode()
        assert r.rename(key, key + "-dst")
        assert r.get(key + "-dst") == f"gated result for {key}".encode()
        assert r.exists(key) == 0


@pytest.mark.parametrize(
    ("how", "ttl"),
    [
        ("GETEX EX", lambda r, k: r.getex(k, ex=500)),
        ("GETEX PX", lambda r, k: r.getex(k, px=500_000)),
        ("GETEX PERSIST", lambda r, k: r.getex(k, persist=True)),
        ("GETEX PXAT past", lambda r, k: r.getex(k, pxat=1)),
    ],
)
def test_getex_while_a_key_computes_waits_and_its_expiry_wins(
    node: ServerProcess, how: str, ttl: Any
) -> None:
    """GETEX with an expiry is a read that changes the TTL: it waits for the computed value,
    which is stored, with the client's expiry rather than the keyspace's."""
    got: list[Any] = []

    def act(r: redis.Redis, k: str) -> None:
        t = threading.Thread(target=lambda: got.append(ttl(redis.Redis(port=node.port), k)))
        t.start()
        got.append(t)

    key, _, r = during(node, act)
    with r:
        got[0].join(10)
        assert got[1:] == [f"gated result for {key}".encode()]
        if how == "GETEX PXAT past":  # the value it returns, then deleted
            assert r.exists(key) == 0
            return
        assert r.get(key) == f"gated result for {key}".encode()  # stored
        if how == "GETEX PERSIST":
            assert r.ttl(key) == -1
        else:
            assert 400 < r.ttl(key) <= 500


@pytest.mark.parametrize("how", ["EXPIRE", "PEXPIRE", "EXPIREAT", "PERSIST"])
def test_a_ttl_change_of_a_key_still_computing_changes_nothing(node: ServerProcess, how: str) -> None:
    args = {"EXPIRE": (100,), "PEXPIRE": (100_000,), "EXPIREAT": (4_000_000_000,), "PERSIST": ()}[how]
    key, done, r = during(node, lambda r, k: r.execute_command(how, k, *args))
    with r:
        assert done == 0  # no key yet
        assert r.get(key) == f"gated result for {key}".encode()  # the computation is stored


#: command -> what it does while the key computes; none of them changes the key (absent still)
NO_OPS: dict[str, Callable[[redis.Redis, str], Any]] = {
    "SET XX": lambda r, k: r.set(k, "w", xx=True),
    "MSETNX with another key present": lambda r, k: (r.set(k + "-o", "o"), r.msetnx({k + "-o": "x", k: "w"})),
    "SETRANGE of nothing": lambda r, k: r.setrange(k, 0, ""),
}


@pytest.mark.parametrize("how", list(NO_OPS))
def test_a_write_that_changes_nothing_supersedes_nothing(node: ServerProcess, how: str) -> None:
    """Only a write that changes or deletes the key supersedes: the computed value is stored."""
    key, _, r = during(node, NO_OPS[how])
    with r:
        assert r.exists(key) == 1  # stored (a GET would compute it again, with the same result)
        assert r.get(key) == f"gated result for {key}".encode()
