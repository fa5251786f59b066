"""MULTI, EXEC, DISCARD, WATCH, UNWATCH: Redis transactions over the in-process stores.

redis-py's default ``pipeline()`` is a transaction, so without these its writes would be applied and
then reported as failed. A transaction runs whole, with no other client's command in between: the
commands are answered one after another in the event loop, and where one must wait (a durable
LMDB write) the server holds every other connection's commands until EXEC is done.

A miss inside a transaction does not wait for its computation (a transaction that blocked for a
model would hold up every client): the computation is started, the reply is nil, and a later GET
gets the value.

WATCH follows Redis: EXEC fails (a null reply) if any watched key was written by a command since
WATCH, and also if its value changed otherwise (a computation stored it, it expired or was
evicted), which is seen by comparing the value with the one it held at WATCH.

On a shared Redis store, EXEC sends the queued commands to Redis as one MULTI/EXEC on one of the
relay's connections, so Redis runs them atomically; each is checked as the pass-through checks
commands, and one that may not pass discards the transaction. WATCH would need a connection held
from WATCH to EXEC, which the relay does not lend out: it is refused with a clear error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from keymiss.errors import KeymissError
from keymiss.server import reply
from keymiss.server.client import Transaction, same
from keymiss.server.commands import TABLE, CommandError, Reply, arg, command, key_of, local_store_of
from keymiss.server.passthrough import changed_by, unsure
from keymiss.stores.base import Item

if TYPE_CHECKING:
    from keymiss.server.client import Client, Host

#: Commands answered at once inside MULTI instead of being queued (as in Redis).
IMMEDIATE = frozenset((b"exec", b"discard", b"multi", b"watch", b"quit", b"reset"))
#: Per queued command, counted with its arguments against the client's query-buffer limit.
QUEUED_OVERHEAD = 120  # the list holding the arguments, and its slot in the queue
ARG_OVERHEAD = 40  # a bytes object's header, per argument (measured on CPython 3.11)
EXECABORT = "EXECABORT Transaction discarded because of previous errors."
SHARED_WATCH = (
    "ERR WATCH is not relayed to a shared Redis store (it needs a connection of its own until EXEC); "
    "send WATCH and its transaction to Redis directly"
)
#: keymiss's own commands that are plain Redis commands, so a relayed transaction may hold them.
SHARED_TX = frozenset(
    b"get mget getex set setex psetex setnx mset getdel del unlink exists ttl pttl type expire pexpire "
    b"persist incr incrby decr decrby incrbyfloat append setrange strlen getrange substr ping echo".split()
)


def snapshot(item: Item | None) -> Item | None:
    """A copy of what WATCH compares (an in-process item's expiry can change in place)."""
    return None if item is None else Item(item.value, item.codec, item.expires_at, item.version)


def changed(c: Client) -> bool:
    """Whether a watched key was written, or holds another value than at WATCH."""
    if c.watch_dirty:
        return True
    store = local_store_of(c)
    return store is not None and any(not same(seen, store.get_now(k)) for k, seen in c.watched.items())


def queue(c: Client, args: list[bytes], error: bytes | None) -> bytes:
    """Queue a command inside MULTI (``error``: it was refused at queueing, which aborts EXEC)."""
    tx = c.multi
    assert tx is not None
    name = args[0].lower()
    if error is None and tx.shared and name in TABLE and name not in SHARED_TX:
        error = reply.error(
            f"ERR '{name.decode()}' is keymiss's own command: it cannot be part of a transaction "
            "relayed to the shared Redis"
        )
    if error is not None:
        tx.aborted = True
        return error
    tx.size += QUEUED_OVERHEAD + sum(len(a) + ARG_OVERHEAD for a in args)
    if tx.size > c.query_limit:
        tx.aborted = True
        return reply.error("ERR transaction too large: its queued commands pass the query buffer limit")
    tx.commands.append(args)
    return b"+QUEUED\r\n"


def background(server: Host, pending: Awaitable[Any]) -> None:
    """Let a computation started inside a transaction finish on its own."""
    task = asyncio.ensure_future(pending)
    server.background.add(task)

    def done(t: asyncio.Future[Any]) -> None:
        server.background.discard(t)
        if not t.cancelled():
            t.exception()  # retrieved: its error was logged where it happened

    task.add_done_callback(done)


@command("multi", 1, flags=("fast",), group="transactions", summary="Start a transaction.")
def cmd_multi(c: Client, args: list[bytes]) -> Reply:
    if c.multi is not None:
        raise CommandError("ERR MULTI calls can not be nested")
    c.multi = Transaction(c.shared is not None)
    return reply.OK


@command("discard", 1, flags=("fast",), group="transactions", summary="Drop the queued commands.")
def cmd_discard(c: Client, args: list[bytes]) -> Reply:
    if c.multi is None:
        raise CommandError("ERR DISCARD without MULTI")
    c.multi = None
    c.server.watches.drop(c)
    return reply.OK


@command(
    "watch",
    -2,
    flags=("fast",),
    keys=(1, -1, 1),
    group="transactions",
    summary="Make the next EXEC conditional on these keys staying unchanged.",
    arguments=[arg("key", "key", multiple=True)],
)
def cmd_watch(c: Client, args: list[bytes]) -> Reply:
    if c.multi is not None:
        raise CommandError("ERR WATCH inside MULTI is not allowed")
    if c.shared is not None:
        raise CommandError(SHARED_WATCH)
    store = local_store_of(c)
    assert store is not None
    for raw in args[1:]:
        key = key_of(raw)
        c.server.watches.add(c, key, snapshot(store.get_now(key)))
    return reply.OK


@command("unwatch", 1, flags=("fast",), group="transactions", summary="Forget the watched keys.")
def cmd_unwatch(c: Client, args: list[bytes]) -> Reply:
    c.server.watches.drop(c)
    return reply.OK


@command("exec", 1, flags=("slow",), group="transactions", summary="Run the queued commands as one.")
def cmd_exec(c: Client, args: list[bytes]) -> Reply:
    tx = c.multi
    if tx is None:
        raise CommandError("ERR EXEC without MULTI")
    c.multi = None
    dirty = changed(c)
    c.server.watches.drop(c)
    if tx.aborted:
        raise CommandError(EXECABORT)
    if dirty:
        return reply.NULL3 if c.proto == 3 else reply.NULL_ARRAY2
    if tx.shared:
        return _exec_shared(c, tx.commands)
    parts = Replies(c.output_limit)
    c.in_exec = True
    try:
        for i, queued in enumerate(tx.commands):
            answer = c.dispatch_queued(queued)
            if type(answer) is not bytes:
                return _finish(c, parts, answer, tx.commands[i + 1 :])  # type: ignore[arg-type]
            parts.append(answer)
    finally:
        if not c.server.exclusive:
            c.in_exec = False
    return parts.reply()


class Replies:
    """EXEC's replies, kept only while they fit the output buffer limit: past it the commands still
    all run (a transaction is whole), and EXEC answers an error instead of holding them all."""

    __slots__ = ("limit", "parts", "size")

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit

    def append(self, answer: bytes) -> None:
        self.size += len(answer)
        if self.size <= self.limit:
            self.parts.append(answer)
        elif self.parts:
            self.parts.clear()

    def reply(self) -> bytes:
        if self.size > self.limit:
            return reply.error(
                f"ERR EXEC ran, but its replies ({self.size} bytes) pass the output buffer limit "
                f"({self.limit} bytes): they are dropped; read large values outside a transaction"
            )
        return reply.array(self.parts)


def _finish(c: Client, parts: Replies, pending: Awaitable[bytes], rest: list[list[bytes]]) -> Reply:
    """The rest of an EXEC whose command must wait: every other client is held meanwhile."""
    server = c.server
    server.exclusive = c
    store = local_store_of(c)

    async def run() -> bytes:
        if store is not None:
            store.begin_batch()  # one fsync for the whole EXEC, not one per write
        try:
            parts.append(await c.settle(pending))
            for queued in rest:
                answer = c.dispatch_queued(queued)
                parts.append(answer if type(answer) is bytes else await c.settle(answer))  # type: ignore[arg-type]
        finally:
            if store is not None:
                await store.end_batch()  # on disk before EXEC replies
            c.in_exec = False
            if server.exclusive is c:  # only the hold's owner releases it
                server.release()
        return parts.reply()

    # A task of its own, shielded: an EXEC that has begun runs whole even if its client goes away.
    task = asyncio.ensure_future(run())
    c.exec_task = task
    server.background.add(task)
    task.add_done_callback(server.background.discard)
    return asyncio.shield(task)


async def _exec_shared(c: Client, commands: list[list[bytes]]) -> bytes:
    """EXEC on a shared Redis: every command checked as the pass-through checks it, the keys it
    writes marked written (a computation started before does not overwrite them), then one
    MULTI/EXEC there. A miss of a keyspace key inside it starts the key's computation."""
    shared = c.shared
    assert shared is not None
    relay = c.relay_rules(shared)
    each: list[list[str]] = []  # the keys each command writes
    for args in commands:
        cmd = TABLE.get(args[0].lower())
        if cmd is not None:
            each.append((c.keys_of(cmd, args) or []) if "write" in cmd.flags else [])
            continue
        rule, refusal = await relay.check(args)
        if refusal is not None:
            raise CommandError(f"EXECABORT Transaction discarded: {refusal.removeprefix('ERR ')}")
        each.append([k.decode("utf-8", "surrogateescape") for k in rule.keys(args)] if rule.write else [])
    written = [k for keys in each for k in keys]
    c.km.writeback.writing(
        written
    )  # what a command changed supersedes, once its reply says so (``superseding``)
    try:
        try:
            replies = await shared.transaction(commands, c.proto)
        except KeymissError as exc:  # its reply timed out: what it wrote may have landed
            if unsure(str(exc).encode()):
                c.km.written(written)
            raise
        for args, keys, answer in zip(commands, each, replies or [], strict=False):
            if not keys or isinstance(answer, Exception):
                continue
            if _ttl_change(args, answer):  # as outside MULTI: the computed value takes its expiry
                await _expiry_of(c, shared, keys[0])
            elif changed_by(args, reply.encode(answer, 2)):
                c.km.written(keys)
    finally:
        c.km.writeback.landed(written)
    if replies is None:
        return reply.NULL3 if c.proto == 3 else reply.NULL_ARRAY2
    for args, answer in zip(commands, replies, strict=False):
        name = args[0].lower()
        if name in (b"get", b"getex") and answer is None:
            _start(c, [args[1]])
        elif name == b"mget" and isinstance(answer, list):
            _start(c, [k for k, v in zip(args[1:], answer, strict=False) if v is None])
    return reply.array(reply.encode(r, c.proto) for r in replies)


_TTL_OPTS = {b"ex", b"px", b"exat", b"pxat", b"persist"}


def _ttl_change(args: list[bytes], answer: Any) -> bool:
    """Whether EXPIRE/PEXPIRE/…/PERSIST, or GETEX with an expiry option, acted on an existing key
    (``:1``, or GETEX's value): a TTL change, not a write (the ttl-during row)."""
    name = args[0].lower()
    if name == b"getex":
        return answer is not None and any(a.lower() in _TTL_OPTS for a in args[2:])
    return name in (b"expire", b"pexpire", b"expireat", b"pexpireat", b"persist") and answer == 1


async def _expiry_of(c: Client, shared: Any, key: str) -> None:
    """Tell the write-back the expiry a TTL change in EXEC gave ``key`` (read back from Redis): a
    value being computed of it is stored with it; gone (an expiry in the past) is a delete."""
    when = await shared.raw([b"PEXPIRETIME", key.encode("utf-8", "surrogateescape")], 2)
    if when == -2:
        c.km.written([key])
    else:
        c.km.expiry_set(key, None if when == -1 else when / 1000)


def _start(c: Client, keys: list[bytes]) -> None:
    """Start computing keys a relayed transaction found missing (those of a keyspace)."""
    for raw in keys:
        key = key_of(raw)
        if c.km.registry.route(key) is None:
            continue
        pending = c.km.read(key)
        if pending is not None and type(pending) is not Item:
            background(c.server, pending)  # type: ignore[arg-type]
