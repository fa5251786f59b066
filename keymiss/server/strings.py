"""String commands: GET, MGET, GETEX, SET, SETEX, PSETEX, SETNX, MSET, GETDEL.

Split from ``commands`` so the table machinery stays small. These read or write a key's value; GET,
MGET and GETEX are where a miss in a registered keyspace gets computed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from keymiss.server import reply
from keymiss.server.commands import SYNTAX, CommandError, Reply, arg, command, key_of, local_store_of, to_int
from keymiss.server.transactions import background
from keymiss.stores.base import Item

if TYPE_CHECKING:
    from keymiss.server.client import Client


OOM = "OOM command not allowed when used memory > 'maxmemory'."


def too_large(what: str, size: int, limit: int) -> str:
    return (
        f"ERR the reply to {what} ({size} bytes) is larger than the output buffer limit ({limit} "
        "bytes): ask for fewer keys at a time"
    )


def _item_reply(item: Item | None, proto: int) -> bytes:
    return reply.null(proto) if item is None else reply.bulk(item.value)


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
def cmd_get(c: Client, args: list[bytes]) -> Reply:
    result = c.km.read(key_of(args[1]))  # one engine call: a hit or plain miss is ready
    if result is None:
        return reply.null(c.proto)
    if type(result) is Item:
        return reply.bulk(result.value)
    if c.in_exec and c.shared is None:  # inside EXEC a miss does not wait for its computation
        background(c.server, result)  # type: ignore[arg-type]
        return reply.null(c.proto)
    return _awaited(c, result)  # type: ignore[arg-type]


async def _awaited(c: Client, pending: Awaitable[Item | None]) -> bytes:
    return _item_reply(await pending, c.proto)


@command(
    "mget",
    -2,
    flags=("readonly", "fast"),
    keys=(1, -1, 1),
    group="string",
    summary="Get the values of several keys; misses are computed concurrently and batched.",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_mget(c: Client, args: list[bytes]) -> Reply:
    if c.in_exec and c.shared is None:
        return reply.array(cmd_get(c, [b"get", a]) for a in args[1:])  # type: ignore[misc]
    result = c.km.read_many([key_of(a) for a in args[1:]])
    if isinstance(result, list):
        return _mget_reply(c, result)
    return _mget_later(c, result)


def _mget_reply(c: Client, results: list[Item | BaseException | None]) -> bytes:
    # Failed keys become error entries inside the array: the other answers are not thrown away.
    size = sum(len(r.value) for r in results if type(r) is Item)
    if size > c.output_limit:  # one value that large streams; an array of them would sit in memory
        return c.error(CommandError(too_large("MGET", size, c.output_limit)))
    parts = []
    for r in results:
        if isinstance(r, BaseException):
            parts.append(c.error(r))
        else:
            parts.append(_item_reply(r, c.proto))
    return reply.array(parts)


async def _mget_later(c: Client, pending: Awaitable[list[Item | BaseException | None]]) -> bytes:
    return _mget_reply(c, await pending)


@command(
    "getex",
    -2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Get the value of a key (computing it on a miss) and optionally set its expiration.",
    ttl=True,
    arguments=[arg("key", "key"), arg("expiration", "oneof", optional=True)],
)
def cmd_getex(c: Client, args: list[bytes]) -> Reply:
    key = key_of(args[1])
    opts = [a.lower() for a in args[2:]]
    ttl: float | None = None
    persist = False
    if opts:
        if opts == [b"persist"]:
            persist = True
        elif len(opts) == 2 and opts[0] in (b"ex", b"px", b"exat", b"pxat"):
            try:
                ttl = _expiry(opts[0], args[3], "getex")
            except CommandError as exc:
                # as Redis: a missing key is nil before its expiry is looked at
                if c.km.registry.route(key) is not None:
                    raise
                store = local_store_of(c)
                if store is None:
                    return _nil_or(c, key, exc)
                if store.get_now(key) is None:
                    return reply.null(c.proto)
                raise
        else:
            raise CommandError(SYNTAX)
    store = local_store_of(c)
    if c.in_exec and store is not None and store.get_now(key) is None:
        return cmd_get(c, [b"get", args[1]])  # a miss inside EXEC: started, nil, no expiry to set
    return _getex(c, key, ttl, persist, bool(opts))


async def _nil_or(c: Client, key: str, exc: CommandError) -> bytes:
    """Nil for a missing key of a shared store, else the error its arguments earned."""
    if not await c.km.store.exists([key]):
        return reply.null(c.proto)
    raise exc


async def _getex(c: Client, key: str, ttl: float | None, persist: bool, change: bool) -> bytes:
    item = await c.km.get_item(key)
    if item is not None and change:
        # A miss was computed meanwhile: change the expiry only of the value this reply carries,
        # not of one another client wrote in between.
        current = await c.km.store.get(key)
        if current is not None and current.value == item.value:
            if persist:
                if await c.km.store.expire(key, None):
                    c.km.expiry_set(key, None)
            elif ttl is not None:
                if ttl <= 0:
                    c.km.written([key])
                if await c.km.store.expire(key, ttl) and ttl > 0:
                    c.km.expiry_set(key, time.time() + ttl)
    return _item_reply(item, c.proto)


# --- writes --------------------------------------------------------------------------------------------
LLONG_MAX = 2**63 - 1
#: The latest expiry (unix milliseconds, the year 73 000 or so) keymiss's own stores hold exactly:
#: they keep it as seconds in a double, which rounds the milliseconds of later times. A later one is
#: accepted (as Redis accepts it, and Redis's own tests expect) and kept as this one: PEXPIRETIME
#: reads back this time, never one past a long long.
STORE_MAX_MS = 2**51


def check_expire_range(n: int, unit_ms: int, absolute: bool, cmd: str) -> None:
    """Redis's overflow rule: the expiry in milliseconds, made absolute, must fit a long long."""
    if n > LLONG_MAX // unit_ms or n < -(LLONG_MAX // unit_ms):
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")
    when = n * unit_ms + (0 if absolute else int(time.time() * 1000))
    if when > LLONG_MAX:
        raise CommandError(f"ERR invalid expire time in '{cmd}' command")


def _expiry(opt: bytes, raw: bytes, cmd: str) -> float:
    """Seconds from now for EX/PX/EXAT/PXAT, no later than ``STORE_MAX_MS``; Redis's errors for bad
    values (including an expiry whose absolute time in milliseconds would overflow a signed 64-bit
    integer, as Redis checks)."""
    ttl = _expiry_as_given(opt, raw, cmd)
    return min(ttl, STORE_MAX_MS / 1000 - time.time())


def _expiry_as_given(opt: bytes, raw: bytes, cmd: str) -> float:
    n = to_int(raw)
    check_expire_range(n, 1000 if opt in (b"ex", b"exat") else 1, opt in (b"exat", b"pxat"), cmd)
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
def cmd_set(c: Client, args: list[bytes]) -> Reply:
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
    c: Client, key: str, value: bytes, ttl: float | None, nx: bool, xx: bool, keep: bool, get: bool
) -> Reply:
    if ttl is not None and ttl < 0:  # an absolute expiry already in the past: Redis deletes
        ttl = None
        expired = True
    else:
        expired = False
    store = local_store_of(c)
    if store is not None and not store.fits(key, len(value)):
        raise CommandError(OOM)  # whatever its conditions: Redis checks memory first
    old: Item | None = None
    if get and store is not None:
        old = store.get_now(key)

    def finish(ok: bool) -> bytes:
        if not ok and not (nx or xx):  # refused for want of room, not by a condition
            raise CommandError(OOM)
        if get:
            return _item_reply(old, c.proto)
        return reply.OK if ok else reply.null(c.proto)

    if store is not None and store.sync_writes:
        ok = store.set_now(key, value, ttl=ttl, nx=nx, xx=xx, keep_ttl=keep)
        if ok and expired:
            store.delete_now([key])
        return finish(ok)

    async def later() -> bytes:
        nonlocal old
        if get and store is None:  # WRONGTYPE for a key of another type, as Redis answers
            shared = c.shared
            old = await (shared.get_strict(key) if shared is not None else c.km.store.get(key))
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
def cmd_setex(c: Client, args: list[bytes]) -> Reply:
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
def cmd_psetex(c: Client, args: list[bytes]) -> Reply:
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
def cmd_setnx(c: Client, args: list[bytes]) -> Reply:
    store = local_store_of(c)
    if store is not None and not store.fits(key_of(args[1]), len(args[2])):
        raise CommandError(OOM)

    async def later() -> bytes:
        return reply.integer(int(await c.km.store.set(key_of(args[1]), args[2], nx=True)))

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
def cmd_mset(c: Client, args: list[bytes]) -> Reply:
    if len(args) % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'mset' command")
    from keymiss.stores.base import Write

    writes = [Write(key_of(args[i]), args[i + 1]) for i in range(1, len(args), 2)]
    store = local_store_of(c)
    if store is not None and not all(store.fits(w.key, len(w.value)) for w in writes):
        raise CommandError(OOM)  # refused whole, as Redis's MSET is: nothing is written

    async def later() -> bytes:
        if not all(await c.km.store.set_many(writes)):
            raise CommandError(OOM)
        return reply.OK

    return later()


@command(
    "getdel",
    2,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Get the value of a key and delete it (nothing is computed).",
    arguments=[arg("key", "key")],
)
def cmd_getdel(c: Client, args: list[bytes]) -> Reply:
    key = key_of(args[1])
    shared = c.shared

    async def later() -> bytes:
        item = await (shared.get_strict(key) if shared is not None else c.km.store.get(key))
        if item is not None or shared is None:  # a delete even of nothing supersedes (del-during)
            await c.km.store.delete([key])
        return _item_reply(item, c.proto)

    return later()
