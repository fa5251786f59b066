"""The string commands redis-py and redis-cli reach for, answered by the Python server exactly as a
real redis-server answers them: each script below runs against both, reply bytes compared.

The scripts follow Redis's own tests (tests/unit/type/string.tcl, type/incr.tcl, expire.tcl).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ..redis_servers import HAVE_REDIS, RedisProcess
from ..support import RawClient
from .conftest import ServerProcess, call_bytes, start_server


def assert_same_replies(redis_port: int, port: int, commands: list[tuple[str, ...]], prefix: str) -> None:
    """Send ``commands`` to a real redis-server and to keymiss, one connection each, and compare
    every reply byte for byte; the keys under ``prefix`` are removed from redis-server after."""
    want_wire, got_wire = RawClient(redis_port, timeout=10), RawClient(port, timeout=10)
    try:
        mismatches = []
        for c in commands:
            want, got = call_bytes(want_wire, *c), call_bytes(got_wire, *c)
            if want != got:
                mismatches.append((c, want, got))
        assert not mismatches, mismatches
    finally:
        direct = redis.Redis(port=redis_port)
        for k in direct.keys(prefix + "*"):
            direct.delete(k)
        direct.close()
        want_wire.close(), got_wire.close()


@pytest.fixture(scope="module", params=["memory", "lmdb", "redis"])
def keymiss_node(request: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("strings")
    backing: RedisProcess | None = None
    if request.param == "lmdb":
        extra: tuple[str, ...] = ("--store", f"lmdb:{tmp}/db")
    elif request.param == "redis":  # a shared Redis of its own (the compared one is another)
        if not HAVE_REDIS:
            pytest.skip("redis-server is not installed")
        backing = RedisProcess(tmp / "backing")
        extra = ("--store", f"redis://127.0.0.1:{backing.port}/0")
    else:
        extra = ()
    node = start_server(tmp, *extra, front="python")
    node.store = request.param  # type: ignore[attr-defined]
    yield node
    node.stop()
    if backing is not None:
        backing.stop()


SCRIPTS: dict[str, list[tuple[str, ...]]] = {
    "incr": [
        ("SET", "n", "10"),
        ("INCR", "n"),
        ("INCRBY", "n", "5"),
        ("DECR", "n"),
        ("DECRBY", "n", "3"),
        ("INCRBY", "n", "-20"),
        ("INCR", "fresh"),
        ("DECR", "fresh2"),
        ("GET", "n"),
        ("INCRBY", "n", "1.5"),
        ("INCRBY", "n", "x"),
        ("INCR",),
    ],
    "incr errors": [
        ("SET", "s", "abc"),
        ("INCR", "s"),
        ("SET", "sp", " 11"),
        ("INCR", "sp"),
        ("SET", "sp", "11 "),
        ("INCR", "sp"),
        ("SET", "sp", "+1"),
        ("INCR", "sp"),
        ("SET", "sp", "0x10"),
        ("INCR", "sp"),
        ("SET", "big", "9223372036854775807"),
        ("INCR", "big"),
        ("GET", "big"),
        ("SET", "small", "-9223372036854775808"),
        ("DECR", "small"),
        ("INCRBY", "small", "9223372036854775807"),
        ("SET", "n", "1"),
        ("DECRBY", "n", "-9223372036854775808"),
        ("SET", "long", "1" * 30),
        ("INCR", "long"),
    ],
    "incrbyfloat": [
        ("SET", "f", "10.5"),
        ("INCRBYFLOAT", "f", "0.1"),
        ("INCRBYFLOAT", "f", "-1.1"),
        ("INCRBYFLOAT", "f2", "5.0e3"),
        ("INCRBYFLOAT", "f2", "1"),
        ("INCRBYFLOAT", "f3", "-0.5"),
        ("INCRBYFLOAT", "f3", "0.5"),
        ("SET", "s", "abc"),
        ("INCRBYFLOAT", "s", "1"),
        ("INCRBYFLOAT", "f", "nan"),
        ("INCRBYFLOAT", "f", "abc"),
        ("INCRBYFLOAT", "f", " 1"),
        ("SET", "i", "17"),
        ("INCRBYFLOAT", "i", "0.25"),
        ("GET", "f"),
        ("INCRBYFLOAT", "f", "1_000"),
        ("SET", "u", "1_5"),
        ("INCRBYFLOAT", "u", "1"),
        ("INCRBYFLOAT", "g", "1e30"),
        ("INCRBYFLOAT", "h", "1.7976931348623157e308"),
        ("INCRBYFLOAT", "h", "1.7976931348623157e308"),
        ("INCRBYFLOAT", "j", "1e-20"),
        ("INCRBYFLOAT", "k", "0x10"),
        ("INCRBYFLOAT", "k", "inf"),
        ("INCRBYFLOAT", "m", "1e4000"),
    ],
    "append and ranges": [
        ("APPEND", "a", "hello"),
        ("APPEND", "a", " world"),
        ("STRLEN", "a"),
        ("STRLEN", "nothing"),
        ("GETRANGE", "a", "0", "4"),
        ("GETRANGE", "a", "-5", "-1"),
        ("GETRANGE", "a", "5", "3"),
        ("GETRANGE", "a", "0", "-100"),
        ("GETRANGE", "a", "-100", "-1"),
        ("GETRANGE", "a", "0", "1000"),
        ("GETRANGE", "a", "-1", "-5"),
        ("GETRANGE", "nothing", "0", "-1"),
        ("SUBSTR", "a", "6", "-1"),
        ("GETRANGE", "a", "x", "1"),
    ],
    "setrange": [
        ("SETRANGE", "r", "5", "xy"),
        ("GET", "r"),
        ("SETRANGE", "r", "0", "ab"),
        ("GET", "r"),
        ("SETRANGE", "r", "0", ""),
        ("SETRANGE", "missing", "0", ""),
        ("EXISTS", "missing"),
        ("SETRANGE", "missing", "3", ""),
        ("EXISTS", "missing"),
        ("SETRANGE", "r", "-1", "x"),
        ("SETRANGE", "r", "536870911", "xx"),
        ("SETRANGE", "r", "1", "Z"),
        ("GET", "r"),
    ],
    "edits keep the ttl": [
        ("SET", "t", "1", "EX", "100"),
        ("INCR", "t"),
        ("TTL", "t"),
        ("APPEND", "t", "0"),
        ("TTL", "t"),
        ("SETRANGE", "t", "0", "9"),
        ("TTL", "t"),
        ("INCRBYFLOAT", "t", "1"),
        ("TTL", "t"),
        ("GET", "t"),
    ],
    "scan cursors": [
        ("SCAN", "01", "COUNT", "1000", "MATCH", "nothing-matches"),
        ("SCAN", "+0", "MATCH", "nothing-matches", "COUNT", "1000"),
        ("SCAN", " 1"),
        ("SCAN", "1x"),
        ("SCAN", "18446744073709551616"),
    ],
    "expire": [
        ("SET", "x", "1"),
        ("TTL", "x"),
        ("PTTL", "missing"),
        ("EXPIRE", "x", "100"),
        ("TTL", "x"),
        ("EXPIRE", "x", "50", "NX"),
        ("EXPIRE", "x", "50", "XX"),
        ("TTL", "x"),
        ("EXPIRE", "x", "10", "GT"),
        ("EXPIRE", "x", "200", "GT"),
        ("EXPIRE", "x", "300", "LT"),
        ("EXPIRE", "x", "20", "LT"),
        ("TTL", "x"),
        ("EXPIRE", "x", "1", "NX", "XX"),
        ("EXPIRE", "x", "1", "GT", "LT"),
        ("EXPIRE", "x", "1", "BOGUS"),
        ("PERSIST", "x"),
        ("PERSIST", "x"),
        ("TTL", "x"),
        ("EXPIRE", "x", "9223372036854775807"),
        ("PEXPIRE", "x", "9223372036854775807"),
        ("EXPIRE", "x", "-9223372036854775808"),
        ("EXPIRE", "x", "notanumber"),
        ("EXPIRE", "missing", "10"),
        ("SET", "y", "1", "EX", "0"),
        ("SET", "y", "1", "EX", "-1"),
        ("SET", "y", "1", "PX", "9223372036854775807"),
        ("SETEX", "y", "0", "v"),
        ("PSETEX", "y", "-5", "v"),
        ("SET", "y", "1", "EX", "10", "PX", "100"),
        ("SET", "y", "1", "KEEPTTL", "EX", "10"),
        ("SET", "y", "1", "NX", "XX"),
        ("EXPIRE", "x", "-1"),
        ("EXISTS", "x"),
        ("GETEX", "y", "EX", "0"),
        ("GETEX", "missing", "PERSIST"),
    ],
    "getset msetnx": [
        ("GETSET", "g", "v"),
        ("GETSET", "g", "w"),
        ("SET", "g", "x", "EX", "100"),
        ("GETSET", "g", "y"),
        ("TTL", "g"),
        ("GETSET", "g"),
        ("MSETNX", "a", "1", "@b", "2"),
        ("MSETNX", "a", "3", "@c", "4"),
        ("MGET", "a", "@b", "@c"),
        ("MSETNX", "d", "1", "@d", "2"),
        ("GET", "d"),
        ("GET", "@d"),
        ("MSETNX", "e"),
        ("MSETNX", "e", "1", "@f"),
    ],
    "rename": [
        ("SET", "r", "1", "EX", "100"),
        ("RENAME", "r", "@r2"),
        ("TTL", "@r2"),
        ("GET", "@r2"),
        ("EXISTS", "r"),
        ("RENAME", "missing", "@x"),
        ("RENAMENX", "missing", "@x"),
        ("RENAMENX", "@r2", "@r2"),
        ("RENAME", "@r2", "@r2"),
        ("SET", "@r3", "v"),
        ("RENAMENX", "@r2", "@r3"),
        ("RENAME", "@r2", "@r3"),
        ("GET", "@r3"),
        ("TTL", "@r3"),
        ("EXISTS", "@r2"),
    ],
    "bits": [
        ("SETBIT", "b", "7", "1"),
        ("SETBIT", "b", "7", "0"),
        ("GET", "b"),
        ("SETBIT", "b", "100", "1"),
        ("STRLEN", "b"),
        ("GETBIT", "b", "100"),
        ("GETBIT", "b", "10000"),
        ("GETBIT", "nothing", "0"),
        ("SETBIT", "b", "-1", "1"),
        ("SETBIT", "b", "4294967296", "1"),
        ("SETBIT", "b", "0", "2"),
        ("SETBIT", "b", "0", "x"),
        ("GETBIT", "b", "x"),
        ("SET", "c", "foobar"),
        ("BITCOUNT", "c"),
        ("BITCOUNT", "c", "0", "0"),
        ("BITCOUNT", "c", "1", "1", "byte"),
        ("BITCOUNT", "c", "5", "30", "BIT"),
        ("BITCOUNT", "c", "-1", "-2"),
        ("BITCOUNT", "c", "-1", "-2", "junk"),
        ("BITCOUNT", "c", "0", "1", "junk"),
        ("BITCOUNT", "c", "0"),
        ("BITCOUNT", "c", "x", "1"),
        ("BITCOUNT", "nothing", "x", "y"),
        ("BITCOUNT", "c", "-100", "100", "BIT"),
        ("BITPOS", "c", "1"),
        ("BITPOS", "c", "0"),
        ("BITPOS", "c", "1", "2"),
        ("BITPOS", "c", "0", "1", "-1"),
        ("BITPOS", "c", "1", "7", "15", "BIT"),
        ("BITPOS", "c", "0", "7", "15", "BIT"),
        ("BITPOS", "c", "1", "7", "-3", "BIT"),
        ("BITPOS", "c", "0", "9", "BIT"),
        ("BITPOS", "c", "1", "0", "-1", "BYTE"),
        ("BITPOS", "c", "1", "0", "-1", "junk"),
        ("BITPOS", "c", "2"),
        ("BITPOS", "c", "1", "a"),
        ("BITPOS", "nothing", "1"),
        ("BITPOS", "nothing", "0"),
        ("SET", "z", "\x00\x00"),
        ("BITPOS", "z", "1"),
        ("BITPOS", "z", "0", "0", "-1"),
        ("SET", "o", "~~"),
        ("BITPOS", "o", "0", "0", "-1"),
        ("BITPOS", "o", "0", "0"),
    ],
    "lcs": [
        ("SET", "l1", "ohmytext"),
        ("SET", "@l2", "mynewtext"),
        ("LCS", "l1", "@l2"),
        ("LCS", "l1", "@l2", "LEN"),
        ("LCS", "l1", "@l2", "IDX"),
        ("LCS", "l1", "@l2", "IDX", "MINMATCHLEN", "4"),
        ("LCS", "l1", "@l2", "IDX", "WITHMATCHLEN", "MINMATCHLEN", "-1"),
        ("LCS", "l1", "@l2", "LEN", "IDX"),
        ("LCS", "l1", "@l2", "BOGUS"),
        ("LCS", "l1", "@l2", "MINMATCHLEN", "x"),
        ("LCS", "l1", "@missing"),
        ("LCS", "missing", "@missing2", "IDX"),
    ],
    "expireat": [
        ("SET", "x", "1"),
        ("EXPIREAT", "x", "4000000000"),
        ("EXPIRETIME", "x"),
        ("PEXPIRETIME", "x"),
        ("PEXPIREAT", "x", "4000000000123"),
        ("PEXPIRETIME", "x"),
        ("EXPIRETIME", "x"),
        ("EXPIRETIME", "missing"),
        ("SET", "p", "1"),
        ("EXPIRETIME", "p"),
        ("PEXPIRETIME", "p"),
        ("EXPIREAT", "x", "1"),
        ("EXISTS", "x"),
        ("PEXPIREAT", "p", "-9223372036854775808"),
        ("EXISTS", "p"),
        ("SET", "q", "1"),
        ("EXPIREAT", "q", "9223372036854775807"),
        ("EXPIRE", "q", "10", "AB"),
        ("EXPIRE", "q", "10", "nx", "ab"),
        ("EXPIRE", "q", "10", "NX", "NX"),
        ("EXPIRE", "q", "x", "ab"),
        ("EXPIREAT", "q", "10", "GT", "LT"),
    ],
    "misc": [
        ("COMMAND", "COUNT", "x"),
        ("SET", "m", "1"),
        ("OBJECT", "FREQ", "m"),
        ("OBJECT", "FREQ", "nothing"),
        ("AUTH", "DEFAULT", "x"),
        ("AUTH", "default", "x"),
        ("TIME", "x"),
    ],
    "object encoding": [
        ("SET", "e1", "12345"),
        ("OBJECT", "ENCODING", "e1"),
        ("SET", "e2", "hello"),
        ("OBJECT", "ENCODING", "e2"),
        ("SET", "e3", "x" * 100),
        ("OBJECT", "ENCODING", "e3"),
        ("OBJECT", "ENCODING", "nothing"),
        ("OBJECT", "NOSUCH", "e1"),
        ("MEMORY", "USAGE", "nothing"),
        ("OBJECT", "REFCOUNT", "e2"),
        ("MEMORY", "USAGE", "nothing", "SAMPLES", "-1"),
        ("MEMORY", "USAGE", "nothing", "SAMPLES", "5", "SAMPLES", "0"),
        ("MEMORY", "USAGE", "nothing", "SAMPLES"),
        ("OBJECT", "HELP", "x"),
        ("MEMORY", "HELP", "x"),
    ],
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_replies_match_redis_byte_for_byte(
    keymiss_node: ServerProcess, redis_standalone: Any, script: str
) -> None:
    prefix = f"surf:{script.replace(' ', '_')}:"

    def keyed(cmd: tuple[str, ...]) -> tuple[str, ...]:
        # the first argument is a key, except OBJECT/MEMORY's second; an argument "@name" is a key
        # elsewhere; commands naming no key are left as they are
        rest = tuple(prefix + a[1:] if a.startswith("@") else a for a in cmd[1:])
        if cmd[0] in ("COMMAND", "AUTH", "TIME"):
            return cmd
        if cmd[0] in ("OBJECT", "MEMORY") and len(cmd) > 2:
            return (cmd[0], rest[0], prefix + rest[1], *rest[2:])
        if rest:
            return (cmd[0], prefix + rest[0], *rest[1:])
        return cmd

    assert_same_replies(redis_standalone.port, keymiss_node.port, [keyed(c) for c in SCRIPTS[script]], prefix)


def test_memory_usage_counts_the_key_and_value(keymiss_node: ServerProcess) -> None:
    r = redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        r.set("mu:small", "x")
        r.set("mu:large", "x" * 100_000)
        small, large = r.memory_usage("mu:small"), r.memory_usage("mu:large")
        assert small is not None and large is not None and large - small >= 99_999
        assert r.memory_usage("mu:none") is None
    finally:
        r.delete("mu:small", "mu:large")
        r.close()


def test_keys_lists_matches_and_hides_keymiss_records(keymiss_node: ServerProcess) -> None:
    r = redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        for i in range(30):
            r.set(f"ks:{i}", i)
        r.set("other", 1)
        assert sorted(r.keys("ks:*")) == sorted(f"ks:{i}".encode() for i in range(30))
        assert r.keys("ks:1?") == [] or sorted(r.keys("ks:1?")) == sorted(
            f"ks:1{i}".encode() for i in range(10)
        )
        assert all(not k.startswith(b"keymiss:") for k in r.keys("*"))
    finally:
        r.delete(*[f"ks:{i}" for i in range(30)], "other")
        r.close()


def test_concurrent_incr_from_many_clients_loses_no_increment(keymiss_node: ServerProcess) -> None:
    errors: list[BaseException] = []

    def bump() -> None:
        r = redis.Redis(port=keymiss_node.port, protocol=2)
        try:
            for _ in range(200):
                r.incr("race:n")
                r.append("race:s", "x")
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            r.close()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    r = redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        assert not errors
        assert r.get("race:n") == b"1600" and r.strlen("race:s") == 1600
    finally:
        r.delete("race:n", "race:s")
        r.close()


def test_incr_over_the_budget_is_refused_and_keeps_the_value(tmp_path: Path) -> None:
    node = start_server(tmp_path, "--max-memory", "1MB", front="python")
    r = redis.Redis(port=node.port, protocol=2)
    try:
        r.set("b:v", "x" * 1000)
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # redis-py's class for -OOM
            r.append("b:v", "y" * 2_000_000)
        assert r.get("b:v") == b"x" * 1000
    finally:
        r.close()
        node.stop()


def test_a_data_type_the_python_server_does_not_hold_gets_a_clear_error(keymiss_node: ServerProcess) -> None:
    if keymiss_node.store == "redis":  # type: ignore[attr-defined]
        pytest.skip("a shared Redis holds every type: they are passed through")
    r = redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        for call in (
            lambda: r.lpush("dt:l", "x"),
            lambda: r.hset("dt:h", "f", "v"),
            lambda: r.zadd("dt:z", {"a": 1}),
        ):
            with pytest.raises(redis.ResponseError, match=r"data type .* does not hold .*--store redis://"):
                call()
        assert r.set("dt:s", "v") and r.get("dt:s") == b"v"  # and it keeps serving
    finally:
        r.delete("dt:s")
        r.close()


def test_clients_cannot_write_keymiss_records_on_an_in_process_store(keymiss_node: ServerProcess) -> None:
    r = redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        for command in (
            ("SET", "keymiss:ctx:doc", "x"),
            ("DEL", "keymiss:model:bertqa"),
            ("INCR", "keymiss:n"),
        ):
            with pytest.raises(redis.ResponseError, match="keymiss's own"):
                r.execute_command(*command)
        assert r.set("fine", "1")
    finally:
        r.delete("fine")
        r.close()


def test_an_edit_past_the_budget_is_refused_before_the_string_is_built(tmp_path: Path) -> None:
    import psutil

    node = start_server(tmp_path, "--max-memory", "10MB", front="python")
    r = redis.Redis(port=node.port, protocol=2)
    try:
        rss = psutil.Process(node.proc.pid)
        before = rss.memory_info().rss
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.setrange("sr:k", 500 * 1024**2, "x")  # 500 MB of zeros asked in 30 bytes
        assert rss.memory_info().rss - before < 50 * 1024**2
        assert r.exists("sr:k") == 0 and r.ping()
    finally:
        r.close()
        node.stop()


GLOB_KEYS = [
    b"a",
    b"b",
    b"ab",
    b"abc",
    b"a-",
    b"-",
    b"]",
    b"[",
    b"\\",
    b"a]",
    b"^",
    b"x\xc3\xa9",
    b"\xc3\xa9",
    b"\xff",
    b"\xff\xfe",
    b"a*",
    b"a?",
    b"A",
    b"z",
    b"\n",
    b"a\nb",
    b"\xe2\x82\xac",
    b"aa",
    b"ba",
]
GLOB_PATTERNS = [
    b"?",
    b"??",
    b"x?",
    b"x??",
    b"[a-]",
    b"[]a]",
    b"[\\]]",
    b"a\\",
    b"[^]",
    b"[",
    b"[a",
    b"\\\\",
    b"[z-a]",
    b"[^a]",
    b"[!a]",
    b"a[",
    b"*\\*",
    b"a\\?",
    b"[a-c",
    b"[\xc3\xa9]",
    b"\xc3?",
    b"?\xa9",
    b"[\xff]",
    b"[^\xff]",
    b"*?*?*",
    b"[-]",
    b"[a-b-c]",
    b"[\\a-c]",
    b"[a\\-c]",
    b"?\n?",
    b"*\n*",
    b"\\[",
    b"[[]",
    b"[^-a]",
    b"**a",
    b"[]",
]


def test_glob_patterns_match_bytes_as_redis_does(keymiss_node: ServerProcess, tmp_path: Path) -> None:
    """KEYS and SCAN MATCH (and KEYMISS FORGET, which shares the matcher): "?" is one byte."""
    if keymiss_node.store == "redis":  # type: ignore[attr-defined]
        pytest.skip("the in-process stores' matcher (a shared Redis matches for itself)")
    from ..redis_servers import RedisProcess

    ref_server = RedisProcess(tmp_path / "ref")
    ref, km = redis.Redis(port=ref_server.port), redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        km.flushdb()  # what earlier tests left on this node
        for k in GLOB_KEYS:
            ref.set(k, 1)
            km.set(k, 1)
        mismatches = []
        for p in GLOB_PATTERNS:
            want = sorted(ref.keys(p))
            got, scanned = sorted(km.keys(p)), sorted(set(km.scan_iter(match=p, count=7)))
            if not want == got == scanned:
                mismatches.append((p, want, got, scanned))
        assert not mismatches, mismatches
    finally:
        km.delete(*GLOB_KEYS)
        ref.close(), km.close()
        ref_server.stop()


def test_other_types_on_a_shared_redis_answer_as_redis(
    keymiss_node: ServerProcess, redis_standalone: Any
) -> None:
    """MGET of a key of another type is nil in its place; SORT is passed through (not refused as
    an admin command); GETSET of a hash is WRONGTYPE."""
    if keymiss_node.store != "redis":  # type: ignore[attr-defined]
        pytest.skip("the in-process stores hold strings only")
    p = "surf:types:"
    script = [
        ("HSET", p + "h", "f", "v"),
        ("RPUSH", p + "l", "3", "1", "2"),
        ("SET", p + "s", "x"),
        ("MGET", p + "s", p + "h", p + "missing", p + "l"),
        ("SORT", p + "l"),
        ("SORT", p + "l", "DESC", "LIMIT", "0", "2"),
        ("SORT_RO", p + "l", "ALPHA"),
        ("SORT", p + "s"),
        ("GETSET", p + "h", "x"),
        ("LCS", p + "s", p + "h"),
        ("SETBIT", p + "h", "1", "1"),
        ("BITCOUNT", p + "l"),
        ("RENAME", p + "l", p + "l2"),
        ("LRANGE", p + "l2", "0", "-1"),
    ]
    assert_same_replies(redis_standalone.port, keymiss_node.port, script, p)


def test_client_setinfo_refuses_what_would_forge_a_client_list_line(keymiss_node: ServerProcess) -> None:
    r = redis.Redis(port=keymiss_node.port, protocol=2)
    try:
        for bad in ("a b", "x\nid=1", "tab\there"):
            with pytest.raises(
                redis.ResponseError, match=r"^lib-name cannot contain spaces, newlines or special"
            ):
                r.execute_command("CLIENT", "SETINFO", "lib-name", bad)
        assert r.execute_command("CLIENT", "SETINFO", "lib-ver", "1.2.3")
        listing = r.execute_command("CLIENT", "LIST")
        text = listing.decode() if isinstance(listing, bytes) else str(listing)
        assert all(line.count("lib-name=") == 1 for line in text.splitlines())
    finally:
        r.close()
