"""Several `keymiss serve` nodes in front of one real Redis / 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..support import RawClient, eventually
from .conftest import ServerProcess, keyspace_info, start_server


def stat(port: int, pattern: str, name: str) -> int:
    """One counter of one keyspace, from INFO keymiss."""
    r = redis.Redis(port=port)
    try:
        return int(keyspace_info(r, pattern)[name])
    finally:
        r.close()


def computations(port: int, pattern: str) -> int:
    return stat(port, pattern, "computations")


@pytest.fixture
def two_nodes(tmp_path: Path, redis_cluster: Any) -> Any:
    url = redis_cluster.url + "?lease_ms=1000"
    a = start_server(tmp_path, "--store", url)
    b = start_server(tmp_path, "--store", url)
    yield a, b
    for node in (a, b):
        node.stop(signal.SIGKILL) if node.proc.poll() is None else None


def test_200_gets_across_two_nodes_one_computation(two_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = two_nodes
    key = f"slow:{time.monotonic_ns()}"

    async def main() -> list[bytes | None]:
        clients = [aioredis.Redis(port=(a if i % 2 else b).port) for i in range(200)]
        try:
            await asyncio.gather(*(c.ping() for c in clients))
            return list(await asyncio.gather(*(c.get(key) for c in clients)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    values = asyncio.run(main())
    assert values == [f"slow result for {key}".encode()] * 200
    assert computations(a.port, "slow:*") + computations(b.port, "slow:*") == 1


@pytest.mark.reliability
def test_kill_9_of_the_lease_holder(two_nodes: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = two_nodes
    name = f"crawl{time.monotonic_ns()}"
    key = f"gate:{name}"
    b.release(name)  # b's computation, once b may run it, returns at once; a's runs until a dies
    got: dict[str, Any] = {}

    def ask(node: ServerProcess, name: str) -> None:
        try:
            once = Retry(NoBackoff(), 0)  # a lost connection is the answer, not a cue to retry
            got[name] = redis.Redis(port=node.port, socket_timeout=15, retry=once).get(key)
        except redis.RedisError as exc:
            got[name] = exc
        got[name + "_at"] = time.monotonic()

    ta = threading.Thread(target=ask, args=(a, "a"))
    ta.start()
    a.wait_started(name)  # a holds the lease and computes
    tb = threading.Thread(target=ask, args=(b, "b"))
    tb.start()
    eventually(lambda: stat(b.port, "gate:*", "misses") == 1)  # b waits on a's lease
    os.kill(a.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    tb.join(15)
    ta.join(5)
    assert got["b"] == f"gated result for {key}".encode()
    # lease TTL + compute time, with slack for a loaded machine (the default lease is 30 s)
    assert got["b_at"] - killed < 1.0 + 1.5 + 1.5
    assert isinstance(got.get("a"), redis.ConnectionError)  # its client lost the connection, no hang
    assert computations(b.port, "gate:*") == 1  # at most 2 in all: the dead node's and this one


def test_pass_through_commands(tmp_path: Path, redis_cluster: Any) -> None:
    node = start_server(tmp_path, "--store", redis_cluster.url)
    direct = redis.RedisCluster.from_url(redis_cluster.url.replace("redis+cluster", "redis"))
    try:
        r = redis.Redis(port=node.port)
        assert r.hset("h{1}", mapping={"a": "1", "b": "2"}) == 2
        assert direct.hgetall("h{1}") == {b"a": b"1", b"b": b"2"}
        direct.hset("h{1}", "c", "3")
        assert r.hget("h{1}", "c") == b"3"
        assert r.incr("n{1}") == 1 and direct.get("n{1}") == b"1"
        assert r.lpush("l{1}", "x", "y") == 2 and direct.lrange("l{1}", 0, -1) == [b"y", b"x"]
        # redis-py turns "-CROSSSLOT ..." into ClusterCrossSlotError (and drops the code from the text)
        with pytest.raises(redis.exceptions.ClusterCrossSlotError):
            r.execute_command("SUNION", "s{a}", "s{b}")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            r.lpush("h{1}", "z")
        r.close()
    finally:
        direct.close()
        node.stop()


def wait_until_served(r: redis.Redis, key: str, expected: bytes, seconds: float = 10) -> None:
    """Retry through the errors of an outage until keymiss serves ``key`` again."""
    got = eventually(
        lambda: r.get(key),
        timeout=seconds,
        interval=0.2,
        ignore=(redis.ResponseError,),
        message="recovery after Redis came back",
    )
    assert got == expected


class Load:
    """Clients asking double:<n> in a loop; every reply must be the right value or an error."""

    def __init__(self, port: int, clients: int = 8) -> None:
        self.stop = threading.Event()
        self.ok = self.errors = self.wrong = 0
        self.threads = [threading.Thread(target=self.run, args=(port, i)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def run(self, port: int, seed: int) -> None:
        r = redis.Redis(port=port, socket_timeout=10)
        n = seed
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            n = (n * 7 + 3) % 500
            try:
                value = r.get(f"double:{n}")
            except redis.ResponseError:
                self.errors += 1
                continue
            if value == str(2 * n).encode():
                self.ok += 1
            else:
                self.wrong += 1
        r.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)


@pytest.mark.reliability
def test_redis_outage_gives_clean_errors_and_service_resumes(tmp_path: Path, redis_standalone: Any) -> None:
    url = f"redis://127.0.0.1:{redis_standalone.port}/0?timeout=0.5&reply_timeout=1"
    node = start_server(tmp_path, "--store", url)
    r = redis.Redis(port=node.port, socket_timeout=10)
    load = Load(node.port)
    try:
        assert r.get("double:4") == b"8"
        redis_standalone.signal(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            # stopped, Redis still accepts connections (its kernel does): it is slow, not gone
            with pytest.raises(redis.ResponseError, match="did not answer within 1s"):
                r.get("double:5")
            assert time.monotonic() - t0 < 5
            assert r.ping()  # keymiss itself keeps serving
        finally:
            redis_standalone.signal(signal.SIGCONT)
        wait_until_served(r, "double:6", b"12")
        assert r.get("double:4") == b"8" and r.get("double:5") == b"10"  # no wrong values after
        # a crash and restart of Redis (its data gone): clean errors while down, then recomputed
        redis_standalone.stop()
        with pytest.raises(redis.ResponseError, match="store error: redis unavailable"):
            r.get("double:8")
        redis_standalone.start()
        wait_until_served(r, "double:8", b"16")
        assert r.get("double:4") == b"8"  # lost with Redis's memory, computed again, right
        before = load.ok
        eventually(lambda: load.ok > before, timeout=0.5)  # the load is being served again
    finally:
        load.finish()
        r.close()
        node.stop()
    assert load.wrong == 0  # errors during the outages, never a wrong value
    assert load.errors > 0 and load.ok > 0


@pytest.mark.parametrize("near", ["", "?near_cache=4MB&near_ttl=30"], ids=["plain", "near"])
def test_keys_of_other_types_are_wrongtype_never_overwritten(
    tmp_path: Path, redis_standalone: Any, near: str
) -> None:
    node = start_server(tmp_path, "--store", f"redis://127.0.0.1:{redis_standalone.port}/0{near}")
    direct = redis.Redis(port=redis_standalone.port)
    r = redis.Redis(port=node.port, socket_timeout=10)
    tag = time.monotonic_ns()
    try:
        direct.hset(f"double:{tag}", "field", "value")  # a hash where a keyspace would compute
        direct.hset(f"plainhash:{tag}", "f", "v")  # and one outside every keyspace
        for key in (f"double:{tag}", f"plainhash:{tag}"):
            with pytest.raises(redis.ResponseError, match=r"^WRONGTYPE"):
                r.get(key)
            assert r.type(key) == b"hash"
        entry, six = r.mget([f"double:{tag}", "double:3"])
        assert six == b"6" and isinstance(entry, redis.ResponseError) and "WRONGTYPE" in str(entry)
        assert direct.type(f"double:{tag}") == b"hash" and direct.hget(f"double:{tag}", "field") == b"value"
        with pytest.raises(redis.ResponseError, match=r"^WRONGTYPE"):
            r.set(f"plainhash:{tag}", "x", get=True)
        with pytest.raises(redis.ResponseError, match=r"^WRONGTYPE"):
            r.getdel(f"plainhash:{tag}")
        assert direct.type(f"plainhash:{tag}") == b"hash"  # left alone
        strings = {k for k in r.scan_iter(match=f"*{tag}*", _type="STRING")}
        hashes = {k for k in r.scan_iter(match=f"*{tag}*", _type="HASH")}
        assert f"plainhash:{tag}".encode() in hashes and f"plainhash:{tag}".encode() not in strings
        # a pass-through write invalidates this node's own copy at once
        assert r.set(f"ctr:{tag}", "1") and r.get(f"ctr:{tag}") == b"1"
        assert r.incr(f"ctr:{tag}") == 2 and r.get(f"ctr:{tag}") == b"2"
    finally:
        node.stop()
        direct.close()


# --- pass-through: only stateless data commands reach the shared connections -----------------------
@pytest.fixture(scope="module")
def relay_node(tmp_path_factory: pytest.TempPathFactory, redis_standalone: Any) -> Any:
    node = start_server(
        tmp_path_factory.mktemp("relay"), "--store", f"redis://127.0.0.1:{redis_standalone.port}"
    )
    yield node
    node.stop()


def raw(port: int, *commands: bytes) -> bytes:
    """Send RESP commands on a fresh connection, return their replies' bytes, one reply each."""
    with RawClient(port) as c:
        c.send_raw(b"".join(commands))
        return b"".join(c.replies_bytes(len(commands)))


def test_a_transaction_opened_by_one_client_never_captures_anothers_commands(relay_node: Any) -> None:
    a, b = redis.Redis(port=relay_node.port), redis.Redis(port=relay_node.port)
    try:
        assert a.execute_command("MULTI") in (b"OK", "OK", True)  # queued by keymiss, for A only
        for i in range(20):  # had MULTI reached a pooled connection, B's commands would reply QUEUED
            assert b.hset("iso:h", f"f{i}", i) == 1
            assert b.incr("iso:n") == i + 1
        assert b.hlen("iso:h") == 20
        assert a.execute_command("EXEC") == []
        assert b.hlen("iso:h") == 20 and b.get("iso:n") == b"20"
    finally:
        b.delete("iso:h", "iso:n")
        a.close(), b.close()


@pytest.mark.parametrize(
    "command, why",
    [
        ((b"MONITOR",), "admin"),
        ((b"SUBSCRIBE", b"ch"), "pub/sub"),
        ((b"PSUBSCRIBE", b"c*"), "pub/sub"),
        ((b"EVAL", b"return redis.call('flushall')", b"0"), "script"),
        ((b"EVALSHA", b"0" * 40, b"0"), "script"),
        ((b"SCRIPT", b"FLUSH"), "script"),
        ((b"FUNCTION", b"FLUSH"), "script"),
        ((b"REPLICAOF", b"127.0.0.1", b"1"), "admin"),
        ((b"ACL", b"SETUSER", b"x", b"on"), "admin"),
        ((b"DEBUG", b"SLEEP", b"0"), "admin"),
        ((b"SHUTDOWN",), "admin"),
        ((b"BLPOP", b"iso:l", b"0"), "blocking"),
        ((b"XREAD", b"BLOCK", b"0", b"STREAMS", b"iso:s", b"$"), "blocking"),
        ((b"SWAPDB", b"0", b"1"), "database 0"),
        ((b"MIGRATE", b"127.0.0.1", b"1", b"k", b"0", b"100"), "another server"),
        ((b"CLUSTER", b"INFO"), "cluster"),
        ((b"COPY", b"iso:keep", b"iso:copy", b"DB", b"3"), "database 0"),
    ],
)
def test_connection_state_scripting_admin_and_blocking_commands_are_refused(
    relay_node: Any, redis_standalone: Any, command: tuple[bytes, ...], why: str
) -> None:
    r = redis.Redis(port=relay_node.port, socket_timeout=5)
    direct = redis.Redis(port=redis_standalone.port)
    try:
        direct.set("iso:keep", "1")
        with pytest.raises(redis.ResponseError) as err:
            r.execute_command(*command)
        text = str(err.value)
        assert "not passed through" in text and why in text and "directly" in text, text
        # the node and the shared Redis carry on, untouched
        assert r.ping() and r.hset("iso:after", "f", "v") == 1 and r.hget("iso:after", "f") == b"v"
        assert direct.get("iso:keep") == b"1" and direct.info("replication")["role"] == "master"
    finally:
        direct.delete("iso:keep", "iso:after")
        r.close(), direct.close()


def test_keymiss_records_and_channels_are_not_written_through(relay_node: Any, redis_standalone: Any) -> None:
    r = redis.Redis(port=relay_node.port)
    direct = redis.Redis(port=redis_standalone.port)
    try:
        for command in (
            ("HSET", "keymiss:lease:x", "f", "v"),
            ("APPEND", "keymiss:ctx:doc", "x"),
            ("RENAME", "iso:a", "keymiss:lease:y"),
            ("LPUSH", "keymiss:codec:z", "1"),
            ("PUBLISH", "keymiss:done", "fake"),
            ("PUBLISH", "keymiss:invalidate", "*"),
        ):
            with pytest.raises(redis.ResponseError, match="keymiss's own"):
                r.execute_command(*command)
        assert direct.exists("keymiss:lease:x", "keymiss:ctx:doc", "keymiss:lease:y", "keymiss:codec:z") == 0
        assert r.publish("iso:news", "hello") == 0  # other channels: a plain PUBLISH
        direct.hset("keymiss:probe", "f", "v")  # reading them is harmless
        assert r.hget("keymiss:probe", "f") == b"v"
    finally:
        direct.delete("keymiss:probe")
        r.close(), direct.close()


def test_relayed_replies_and_errors_are_redis_own_bytes(relay_node: Any, redis_standalone: Any) -> None:
    """+OK stays a status reply and every error keeps its code: compare byte for byte with Redis."""
    commands = [
        b"*4\r\n$5\r\nRPUSH\r\n$5\r\niso:l\r\n$1\r\na\r\n$1\r\nb\r\n",
        b"*4\r\n$4\r\nLSET\r\n$5\r\niso:l\r\n$1\r\n0\r\n$1\r\nz\r\n",  # +OK
        b"*3\r\n$6\r\nRENAME\r\n$5\r\niso:l\r\n$5\r\niso:m\r\n",  # +OK
        b"*3\r\n$4\r\nHGET\r\n$5\r\niso:m\r\n$1\r\nf\r\n",  # -WRONGTYPE
        b"*2\r\n$6\r\nLRANGE\r\n$5\r\niso:m\r\n",  # -ERR wrong number of arguments
        b"*4\r\n$4\r\nLSET\r\n$5\r\niso:m\r\n$2\r\n99\r\n$1\r\nz\r\n",  # -ERR index out of range
        b"*4\r\n$4\r\nHSET\r\n$5\r\niso:h\r\n$1\r\nf\r\n$2\r\nOK\r\n",
        b"*3\r\n$4\r\nHGET\r\n$5\r\niso:h\r\n$1\r\nf\r\n",  # a bulk "OK" stays bulk
        b"*2\r\n$5\r\nNOSUCHCMD\r\n$1\r\nx\r\n",
        b"*4\r\n$6\r\nLRANGE\r\n$5\r\niso:m\r\n$1\r\n0\r\n$2\r\n-1\r\n",
        b"*5\r\n$4\r\nZADD\r\n$5\r\niso:z\r\n$1\r\n1\r\n$1\r\na\r\n$1\r\nb\r\n",  # -ERR syntax / not a float
    ]
    commands[8] = b"*2\r\n$9\r\nNOSUCHCMD\r\n$1\r\nx\r\n"
    commands.append(b"*4\r\n$5\r\nLMPOP\r\n$1\r\n1\r\n$9\r\niso:empty\r\n$4\r\nLEFT\r\n")  # *-1
    direct = redis.Redis(port=redis_standalone.port)
    try:
        expected = []
        for c in commands:
            expected.append(raw(redis_standalone.port, c))
        direct.delete("iso:l", "iso:m", "iso:h", "iso:z")
        got = [raw(relay_node.port, c) for c in commands]
        assert got[1] == b"+OK\r\n" and got[2] == b"+OK\r\n" and got[7] == b"$2\r\nOK\r\n"
        assert got[3].startswith(b"-WRONGTYPE ") and got[-1] == b"*-1\r\n"
        assert got == expected
    finally:
        direct.delete("iso:l", "iso:m", "iso:h", "iso:z")
        direct.close()


def test_stateless_reads_of_a_stream_pass_without_block(relay_node: Any) -> None:
    r = redis.Redis(port=relay_node.port)
    try:
        r.xadd("iso:s", {"a": "1"})
        got = r.xread({"iso:s": "0"}, count=10)
        assert got and got[0][1][0][1] == {b"a": b"1"}
    finally:
        r.delete("iso:s")
        r.close()


def test_a_resp3_client_gets_maps_from_a_relayed_command(relay_node: Any) -> None:
    """RESP3 replies are relayed through redis-py's RESP3 parser: maps stay maps (a set arrives as
    an array and a status as a bulk string, which RESP3 clients read alike)."""
    r = redis.Redis(port=relay_node.port, protocol=2)
    try:
        r.hset("iso:h3", mapping={"a": "1"})
        r.sadd("iso:s3", "x")
        got = raw(
            relay_node.port,
            b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n",
            b"*2\r\n$7\r\nHGETALL\r\n$6\r\niso:h3\r\n",
            b"*2\r\n$8\r\nSMEMBERS\r\n$6\r\niso:s3\r\n",
        )
        assert got.endswith(b"%1\r\n$1\r\na\r\n$1\r\n1\r\n*1\r\n$1\r\nx\r\n"), got[-60:]
    finally:
        r.delete("iso:h3", "iso:s3")
        r.close()


def test_a_transaction_relayed_to_a_cluster_runs_in_one_slot(tmp_path: Path, redis_cluster: Any) -> None:
    node = start_server(tmp_path, "--store", redis_cluster.url)
    r = redis.Redis(port=node.port)
    try:
        with r.pipeline() as p:
            p.set("{t}a", "1").incr("{t}a").hset("{t}h", "f", "v").get("{t}a")
            assert p.execute() == [True, 2, 1, b"2"]
        with r.pipeline() as p, pytest.raises(redis.ResponseError, match=r"CROSSSLOT|slot"):
            p.set("{t}a", "1").set("{u}b", "2")
            p.execute()
        assert r.get("{t}a") == b"2"  # nothing of the refused transaction was applied
    finally:
        r.delete("{t}a"), r.delete("{t}h")
        r.close()
        node.stop()


def test_keymiss_records_cannot_be_written_by_keymiss_own_commands_either(
    relay_node: Any, redis_standalone: Any
) -> None:
    """A forged lease (SET keymiss:lease:<key>) would block that key on every node for its TTL."""
    r = redis.Redis(port=relay_node.port)
    direct = redis.Redis(port=redis_standalone.port)
    try:
        for command in (
            ("SET", "keymiss:lease:double:9", "forged", "EX", "600"),
            ("SETEX", "keymiss:lease:double:9", "600", "x"),
            ("MSET", "ok:1", "1", "keymiss:ctx:doc", "x"),
            ("DEL", "keymiss:lease:double:9"),
            ("EXPIRE", "keymiss:ctx:doc", "1"),
            ("INCR", "keymiss:n"),
            ("APPEND", "keymiss:ctx:doc", "x"),
            ("GETDEL", "keymiss:ctx:doc"),
        ):
            with pytest.raises(redis.ResponseError, match="keymiss's own"):
                r.execute_command(*command)
        with r.pipeline() as p, pytest.raises(redis.ResponseError):  # inside MULTI too
            p.set("ok:2", "1").incr("keymiss:n")
            p.execute()
        assert direct.exists("keymiss:lease:double:9", "keymiss:n", "ok:1", "ok:2") == 0
        with pytest.raises(redis.ResponseError, match="KEYMISS FORGET"):
            r.flushdb()
        direct.set("keymiss:lease:probe", "1")
        direct.set("visible:1", "1")
        assert b"visible:1" in r.keys("*") and not [k for k in r.keys("*") if k.startswith(b"keymiss:")]
        assert r.get("double:9") == b"18"  # the keyspace is computed as ever
    finally:
        direct.delete("keymiss:lease:probe", "visible:1", "double:9")
        r.close(), direct.close()
