"""The command table and the data commands (GET, MGET, SET, DEL, TTL, SCAN, …).

A handler takes the connection and the arguments (command name first) and returns the encoded reply,
or an awaitable of it when it must wait (a miss being computed, a durable write). Hits on in-process
stores are answered inline, without a task, so they stay fast while a model runs elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    BusyError,
    CodecError,
    KeymissError,
    KeyspaceError,
    StoreError,
)
from ..stores.base import Item, LocalStore
from . import resp

if TYPE_CHECKING:
    from .connection import Connection

Reply = bytes | Awaitable[bytes]
Handler = Callable[["Connection", list[bytes]], Reply]


class CommandError(Exception):
    """A command-level error; ``str(self)`` is the whole error line (``ERR syntax error``)."""


SYNTAX = "ERR syntax error"
NOT_INT = "ERR value is not an integer or out of range"


@dataclass
class Command:
    """One entry of the command table, with what COMMAND and COMMAND DOCS report about it."""

    name: str
    handler: Handler
    arity: int  # Redis convention: N exact, -N at least N (the name counts)
    flags: tuple[str, ...] = ()
    first_key: int = 0
    last_key: int = 0
    step: int = 0
    group: str = "generic"
    summary: str = ""
    arguments: list[dict[str, Any]] = field(default_factory=list)
    subcommands: tuple[str, ...] = ()


TABLE: dict[bytes, Command] = {}


def command(
    name: str,
    arity: int,
    *,
    flags: tuple[str, ...] = (),
    keys: tuple[int, int, int] = (0, 0, 0),
    group: str = "generic",
    summary: str = "",
    arguments: list[dict[str, Any]] | None = None,
    subcommands: tuple[str, ...] = (),
) -> Callable[[Handler], Handler]:
    """Register a handler in the table."""

    def register(fn: Handler) -> Handler:
        TABLE[name.lower().encode()] = Command(
            name.lower(), fn, arity, flags, *keys, group, summary, arguments or [], subcommands
        )
        return fn

    return register


def arg(
    name: str, kind: str = "string", *, optional: bool = False, multiple: bool = False, token: str = ""
) -> dict[str, Any]:
    """An argument description for COMMAND DOCS (what redis-cli turns into hints)."""
    flags = [f for f, on in (("optional", optional), ("multiple", multiple)) if on]
    doc: dict[str, Any] = {"name": name, "type": kind}
    if token:
        doc["token"] = token
    if flags:
        doc["flags"] = flags
    return doc


# --- helpers -------------------------------------------------------------------------------------------
def key_of(raw: bytes) -> str:
    """Keys are binary-safe: undecodable bytes survive as surrogates and encode back unchanged."""
    return raw.decode("utf-8", "surrogateescape")


def to_int(raw: bytes, message: str = NOT_INT) -> int:
    value = resp._strict_int(raw)
    if value is None:
        raise CommandError(message)
    return value


def error_reply(exc: BaseException) -> bytes:
    """The error line a client sees for an exception raised while serving a command."""
    if isinstance(exc, CommandError):
        return resp.error(str(exc))
    if isinstance(exc, BusyError):
        return resp.error(f"BUSY {exc}")
    if isinstance(exc, KeyspaceError | CodecError):
        return resp.error(f"ERR {exc}")
    if isinstance(exc, StoreError):
        return resp.error(f"ERR store error: {exc}")
    if isinstance(exc, KeymissError):
        return resp.error(f"ERR {exc}")
    return resp.error(f"ERR internal error ({type(exc).__name__}); see the server log")


def _local(c: Connection) -> LocalStore | None:
    store = c.km.store
    return store if isinstance(store, LocalStore) else None


def _item_reply(item: Item | None, proto: int) -> bytes:
    return resp.null(proto) if item is None else resp.bulk(item.value)


# --- reads ---------------------------------------------------------------------------------------------
@command(
    "get",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Get the value of a key; a miss in a registered keyspace is computed, stored and returned.",
    arguments=[arg("key", "key")],
)
def cmd_get(c: Connection, args: list[bytes]) -> Reply:
    key = key_of(args[1])
    km = c.km
    if c.local_store:
        item = km.peek(key)
        if item is not None:
            return resp.bulk(item.value)
        if km.plain_miss(key):
            return resp.null(c.proto)
        return _fill_reply(c, key)
    if c.near_cache:
        item = km.peek_cached(key)
        if item is not None:
            return resp.bulk(item.value)
    return _get_reply(c, key)


async def _fill_reply(c: Connection, key: str) -> bytes:
    return _item_reply(await c.km.fill(key), c.proto)


async def _get_reply(c: Connection, key: str) -> bytes:
    return _item_reply(await c.km.get_item(key), c.proto)


@command(
    "mget",
    -2,
    flags=("readonly", "fast"),
    keys=(1, -1, 1),
    group="string",
    summary="Get the values of several keys; misses are computed concurrently and batched.",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_mget(c: Connection, args: list[bytes]) -> Reply:
    keys = [key_of(a) for a in args[1:]]
    if c.local_store:
        items = c.km.peek_many(keys)
        if items is not None:
            return resp.array(_item_reply(i, c.proto) for i in items)
    return _mget_reply(c, keys)


async def _mget_reply(c: Connection, keys: list[str]) -> bytes:
    # Failed keys become error entries inside the array: the other answers are not thrown away.
    results = await c.km.get_many_items(keys, return_exceptions=True)
    parts = []
    for r in results:
        if isinstance(r, BaseException):
            parts.append(error_reply(r))
        else:
            parts.append(_item_reply(r, c.proto))
    return resp.array(parts)


@command(
    "getex",
    -2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Get the value of a key (computing it on a miss) and optionally set its expiration.",
    arguments=[arg("key", "key"), arg("expiration", "oneof", optional=True)],
)
def cmd_getex(c: Connection, args: list[bytes]) -> Reply:
    key = key_of(args[1])
    opts = [a.lower() for a in args[2:]]
    ttl: float | None = None
    persist = False
    if opts:
        if opts == [b"persist"]:
            persist = True
        elif len(opts) == 2 and opts[0] in (b"ex", b"px", b"exat", b"pxat"):
            ttl = _expiry(opts[0], args[3], "getex")
        else:
            raise CommandError(SYNTAX)
    return _getex(c, key, ttl, persist, bool(opts))


async def _getex(c: Connection, key: str, ttl: float | None, persist: bool, change: bool) -> bytes:
    item = await c.km.get_item(key)
    if item is not None and change:
        if persist:
            await c.km.store.expire(key, None)
        elif ttl is not None:
            await c.km.store.expire(key, ttl)
    return _item_reply(item, c.proto)


@command(
    "exists",
    -2,
    flags=("readonly", "fast"),
    keys=(1, -1, 1),
    summary="Count how many of the keys exist (nothing is computed).",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_exists(c: Connection, args: list[bytes]) -> Reply:
    keys = [key_of(a) for a in args[1:]]
    store = _local(c)
    if store is not None:
        return resp.integer(store.exists_now(keys))
    return _int_of(c.km.store.exists(keys))


async def _int_of(aw: Awaitable[int]) -> bytes:
    return resp.integer(int(await aw))


@command(
    "ttl",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="Seconds to live of a key; -1 without expiry, -2 if missing.",
    arguments=[arg("key", "key")],
)
def cmd_ttl(c: Connection, args: list[bytes]) -> Reply:
    return _ttl(c, key_of(args[1]), 1000)


@command(
    "pttl",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="Milliseconds to live of a key; -1 without expiry, -2 if missing.",
    arguments=[arg("key", "key")],
)
def cmd_pttl(c: Connection, args: list[bytes]) -> Reply:
    return _ttl(c, key_of(args[1]), 1)


def _ttl(c: Connection, key: str, unit: int) -> Reply:
    def fmt(ms: int) -> bytes:
        return resp.integer(ms if ms < 0 else (ms + unit // 2) // unit)

    store = _local(c)
    if store is not None:
        return fmt(store.pttl_now(key))

    async def later() -> bytes:
        return fmt(await c.km.store.pttl(key))

    return later()


@command(
    "type",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="The type of a key: string, or none.",
    arguments=[arg("key", "key")],
)
def cmd_type(c: Connection, args: list[bytes]) -> Reply:
    store = _local(c)
    key = key_of(args[1])
    if store is not None:
        return resp.simple("string" if store.get_now(key) is not None else "none")

    async def later() -> bytes:
        return resp.simple("string" if await c.km.store.get(key) is not None else "none")

    return later()


@command("dbsize", 1, flags=("readonly", "fast"), summary="The number of keys in the store.")
def cmd_dbsize(c: Connection, args: list[bytes]) -> Reply:
    return _int_of(c.km.store.dbsize())


@command(
    "scan",
    -2,
    flags=("readonly",),
    summary="Incrementally iterate the keys.",
    arguments=[
        arg("cursor", "integer"),
        arg("pattern", "pattern", optional=True, token="MATCH"),
        arg("count", "integer", optional=True, token="COUNT"),
        arg("type", "string", optional=True, token="TYPE"),
    ],
)
def cmd_scan(c: Connection, args: list[bytes]) -> Reply:
    cursor = resp._strict_int(args[1])
    if cursor is None or cursor < 0:
        raise CommandError("ERR invalid cursor")
    match: str | None = None
    count = 10
    only_strings = True
    i = 2
    while i < len(args):
        opt = args[i].lower()
        if i + 1 >= len(args):
            raise CommandError(SYNTAX)
        if opt == b"match":
            match = key_of(args[i + 1])
        elif opt == b"count":
            count = to_int(args[i + 1])
            if count < 1:
                raise CommandError(SYNTAX)
        elif opt == b"type":
            only_strings = args[i + 1].lower() == b"string"
        else:
            raise CommandError(SYNTAX)
        i += 2

    async def later() -> bytes:
        nxt, keys = await c.km.store.scan(cursor, match, count)
        if not only_strings:
            keys = []
        return (
            b"*2\r\n"
            + resp.bulk(str(nxt).encode())
            + resp.array(resp.bulk(k.encode("utf-8", "surrogateescape")) for k in keys)
        )

    return later()


# --- writes --------------------------------------------------------------------------------------------
def _expiry(opt: bytes, raw: bytes, cmd: str) -> float:
    """Seconds from now for EX/PX/EXAT/PXAT; Redis's errors for bad values."""
    n = to_int(raw)
    if opt == b"ex":
        ttl = float(n)
    elif opt == b"px":
        ttl = n / 1000
    elif opt == b"exat":
        ttl = n - time.time()
        if n <= 0:
            raise CommandError(f"ERR invalid expire time in '{cmd}' command")
        return max(ttl, 1e-9) if ttl > 0 else -1.0
    else:  # pxat
        if n <= 0:
            raise CommandError(f"ERR invalid expire time in '{cmd}' command")
        ttl = n / 1000 - time.time()
        return max(ttl, 1e-9) if ttl > 0 else -1.0
    if n <= 0:
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    return ttl


@command(
    "set",
    -3,
    flags=("write",),
    keys=(1, 1, 1),
    group="string",
    summary="Set a key to a value, with optional expiry and NX/XX conditions.",
    arguments=[
        arg("key", "key"),
        arg("value"),
        arg("condition", "oneof", optional=True),
        arg("get", "pure-token", optional=True, token="GET"),
        arg("expiration", "oneof", optional=True),
    ],
)
def cmd_set(c: Connection, args: list[bytes]) -> Reply:
    key = key_of(args[1])
    value = args[2]
    nx = xx = get = keep = False
    ttl: float | None = None
    expiry_seen = False
    i = 3
    n = len(args)
    while i < n:
        opt = args[i].lower()
        if opt == b"nx" and not xx:
            nx = True
        elif opt == b"xx" and not nx:
            xx = True
        elif opt == b"get":
            get = True
        elif opt == b"keepttl" and not expiry_seen:
            keep = expiry_seen = True
        elif opt in (b"ex", b"px", b"exat", b"pxat") and not expiry_seen and i + 1 < n:
            ttl = _expiry(opt, args[i + 1], "set")
            expiry_seen = True
            i += 1
        else:
            raise CommandError(SYNTAX)
        i += 1
    return _set(c, key, value, ttl, nx, xx, keep, get)


def _set(
    c: Connection, key: str, value: bytes, ttl: float | None, nx: bool, xx: bool, keep: bool, get: bool
) -> Reply:
    if ttl is not None and ttl < 0:  # an absolute expiry already in the past: Redis deletes
        ttl = None
        expired = True
    else:
        expired = False
    store = _local(c)
    old: Item | None = None
    if get and store is not None:
        old = store.get_now(key)

    def finish(ok: bool) -> bytes:
        if get:
            return _item_reply(old, c.proto)
        return resp.OK if ok else resp.null(c.proto)

    if store is not None and store.sync_writes:
        ok = store.set_now(key, value, ttl=ttl, nx=nx, xx=xx, keep_ttl=keep)
        if ok and expired:
            store.delete_now([key])
        return finish(ok)

    async def later() -> bytes:
        nonlocal old
        if get and store is None:
            old = await c.km.store.get(key)
        ok = await c.km.store.set(key, value, ttl=ttl, nx=nx, xx=xx, keep_ttl=keep)
        if ok and expired:
            await c.km.store.delete([key])
        return finish(ok)

    return later()


@command(
    "setex",
    4,
    flags=("write",),
    keys=(1, 1, 1),
    group="string",
    summary="Set a key with an expiry in seconds.",
    arguments=[arg("key", "key"), arg("seconds", "integer"), arg("value")],
)
def cmd_setex(c: Connection, args: list[bytes]) -> Reply:
    return _set(c, key_of(args[1]), args[3], _expiry(b"ex", args[2], "setex"), False, False, False, False)


@command(
    "psetex",
    4,
    flags=("write",),
    keys=(1, 1, 1),
    group="string",
    summary="Set a key with an expiry in milliseconds.",
    arguments=[arg("key", "key"), arg("milliseconds", "integer"), arg("value")],
)
def cmd_psetex(c: Connection, args: list[bytes]) -> Reply:
    return _set(c, key_of(args[1]), args[3], _expiry(b"px", args[2], "psetex"), False, False, False, False)


@command(
    "setnx",
    3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Set a key only if it does not exist; 1 if set.",
    arguments=[arg("key", "key"), arg("value")],
)
def cmd_setnx(c: Connection, args: list[bytes]) -> Reply:
    async def later() -> bytes:
        return resp.integer(int(await c.km.store.set(key_of(args[1]), args[2], nx=True)))

    return later()


@command(
    "mset",
    -3,
    flags=("write",),
    keys=(1, -1, 2),
    group="string",
    summary="Set several keys at once.",
    arguments=[arg("data", "block", multiple=True)],
)
def cmd_mset(c: Connection, args: list[bytes]) -> Reply:
    if len(args) % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'mset' command")
    from ..stores.base import Write

    writes = [Write(key_of(args[i]), args[i + 1]) for i in range(1, len(args), 2)]

    async def later() -> bytes:
        await c.km.store.set_many(writes)
        return resp.OK

    return later()


def _delete(c: Connection, keys: list[str]) -> Reply:
    store = _local(c)
    if store is not None and store.sync_writes:
        return resp.integer(store.delete_now(keys))
    return _int_of(c.km.store.delete(keys))


@command(
    "del",
    -2,
    flags=("write",),
    keys=(1, -1, 1),
    summary="Delete keys; returns how many existed.",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_del(c: Connection, args: list[bytes]) -> Reply:
    return _delete(c, [key_of(a) for a in args[1:]])


@command(
    "unlink",
    -2,
    flags=("write", "fast"),
    keys=(1, -1, 1),
    summary="Delete keys (same as DEL here).",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_unlink(c: Connection, args: list[bytes]) -> Reply:
    return _delete(c, [key_of(a) for a in args[1:]])


@command(
    "getdel",
    2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Get the value of a key and delete it (nothing is computed).",
    arguments=[arg("key", "key")],
)
def cmd_getdel(c: Connection, args: list[bytes]) -> Reply:
    key = key_of(args[1])

    async def later() -> bytes:
        item = await c.km.store.get(key)
        if item is not None:
            await c.km.store.delete([key])
        return _item_reply(item, c.proto)

    return later()


def _expire_cmd(c: Connection, args: list[bytes], unit: float, name: str) -> Reply:
    key = key_of(args[1])
    amount = to_int(args[2])
    flags = {a.lower() for a in args[3:]}
    if not flags <= {b"nx", b"xx", b"gt", b"lt"} or len(flags) != len(args) - 3:
        raise CommandError(f"ERR Unsupported option {args[3].decode(errors='replace')}")
    if (b"nx" in flags and flags & {b"xx", b"gt", b"lt"}) or ({b"gt", b"lt"} <= flags):
        raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
    ttl = amount * unit

    async def later() -> bytes:
        store = c.km.store
        current = await store.pttl(key)
        if current == -2:
            return resp.integer(0)
        has = current >= 0
        if (b"nx" in flags and has) or (b"xx" in flags and not has):
            return resp.integer(0)
        if b"gt" in flags and (not has or ttl * 1000 <= current):
            return resp.integer(0)
        if b"lt" in flags and has and ttl * 1000 >= current:
            return resp.integer(0)
        return resp.integer(int(await store.expire(key, ttl)))

    return later()


@command(
    "expire",
    -3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Set a key's time to live in seconds.",
    arguments=[arg("key", "key"), arg("seconds", "integer"), arg("condition", "oneof", optional=True)],
)
def cmd_expire(c: Connection, args: list[bytes]) -> Reply:
    return _expire_cmd(c, args, 1.0, "expire")


@command(
    "pexpire",
    -3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Set a key's time to live in milliseconds.",
    arguments=[arg("key", "key"), arg("milliseconds", "integer"), arg("condition", "oneof", optional=True)],
)
def cmd_pexpire(c: Connection, args: list[bytes]) -> Reply:
    return _expire_cmd(c, args, 0.001, "pexpire")


@command(
    "persist",
    2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Remove a key's expiry.",
    arguments=[arg("key", "key")],
)
def cmd_persist(c: Connection, args: list[bytes]) -> Reply:
    return _int_of(c.km.persist(key_of(args[1])))


@command(
    "flushdb",
    -1,
    flags=("write",),
    summary="Remove every key.",
    arguments=[arg("flush-type", "oneof", optional=True)],
)
def cmd_flushdb(c: Connection, args: list[bytes]) -> Reply:
    if len(args) > 2 or (len(args) == 2 and args[1].lower() not in (b"async", b"sync")):
        raise CommandError(SYNTAX)

    async def later() -> bytes:
        await c.km.store.flush()
        return resp.OK

    return later()


TABLE[b"flushall"] = Command("flushall", cmd_flushdb, -1, ("write",), summary="Remove every key.")
