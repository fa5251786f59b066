"""Connection and operator commands: PING, AUTH, HELLO, CLIENT, COMMAND, CONFIG, INFO, KEYMISS."""

from __future__ import annotations

import hmac
import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..glob import compile_glob
from ..sizes import format_size
from . import resp
from .commands import SYNTAX, TABLE, CommandError, Reply, arg, command, key_of, to_int

if TYPE_CHECKING:
    from .connection import Connection

#: The Redis release whose commands and replies keymiss follows; clients that gate features on
#: the server version read it from HELLO and INFO.
REDIS_COMPAT_VERSION = "7.2.0"


@command(
    "ping",
    -1,
    flags=("fast",),
    group="connection",
    summary="Ping the server.",
    arguments=[arg("message", optional=True)],
)
def cmd_ping(c: Connection, args: list[bytes]) -> Reply:
    if len(args) > 2:
        raise CommandError("ERR wrong number of arguments for 'ping' command")
    return resp.PONG if len(args) == 1 else resp.bulk(args[1])


@command(
    "echo", 2, flags=("fast",), group="connection", summary="Return the message.", arguments=[arg("message")]
)
def cmd_echo(c: Connection, args: list[bytes]) -> Reply:
    return resp.bulk(args[1])


@command("quit", -1, flags=("noauth", "fast"), group="connection", summary="Close the connection.")
def cmd_quit(c: Connection, args: list[bytes]) -> Reply:
    c.close_after_reply = True
    return resp.OK


@command(
    "select",
    2,
    flags=("fast",),
    group="connection",
    summary="Select database 0 (the only one).",
    arguments=[arg("index", "integer")],
)
def cmd_select(c: Connection, args: list[bytes]) -> Reply:
    if to_int(args[1]) != 0:
        raise CommandError("ERR DB index is out of range")
    return resp.OK


def _check_password(c: Connection, user: bytes, password: bytes) -> None:
    expected = c.server.settings.requirepass
    if expected is None:
        if user.lower() == b"default":
            c.authenticated = True
            return
        raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
    if user.lower() != b"default" or not hmac.compare_digest(password, expected.encode()):
        c.server.auth_failures += 1
        raise CommandError("WRONGPASS invalid username-password pair or user is disabled.")
    c.authenticated = True


@command(
    "auth",
    -2,
    flags=("noauth", "fast"),
    group="connection",
    summary="Authenticate the connection.",
    arguments=[arg("username", optional=True), arg("password")],
)
def cmd_auth(c: Connection, args: list[bytes]) -> Reply:
    if len(args) > 3:
        raise CommandError(SYNTAX)
    if len(args) == 2 and c.server.settings.requirepass is None:
        raise CommandError(
            "ERR AUTH <password> called without any password configured for the default user. "
            "Are you sure your configuration is correct?"
        )
    user, password = (b"default", args[1]) if len(args) == 2 else (args[1], args[2])
    _check_password(c, user, password)
    return resp.OK


@command(
    "hello",
    -1,
    flags=("noauth", "fast"),
    group="connection",
    summary="Handshake: choose RESP2 or RESP3, optionally authenticate and name the connection.",
    arguments=[arg("protover", "integer", optional=True)],
)
def cmd_hello(c: Connection, args: list[bytes]) -> Reply:
    proto = c.proto
    if len(args) >= 2:
        ver = resp._strict_int(args[1])
        if ver is None:
            raise CommandError("ERR Protocol version is not an integer or out of range")
        if ver not in (2, 3):
            raise CommandError("NOPROTO unsupported protocol version")
        proto = ver
    i = 2
    name: bytes | None = None
    while i < len(args):
        opt = args[i].lower()
        if opt == b"auth" and i + 2 < len(args):
            _check_password(c, args[i + 1], args[i + 2])
            i += 3
        elif opt == b"setname" and i + 1 < len(args):
            name = args[i + 1]
            i += 2
        else:
            raise CommandError(f"ERR Syntax error in HELLO option '{args[i].decode(errors='replace')}'")
    if not c.authenticated:
        raise CommandError(
            "NOAUTH HELLO must be called with the client already authenticated, otherwise the "
            "HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
            "select the RESP protocol version at the same time"
        )
    if name is not None:
        _set_name(c, name)
    c.proto = proto
    info = {
        "server": "redis",
        "version": REDIS_COMPAT_VERSION,
        "proto": proto,
        "id": c.id,
        "mode": "standalone",
        "role": "master",
        "modules": [],
    }
    return resp.encode(info, proto)


def _set_name(c: Connection, name: bytes) -> None:
    if any(ch <= 32 or ch > 126 for ch in name):
        raise CommandError("ERR Client names cannot contain spaces, newlines or special characters.")
    c.name = name.decode()


@command(
    "client",
    -2,
    flags=(),
    group="connection",
    summary="Inspect and name client connections.",
    subcommands=("id", "setname", "getname", "info", "list", "setinfo", "no-evict", "no-touch"),
)
def cmd_client(c: Connection, args: list[bytes]) -> Reply:
    sub = args[1].lower()
    if sub == b"id" and len(args) == 2:
        return resp.integer(c.id)
    if sub == b"setname" and len(args) == 3:
        _set_name(c, args[2])
        return resp.OK
    if sub == b"getname" and len(args) == 2:
        return resp.null(c.proto) if not c.name else resp.bulk(c.name.encode())
    if sub == b"info" and len(args) == 2:
        return resp.verbatim(c.describe() + "\n", c.proto)
    if sub == b"list" and len(args) == 2:
        return resp.verbatim("".join(x.describe() + "\n" for x in c.server.connections.values()), c.proto)
    if sub == b"setinfo" and len(args) == 4:
        attr = args[2].lower()
        if attr not in (b"lib-name", b"lib-ver"):
            raise CommandError(f"ERR Unrecognized option '{args[2].decode(errors='replace')}'")
        c.lib[attr.decode()] = args[3].decode(errors="replace")
        return resp.OK
    if sub in (b"no-evict", b"no-touch") and len(args) == 3:
        return resp.OK
    if sub in (b"id", b"setname", b"getname", b"info", b"list", b"setinfo"):
        raise CommandError(f"ERR wrong number of arguments for 'client|{sub.decode()}' command")
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try CLIENT HELP.")


# --- COMMAND ---------------------------------------------------------------------------------------------
def _command_info(name: bytes) -> list[Any]:
    cmd = TABLE[name]
    return [
        cmd.name,
        cmd.arity,
        [f for f in cmd.flags],
        cmd.first_key,
        cmd.last_key,
        cmd.step,
        [f"@{cmd.group}"],
        [],
        [],
        [f"{cmd.name}|{s}" for s in cmd.subcommands],
    ]


def _command_doc(name: bytes) -> dict[str, Any]:
    cmd = TABLE[name]
    return {
        "summary": cmd.summary or f"{cmd.name.upper()} command",
        "since": "1.0.0",
        "group": cmd.group,
        "arguments": cmd.arguments,
    }


@command(
    "command",
    -1,
    flags=("loading", "stale"),
    group="server",
    summary="Describe the commands keymiss understands.",
    subcommands=("count", "docs", "info", "list"),
)
def cmd_command(c: Connection, args: list[bytes]) -> Reply:
    if len(args) == 1:
        return resp.encode([_command_info(n) for n in sorted(TABLE)], c.proto)
    sub = args[1].lower()
    names = [a.lower() for a in args[2:]]
    if sub == b"count":
        return resp.integer(len(TABLE))
    if sub == b"list":
        return resp.encode(sorted(cmd.name for cmd in TABLE.values()), c.proto)
    if sub == b"info":
        return resp.encode(
            [_command_info(n) if n in TABLE else None for n in (names or sorted(TABLE))], c.proto
        )
    if sub == b"docs":
        wanted = [n for n in (names or sorted(TABLE)) if n in TABLE]
        return resp.encode({n.decode(): _command_doc(n) for n in wanted}, c.proto)
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try COMMAND HELP.")


# --- CONFIG ----------------------------------------------------------------------------------------------
def _config_values(c: Connection) -> dict[str, str]:
    s = c.server.settings
    store = c.km.store.info()
    return {
        "bind": s.host,
        "port": str(s.port),
        "save": "",
        "appendonly": "no",
        "databases": "1",
        "maxclients": str(s.max_clients),
        "maxmemory": str(store.get("max_bytes", 0)),
        "maxmemory-policy": str(store.get("eviction_policy", "none")),
        "timeout": "0",
        "proto-max-bulk-len": str(s.size("max_bulk")),
        "client-query-buffer-limit": str(s.size("query_buffer")),
        "keymiss-store": str(store.get("store")),
        "keymiss-max-in-flight": str(c.km.max_in_flight),
    }


@command(
    "config",
    -2,
    flags=(),
    group="server",
    summary="Read the server configuration (CONFIG GET).",
    subcommands=("get",),
)
def cmd_config(c: Connection, args: list[bytes]) -> Reply:
    sub = args[1].lower()
    if sub == b"get":
        if len(args) < 3:
            raise CommandError("ERR wrong number of arguments for 'config|get' command")
        values = _config_values(c)
        out: dict[str, str] = {}
        for raw in args[2:]:
            matches = compile_glob(key_of(raw).lower())
            out.update({k: v for k, v in values.items() if matches(k)})
        return resp.encode(out, c.proto)
    if sub in (b"set", b"resetstat", b"rewrite"):
        raise CommandError(f"ERR CONFIG {sub.decode().upper()} is not supported; restart with new settings")
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try CONFIG HELP.")


# --- INFO ------------------------------------------------------------------------------------------------
def _rss() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _field(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value).replace("\r", " ").replace("\n", " ")


def info_sections(c: Connection) -> dict[str, dict[str, Any]]:
    srv = c.server
    km = c.km
    store = km.store.info()
    uptime = int(time.time() - srv.started_at)
    rss = _rss()
    sections: dict[str, dict[str, Any]] = {
        "server": {
            "redis_version": REDIS_COMPAT_VERSION,
            "keymiss_version": __version__,
            "redis_mode": "standalone",
            "os": f"{platform.system()} {platform.release()} {platform.machine()}",
            "arch_bits": 64 if sys.maxsize > 2**32 else 32,
            "multiplexing_api": srv.loop_name,
            "python_version": platform.python_version(),
            "process_id": os.getpid(),
            "tcp_port": srv.port,
            "uptime_in_seconds": uptime,
            "uptime_in_days": uptime // 86400,
            "config_file": srv.config_file or "",
        },
        "clients": {
            "connected_clients": len(srv.connections),
            "maxclients": srv.settings.max_clients,
            "blocked_clients": sum(1 for x in srv.connections.values() if x.waiting),
        },
        "memory": {
            "used_memory": rss,
            "used_memory_human": format_size(rss),
            "used_memory_rss": rss,
            "used_memory_dataset": store.get("used_bytes", 0),
            "maxmemory": store.get("max_bytes", 0),
            "maxmemory_human": format_size(int(store.get("max_bytes", 0))),
            "maxmemory_policy": store.get("eviction_policy", "none"),
            "keymiss_store": store.get("store"),
        },
        "stats": {
            "total_connections_received": srv.total_connections,
            "total_commands_processed": srv.total_commands,
            "rejected_connections": srv.rejected_connections,
            "expired_keys": store.get("expired", 0),
            "evicted_keys": store.get("evictions", 0),
            "keyspace_hits": km.hits,
            "keyspace_misses": km.misses,
            "total_error_replies": srv.error_replies,
            "client_output_buffer_disconnections": srv.output_disconnections,
            "slow_request_disconnections": srv.slow_request_disconnections,
        },
        "keyspace": {},
        "keymiss": {
            "keymiss_keyspaces": len(km.registry),
            "keymiss_in_flight": len(km._flights),
            "keymiss_max_in_flight": km.max_in_flight,
            "keymiss_busy_rejections": srv.busy_rejections,
        },
    }
    keys = store.get("keys", 0)
    if keys:
        sections["keyspace"]["db0"] = f"keys={keys},expires=0,avg_ttl=0"
    for i, ks in enumerate(km.registry):
        st = ks.stats
        sections["keymiss"][f"keyspace_{i}"] = ",".join(
            f"{k}={_field(v)}"
            for k, v in (
                ("pattern", ks.pattern.replace(",", "%2C").replace("=", "%3D")),
                ("hits", st.hits),
                ("misses", st.misses),
                ("computations", st.computations),
                ("calls", st.calls),
                ("errors", st.errors),
                ("timeouts", st.timeouts),
                ("in_flight", st.in_flight),
                ("coalesced", st.coalesced),
                ("evictions", st.evictions),
                ("mean_compute_seconds", st.mean_compute_seconds),
                ("compute_seconds_saved", st.seconds_saved),
            )
        )
    return sections


DEFAULT_SECTIONS = ("server", "clients", "memory", "stats", "keyspace", "keymiss")


@command(
    "info",
    -1,
    flags=("loading", "stale"),
    group="server",
    summary="Server, client, memory, stats, keyspace and per-keyspace keymiss counters.",
    arguments=[arg("section", optional=True, multiple=True)],
)
def cmd_info(c: Connection, args: list[bytes]) -> Reply:
    sections = info_sections(c)
    wanted = [a.decode(errors="replace").lower() for a in args[1:]]
    if not wanted or any(w in ("default", "all", "everything") for w in wanted):
        names = list(DEFAULT_SECTIONS)
    else:
        names = [w for w in DEFAULT_SECTIONS if w in wanted]
    lines: list[str] = []
    for name in names:
        if lines:
            lines.append("")
        lines.append(f"# {name.capitalize()}")
        lines.extend(f"{k}:{_field(v)}" for k, v in sections[name].items())
    return resp.verbatim("\r\n".join(lines) + "\r\n", c.proto)


# --- KEYMISS ---------------------------------------------------------------------------------------------
@command(
    "keymiss",
    -2,
    flags=(),
    group="keymiss",
    summary="Operator commands: KEYSPACES, STATS, FORGET.",
    subcommands=("keyspaces", "stats", "forget"),
)
def cmd_keymiss(c: Connection, args: list[bytes]) -> Reply:
    sub = args[1].lower()
    if sub == b"keyspaces" and len(args) == 2:
        return resp.encode([ks.describe() for ks in c.km.registry], c.proto)
    if sub == b"stats" and len(args) == 2:
        stats = c.km.stats()
        stats["server"] = {
            "connected_clients": len(c.server.connections),
            "total_commands_processed": c.server.total_commands,
            "busy_rejections": c.server.busy_rejections,
        }
        return resp.encode(stats, c.proto)
    if sub == b"forget" and len(args) == 3:
        pattern = key_of(args[2])

        async def later() -> bytes:
            return resp.integer(await c.km.forget(pattern))

        return later()
    if sub in (b"keyspaces", b"stats", b"forget"):
        raise CommandError(f"ERR wrong number of arguments for 'keymiss|{sub.decode()}' command")
    raise CommandError(
        f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. "
        "Try KEYMISS KEYSPACES, STATS or FORGET."
    )
