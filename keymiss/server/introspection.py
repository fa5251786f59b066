"""Introspection and operator commands: COMMAND, CONFIG, INFO and KEYMISS KEYSPACES|STATS|FORGET.

Split from the connection commands (``session``): these describe the server, its command table, its
configuration and its keyspaces to clients and operators.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import TYPE_CHECKING, Any

from keymiss.engine.keyapi import FORGET_COMMAND, FORGET_USAGE, TAG_WORD
from keymiss.glob import compile_glob
from keymiss.server import reply
from keymiss.server.commands import TABLE, CommandError, Reply, arg, command, key_of
from keymiss.server.session import REDIS_COMPAT_VERSION
from keymiss.sizes import format_size
from keymiss.stats import INFO_KEYSPACE_LINE, INFO_SECTION, SHARED_COUNTERS, info_name
from keymiss.version import __version__

if TYPE_CHECKING:
    from keymiss.server.client import Client


# --- COMMAND ---------------------------------------------------------------------------------------------
def _command_info(name: bytes) -> list[Any]:
    cmd = TABLE[name]
    return [
        cmd.name,
        cmd.arity,
        [reply.Status(f) for f in cmd.flags],
        cmd.first_key,
        cmd.last_key,
        cmd.step,
        [reply.Status(f"@{cmd.group}")],
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
def cmd_command(c: Client, args: list[bytes]) -> Reply:
    if len(args) == 1:
        return reply.encode([_command_info(n) for n in sorted(TABLE)], c.proto)
    sub = args[1].lower()
    names = [a.lower() for a in args[2:]]
    if sub == b"count":
        if len(args) != 2:
            raise CommandError("ERR wrong number of arguments for 'command|count' command")
        return reply.integer(len(TABLE))
    if sub == b"list":
        return reply.encode(sorted(cmd.name for cmd in TABLE.values()), c.proto)
    if sub == b"info":
        return reply.encode(
            [_command_info(n) if n in TABLE else None for n in (names or sorted(TABLE))], c.proto
        )
    if sub == b"docs":
        wanted = [n for n in (names or sorted(TABLE)) if n in TABLE]
        return reply.encode({n.decode(): _command_doc(n) for n in wanted}, c.proto)
    raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try COMMAND HELP.")


# --- CONFIG ----------------------------------------------------------------------------------------------
def _config_values(c: Client) -> dict[str, str]:
    s = c.server.settings
    store = c.km.store.info()
    return {
        "bind": s.host,
        "port": str(s.port),
        "save": "",
        "appendonly": "no",
        "databases": "1",
        "maxclients": str(s.max_clients),
        "maxmemory": str(store.max_bytes),
        "maxmemory-policy": store.eviction_policy,
        "timeout": "0",
        "proto-max-bulk-len": str(s.size("max_bulk")),
        "client-query-buffer-limit": str(s.size("query_buffer")),
        "keymiss-store": store.store,
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
def cmd_config(c: Client, args: list[bytes]) -> Reply:
    sub = args[1].lower()
    if sub == b"get":
        if len(args) < 3:
            raise CommandError("ERR wrong number of arguments for 'config|get' command")
        values = _config_values(c)
        out: dict[str, str] = {}
        for raw in args[2:]:
            matches = compile_glob(key_of(raw).lower())
            out.update({k: v for k, v in values.items() if matches(k)})
        return reply.encode(out, c.proto)
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


def info_sections(c: Client) -> dict[str, dict[str, Any]]:
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
            "used_memory_dataset": store.used_bytes,
            "maxmemory": store.max_bytes,
            "maxmemory_human": format_size(store.max_bytes),
            "maxmemory_policy": store.eviction_policy,
            "keymiss_store": store.store,
        },
        "stats": {
            "total_connections_received": srv.total_connections,
            "total_commands_processed": srv.total_commands,
            "rejected_connections": srv.rejected_connections,
            "expired_keys": store.expired,
            "evicted_keys": store.evictions,
            "keyspace_hits": km.hits,
            "keyspace_misses": km.misses,
            "total_error_replies": srv.error_replies,
            "client_output_buffer_disconnections": srv.output_disconnections,
            "slow_request_disconnections": srv.slow_request_disconnections,
        },
        "keyspace": {},
        "keymiss": {
            "keymiss_keyspaces": len(km.registry),
            "keymiss_in_flight": km.engine.in_flight,
            "keymiss_stuck_handlers": km.engine.stuck_handlers(),
            "keymiss_max_in_flight": km.max_in_flight,
            "keymiss_busy_rejections": srv.busy_rejections,
            "keymiss_remembered_errors": len(km.engine.errors),
            "keymiss_remembered_error_bytes": km.engine.errors.bytes,
            "keymiss_remembered_error_limit": km.engine.errors.max_bytes,
        },
    }
    qa = km.extensions.get("qa_path")
    if isinstance(qa, dict):  # the numeric path the QA reader chose for this machine, and why
        sections["keymiss"]["keymiss_qa_dtype"] = qa["dtype"]
        sections["keymiss"]["keymiss_qa_dtype_reason"] = qa["why"]
        if "backend" in qa:
            sections["keymiss"]["keymiss_qa_backend"] = qa["backend"]
            sections["keymiss"]["keymiss_qa_backend_reason"] = qa["backend_why"]
    keys = store.keys
    if keys:
        sections["keyspace"]["db0"] = f"keys={keys},expires=0,avg_ttl=0"
    for i, ks in enumerate(km.registry):
        line = _keyspace_line(c, ks)
        sections["keymiss"][f"{INFO_KEYSPACE_LINE}{i}"] = line
        # an earlier release's name of the line, shown for one release beside the module's word
        sections["keymiss"][f"keyspace_{i}"] = line
    return sections


def _keyspace_line(c: Client, ks: Any) -> str:
    """One keyspace's ``INFO keymiss`` value: first the fields both servers show
    (``SHARED_KEYSPACE_FIELDS``, the module's words and units), then the Python server's own."""
    st = ks.stats
    version = ks.describe()["version"]
    shared: dict[str, Any] = {
        "pattern": info_name(ks.pattern),
        **{name: getattr(st, name) for name in SHARED_COUNTERS},
        "queued": c.km.engine.queued(ks.pattern),
        "in_flight": st.in_flight,
        "mean_compute_seconds": st.mean_compute_seconds,
        "p50_compute_seconds": st.p50_compute_seconds,
        "p99_compute_seconds": st.p99_compute_seconds,
    }
    own = {
        "version": "" if version is None else info_name(version),
        "calls": st.calls,
        "stuck": st.stuck,
        "coalesced": st.coalesced,
        "evictions": st.evictions,
        "compute_seconds_saved": st.seconds_saved,
    }
    return ",".join(f"{k}={_field(v)}" for k, v in {**shared, **own}.items())


DEFAULT_SECTIONS = ("server", "clients", "memory", "stats", "keyspace", "keymiss")


@command(
    "info",
    -1,
    flags=("loading", "stale"),
    group="server",
    summary="Server, client, memory, stats, keyspace and per-keyspace keymiss counters.",
    arguments=[arg("section", optional=True, multiple=True)],
)
def cmd_info(c: Client, args: list[bytes]) -> Reply:
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
        # Redis's sections by Redis's names; keymiss's as Valkey shows the module's: ``# keymiss``
        lines.append(f"# {name if name == INFO_SECTION else name.capitalize()}")
        lines.extend(f"{k}:{_field(v)}" for k, v in sections[name].items())
    return reply.verbatim("\r\n".join(lines) + "\r\n", c.proto)


# --- KEYMISS ---------------------------------------------------------------------------------------------
@command(
    "keymiss",
    -2,
    flags=(),
    group="keymiss",
    summary="Operator commands: KEYSPACES, STATS, FORGET.",
    subcommands=("keyspaces", "stats", "forget"),
)
def cmd_keymiss(c: Client, args: list[bytes]) -> Reply:
    sub = args[1].lower()
    if sub == b"keyspaces" and len(args) == 2:
        return reply.encode([ks.describe() for ks in c.km.registry], c.proto)
    if sub == b"stats" and len(args) == 2:
        stats = c.km.stats()
        stats["server"] = {
            "connected_clients": len(c.server.connections),
            "total_commands_processed": c.server.total_commands,
            "busy_rejections": c.server.busy_rejections,
        }
        return reply.encode(stats, c.proto)
    if sub == b"forget" and len(args) in (3, 4):
        return _forget(c, args[2:])
    if sub in (b"keyspaces", b"stats", b"forget"):
        raise CommandError(f"ERR wrong number of arguments for 'keymiss|{sub.decode()}' command")
    raise CommandError(
        f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. "
        "Try KEYMISS KEYSPACES, STATS or FORGET."
    )


@command(
    FORGET_COMMAND.lower(),
    -2,
    flags=("write",),
    group="keymiss",
    summary="Forget computed values by glob, or by tag (TAG tag); the module's spelling.",
)
def cmd_forget(c: Client, args: list[bytes]) -> Reply:
    if len(args) not in (2, 3):
        raise CommandError(f"ERR wrong number of arguments for '{FORGET_COMMAND.lower()}' command")
    return _forget(c, args[1:])


def _forget(c: Client, args: list[bytes]) -> Reply:
    """``FORGET pattern`` or ``FORGET TAG tag``: as ``km.forget`` / ``km.forget_tag``."""
    if len(args) == 2 and args[0].upper() != TAG_WORD.encode():
        raise CommandError(FORGET_USAGE)
    what = key_of(args[-1])

    async def later() -> bytes:
        n = await (c.km.forget_tag(what) if len(args) == 2 else c.km.forget(what))
        return reply.integer(n)

    return later()
