"""Key commands: EXISTS, TTL, PTTL, TYPE, DBSIZE, SCAN, DEL, UNLINK, EXPIRE, PEXPIRE, PERSIST, FLUSHDB.

Split from ``commands`` so the table machinery stays small; these act on keys as a whole (existence,
expiry, deletion, iteration) and never compute a value.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from keymiss.server import reply
from keymiss.server.commands import (
    SYNTAX,
    TABLE,
    Command,
    CommandError,
    Reply,
    arg,
    command,
    key_of,
    local_store_of,
    to_int,
)
from keymiss.server.strings import check_expire_range
from keymiss.stores.base import LocalStore

if TYPE_CHECKING:
    from keymiss.server.client import Client


# --- reads ---------------------------------------------------------------------------------------------
@command(
    "exists",
    -2,
    flags=("readonly", "fast"),
    keys=(1, -1, 1),
    summary="Count how many of the keys exist (nothing is computed).",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_exists(c: Client, args: list[bytes]) -> Reply:
    keys = [key_of(a) for a in args[1:]]
    store = local_store_of(c)
    if store is not None:
        return reply.integer(store.exists_now(keys))
    return _int_of(c.km.store.exists(keys))


async def _int_of(aw: Awaitable[int]) -> bytes:
    return reply.integer(int(await aw))


@command(
    "ttl",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="Seconds to live of a key; -1 without expiry, -2 if missing.",
    arguments=[arg("key", "key")],
)
def cmd_ttl(c: Client, args: list[bytes]) -> Reply:
    return _ttl(c, key_of(args[1]), 1000)


@command(
    "pttl",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="Milliseconds to live of a key; -1 without expiry, -2 if missing.",
    arguments=[arg("key", "key")],
)
def cmd_pttl(c: Client, args: list[bytes]) -> Reply:
    return _ttl(c, key_of(args[1]), 1)


def _ttl(c: Client, key: str, unit: int) -> Reply:
    def fmt(ms: int) -> bytes:
        return reply.integer(ms if ms < 0 else (ms + unit // 2) // unit)

    store = local_store_of(c)
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
def cmd_type(c: Client, args: list[bytes]) -> Reply:
    store = local_store_of(c)
    key = key_of(args[1])
    if store is not None:
        return reply.simple("string" if store.get_now(key) is not None else "none")

    shared = c.shared

    async def later() -> bytes:
        if shared is not None:  # the backing server knows every type it holds (hash, list, …)
            kind = await shared.raw([b"TYPE", args[1]])
            return reply.simple(kind.decode() if isinstance(kind, bytes) else str(kind))
        return reply.simple("string" if await c.km.store.get(key) is not None else "none")

    return later()


@command("dbsize", 1, flags=("readonly", "fast"), summary="The number of keys in the store.")
def cmd_dbsize(c: Client, args: list[bytes]) -> Reply:
    return _int_of(c.km.store.dbsize())


def parse_cursor(raw: bytes) -> int:
    """A cursor as Redis's strtoul reads it: an optional sign, decimal digits, up to 2**64 - 1 (a
    negative one wraps, as in C)."""
    text = raw.decode("ascii", "replace")
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits.isdigit() or not digits.isascii():
        raise CommandError("ERR invalid cursor")
    value = int(digits)
    if value > 2**64 - 1:
        raise CommandError("ERR invalid cursor")
    return (-value) % 2**64 if text[0] == "-" else value


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
def cmd_scan(c: Client, args: list[bytes]) -> Reply:
    cursor = parse_cursor(args[1])
    match: str | None = None
    count = 10
    kind: str | None = None
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
            kind = args[i + 1].decode(errors="replace").lower()
        else:
            raise CommandError(SYNTAX)
        i += 2

    async def later() -> bytes:
        nxt, keys = await c.km.store.scan(cursor, match, count, kind)
        if kind not in (None, "string") and c.shared is None:
            keys = []  # an in-process store holds strings only
        return (
            b"*2\r\n"
            + reply.bulk(str(nxt).encode())
            + reply.array(reply.bulk(k.encode("utf-8", "surrogateescape")) for k in keys)
        )

    return later()


# --- writes --------------------------------------------------------------------------------------------
def _delete(c: Client, keys: list[str]) -> Reply:
    c.km.written(keys)
    store = local_store_of(c)
    if store is not None and store.sync_writes:
        return reply.integer(store.delete_now(keys))
    return _int_of(c.km.store.delete(keys))


@command(
    "del",
    -2,
    flags=("write",),
    keys=(1, -1, 1),
    summary="Delete keys; returns how many existed.",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_del(c: Client, args: list[bytes]) -> Reply:
    return _delete(c, [key_of(a) for a in args[1:]])


@command(
    "unlink",
    -2,
    flags=("write", "fast"),
    keys=(1, -1, 1),
    summary="Delete keys (same as DEL here).",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_unlink(c: Client, args: list[bytes]) -> Reply:
    return _delete(c, [key_of(a) for a in args[1:]])


def _expire_cmd(c: Client, args: list[bytes], unit: float, name: str) -> Reply:
    key = key_of(args[1])
    amount = to_int(args[2])
    flags = {a.lower() for a in args[3:]}
    if not flags <= {b"nx", b"xx", b"gt", b"lt"} or len(flags) != len(args) - 3:
        raise CommandError(f"ERR Unsupported option {args[3].decode(errors='replace')}")
    if b"nx" in flags and flags & {b"xx", b"gt", b"lt"}:
        raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if {b"gt", b"lt"} <= flags:
        raise CommandError("ERR GT and LT options at the same time are not compatible")
    check_expire_range(amount, 1000 if unit == 1.0 else 1, False, name)
    ttl = amount * unit

    async def later() -> bytes:
        store = c.km.store
        current = await store.pttl(key)
        if current == -2:
            return reply.integer(0)
        has = current >= 0
        if (b"nx" in flags and has) or (b"xx" in flags and not has):
            return reply.integer(0)
        if b"gt" in flags and (not has or ttl * 1000 <= current):
            return reply.integer(0)
        if b"lt" in flags and has and ttl * 1000 >= current:
            return reply.integer(0)
        if ttl <= 0:  # a delete: a computation that started before must not reappear
            c.km.written([key])
        return reply.integer(int(await store.expire(key, ttl)))

    return later()


@command(
    "expire",
    -3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Set a key's time to live in seconds.",
    arguments=[arg("key", "key"), arg("seconds", "integer"), arg("condition", "oneof", optional=True)],
)
def cmd_expire(c: Client, args: list[bytes]) -> Reply:
    return _expire_cmd(c, args, 1.0, "expire")


@command(
    "pexpire",
    -3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Set a key's time to live in milliseconds.",
    arguments=[arg("key", "key"), arg("milliseconds", "integer"), arg("condition", "oneof", optional=True)],
)
def cmd_pexpire(c: Client, args: list[bytes]) -> Reply:
    return _expire_cmd(c, args, 0.001, "pexpire")


@command(
    "persist",
    2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Remove a key's expiry.",
    arguments=[arg("key", "key")],
)
def cmd_persist(c: Client, args: list[bytes]) -> Reply:
    return _int_of(c.km.persist(key_of(args[1])))


@command(
    "flushdb",
    -1,
    flags=("write",),
    summary="Remove every key.",
    arguments=[arg("flush-type", "oneof", optional=True)],
)
def cmd_flushdb(c: Client, args: list[bytes]) -> Reply:
    if len(args) > 2 or (len(args) == 2 and args[1].lower() not in (b"async", b"sync")):
        raise CommandError(SYNTAX)

    store = c.km.store
    if not isinstance(store, LocalStore):
        raise CommandError(
            "ERR FLUSHDB through keymiss would delete every node's leases and contexts in the shared "
            "Redis: use KEYMISS FORGET pattern, or send it to Redis directly"
        )

    async def later() -> bytes:
        c.km.written(None)
        await store.flush_data()  # keymiss's own records (contexts) stay
        return reply.OK

    return later()


TABLE[b"flushall"] = Command("flushall", cmd_flushdb, -1, ("write",), summary="Remove every key.")
