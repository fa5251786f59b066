"""Commands that write a key from another, or several keys at once: GETSET, MSETNX, RENAME,
RENAMENX; and TIME. Redis 7.0's replies and error texts.

On an in-process store each is one step of the store's single writer (``LocalStore.step``), so no
other write lands between its reads and its writes; on a shared Redis each is relayed, where Redis
itself does the same. Like every write command, they supersede a computation of the keys they
name (``commands.superseding``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from keymiss.server import reply
from keymiss.server.commands import CommandError, Reply, arg, command, key_of, local_store_of
from keymiss.server.strings import OOM
from keymiss.stores.base import Item, LocalStore

if TYPE_CHECKING:
    from keymiss.server.client import Client


def _in_step(c: Client, step: object) -> Reply:
    """Run ``step`` (a function of no arguments returning the reply) on the in-process store's
    writer: inline where its writes are synchronous, else awaited."""
    store = local_store_of(c)
    assert store is not None
    if store.sync_writes:
        return store.step_now(step)  # type: ignore[arg-type]

    async def later() -> bytes:
        return await store.step(step)  # type: ignore[arg-type]

    return later()


@command(
    "getset",
    3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Set a key's value (dropping its expiry) and return the old value (nothing is computed).",
    arguments=[arg("key", "key"), arg("value")],
)
def cmd_getset(c: Client, args: list[bytes]) -> Reply:
    store = local_store_of(c)
    if store is None:
        return c.relay(args)
    key, value = key_of(args[1]), args[2]
    if not store.fits(key, len(value)):
        raise CommandError(OOM)

    def step() -> bytes:
        old = store.get_now(key)
        if not store.put(key, value):
            raise CommandError(OOM)
        return reply.null(c.proto) if old is None else reply.bulk(old.value)

    return _in_step(c, step)


@command(
    "msetnx",
    -3,
    flags=("write",),
    keys=(1, -1, 2),
    group="string",
    summary="Set several keys only if none of them exists; 1 if set.",
    arguments=[arg("data", "block", multiple=True)],
)
def cmd_msetnx(c: Client, args: list[bytes]) -> Reply:
    if len(args) % 2 == 0:
        raise CommandError("ERR wrong number of arguments for 'msetnx' command")
    store = local_store_of(c)
    if store is None:
        return c.relay(args)
    pairs = {key_of(args[i]): args[i + 1] for i in range(1, len(args), 2)}  # the last of a key wins
    if not all(store.fits(k, len(v)) for k, v in pairs.items()):
        raise CommandError(OOM)

    def step() -> bytes:
        if any(store.get_now(k) is not None for k in pairs):
            return reply.integer(0)
        for k, v in pairs.items():
            if not store.put(k, v):
                raise CommandError(OOM)
        return reply.integer(1)

    return _in_step(c, step)


def _rename(c: Client, args: list[bytes], nx: bool) -> Reply:
    store = local_store_of(c)
    if store is None:
        return c.relay(args)
    src, dst = key_of(args[1]), key_of(args[2])

    def step() -> bytes:
        item = store.get_now(src)
        if item is None:
            raise CommandError("ERR no such key")
        if src == dst:
            return reply.integer(0) if nx else reply.OK
        if nx and store.get_now(dst) is not None:
            return reply.integer(0)
        _move(store, item, src, dst)
        return reply.integer(1) if nx else reply.OK

    return _in_step(c, step)


def _move(store: LocalStore, item: Item, src: str, dst: str) -> None:
    """``src``'s value and expiry (and codec) to ``dst``, then ``src`` gone."""
    ttl = None if item.expires_at is None else max(item.expires_at - store.now(), 1e-6)
    store.remove([dst])
    if not store.put(dst, item.value, codec=item.codec, ttl=ttl):
        raise CommandError(OOM)
    store.remove([src])


@command(
    "rename",
    3,
    flags=("write",),
    keys=(1, 2, 1),
    summary="Rename a key (its expiry goes with it), replacing what the new name held.",
    arguments=[arg("key", "key"), arg("newkey", "key")],
)
def cmd_rename(c: Client, args: list[bytes]) -> Reply:
    return _rename(c, args, False)


@command(
    "renamenx",
    3,
    flags=("write", "fast"),
    keys=(1, 2, 1),
    summary="Rename a key only if the new name does not exist; 1 if renamed.",
    arguments=[arg("key", "key"), arg("newkey", "key")],
)
def cmd_renamenx(c: Client, args: list[bytes]) -> Reply:
    return _rename(c, args, True)


@command("time", 1, flags=("fast",), group="server", summary="The server's time: seconds and microseconds.")
def cmd_time(c: Client, args: list[bytes]) -> Reply:
    now = time.time_ns() // 1000
    return reply.array([reply.bulk(b"%d" % (now // 1_000_000)), reply.bulk(b"%d" % (now % 1_000_000))])
