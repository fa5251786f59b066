"""Key commands: EXISTS, TTL, PTTL, TYPE, DBSIZE, SCAN, DEL, UNLINK, EXPIRE, PEXPIRE, PERSIST, FLUSHDB.

Split from ``commands`` so the table machinery stays small; these act on keys as a whole (existence,
expiry, deletion, iteration) and never compute a value.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from keymiss.server import reply
from keymiss.server.commands import (
    SYNTAX,
    CommandError,
    Reply,
    arg,
    command,
    key_of,
    local_store_of,
    to_int,
)
from keymiss.server.strings import LLONG_MAX, STORE_MAX_MS
from keymiss.stores.base import LocalStore, SharedStore

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


def _expire_cmd(c: Client, args: list[bytes], unit_ms: int, absolute: bool, name: str) -> Reply:
    """EXPIRE, PEXPIRE, EXPIREAT and PEXPIREAT, as Redis's expireGenericCommand: the options
    first, then the time, made absolute in milliseconds (an overflow is an error), then the key.
    A time already past deletes the key, which supersedes a computation of it (a delete); any other
    expiry change does not (the read contract's ttl-during row)."""
    key = key_of(args[1])
    flags = set()
    for raw in args[3:]:
        opt = raw.lower()
        if opt not in (b"nx", b"xx", b"gt", b"lt"):
            raise CommandError(f"ERR Unsupported option {raw.decode(errors='replace')}")
        flags.add(opt)
    if b"nx" in flags and flags & {b"xx", b"gt", b"lt"}:
        raise CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
    if {b"gt", b"lt"} <= flags:
        raise CommandError("ERR GT and LT options at the same time are not compatible")
    when = to_int(args[2])
    if unit_ms == 1000:
        if when > LLONG_MAX // 1000 or when < -(LLONG_MAX // 1000):
            raise CommandError(f"ERR invalid expire time in '{name}' command")
        when *= 1000
    base = 0 if absolute else int(time.time() * 1000)
    if when > LLONG_MAX - base:
        raise CommandError(f"ERR invalid expire time in '{name}' command")
    when += base

    async def later() -> bytes:
        store = c.km.store
        current = await store.pttl(key)
        if current == -2:
            return reply.integer(0)
        now = int(time.time() * 1000)
        expire = -1 if current < 0 else now + current
        if (b"nx" in flags and expire != -1) or (b"xx" in flags and expire == -1):
            return reply.integer(0)
        if b"gt" in flags and (expire == -1 or when <= expire):
            return reply.integer(0)
        if b"lt" in flags and expire != -1 and when >= expire:
            return reply.integer(0)
        if when <= now:  # a delete: a computation that started before must not reappear
            c.km.written([key])
            return reply.integer(int(await store.delete([key]) > 0))
        if isinstance(store, LocalStore):  # the time as given (EXPIRETIME reads it back)
            done = await store.expire_at(key, min(when, STORE_MAX_MS) / 1000)  # see STORE_MAX_MS
        elif isinstance(store, SharedStore):  # PEXPIREAT itself, on the value and its records
            done = await store.expire_at_ms(key, when)
        else:
            done = await store.expire(key, (when - now) / 1000)
        if done:  # a value being computed of it keeps this expiry (the ttl-during row)
            c.km.expiry_set(key, when / 1000)
        return reply.integer(int(done))

    return later()


def _expire_command(name: str, unit_ms: int, absolute: bool, what: str) -> None:
    @command(
        name,
        -3,
        flags=("write", "fast"),
        keys=(1, 1, 1),
        summary=f"Set a key's {what}.",
        arguments=[
            arg("key", "key"),
            arg(
                ("unix-time-" if absolute else "") + ("seconds" if unit_ms == 1000 else "milliseconds"),
                "integer",
            ),
            arg("condition", "oneof", optional=True),
        ],
        ttl=True,
    )
    def handler(c: Client, args: list[bytes]) -> Reply:
        return _expire_cmd(c, args, unit_ms, absolute, name)


_expire_command("expire", 1000, False, "time to live in seconds")
_expire_command("pexpire", 1, False, "time to live in milliseconds")
_expire_command("expireat", 1000, True, "expiry as a unix time in seconds")
_expire_command("pexpireat", 1, True, "expiry as a unix time in milliseconds")


def _expiretime(c: Client, args: list[bytes], unit: int) -> Reply:
    if c.shared is not None:
        return c.relay(args)
    store = local_store_of(c)
    assert store is not None
    item = store.get_now(key_of(args[1]))
    if item is None:
        return reply.integer(-2)
    if item.expires_at is None:
        return reply.integer(-1)
    ms = max(0, round(item.expires_at * 1000))
    return reply.integer(ms if unit == 1 else (ms + 500) // 1000)


@command(
    "expiretime",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="A key's expiry as a unix time in seconds; -1 without expiry, -2 if missing.",
    arguments=[arg("key", "key")],
)
def cmd_expiretime(c: Client, args: list[bytes]) -> Reply:
    return _expiretime(c, args, 1000)


@command(
    "pexpiretime",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    summary="A key's expiry as a unix time in milliseconds; -1 without expiry, -2 if missing.",
    arguments=[arg("key", "key")],
)
def cmd_pexpiretime(c: Client, args: list[bytes]) -> Reply:
    return _expiretime(c, args, 1)


@command(
    "persist",
    2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    summary="Remove a key's expiry.",
    ttl=True,
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
        await store.flush_data()  # keymiss's own records (contexts) stay
        return reply.OK

    return later()


command(
    "flushall",
    -1,
    flags=("write",),
    summary="Remove every key.",
    arguments=[arg("flush-type", "oneof", optional=True)],
)(cmd_flushdb)
