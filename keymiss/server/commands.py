"""The command table: how a command registers, and what every handler shares.

A handler takes the connection and the arguments (command name first) and returns the encoded reply,
or an awaitable of it when it must wait (a miss being computed, a durable write). Hits on in-process
stores are answered inline, without a task, so they stay fast while a model runs elsewhere.

The commands themselves live beside this module, one module per group (``strings``, ``keys``,
``session``, ``introspection``); importing one registers its commands here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keymiss.errors import error_line
from keymiss.server import reply, resp
from keymiss.server.passthrough import changed_by, unsure
from keymiss.stores.base import LocalStore

if TYPE_CHECKING:
    from keymiss.server.client import Client

Reply = bytes | Awaitable[bytes]
Handler = Callable[["Client", list[bytes]], Reply]


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
    ttl: bool = False,
) -> Callable[[Handler], Handler]:
    """Register a handler in the table. A ``write`` command supersedes what is being computed of
    the keys it names (``superseding``); ``ttl`` marks one that only changes a key's expiry (it
    supersedes a computation only where it deletes the key, and says so itself)."""

    def register(fn: Handler) -> Handler:
        handler = fn if "write" not in flags or ttl else superseding(fn, keys)
        TABLE[name.lower().encode()] = Command(
            name.lower(), handler, arity, flags, *keys, group, summary, arguments or [], subcommands
        )
        return fn

    return register


def superseding(fn: Handler, keys: tuple[int, int, int]) -> Handler:
    """The one rule of client writes during a computation (docs/architecture.md, the read
    contract's write-during and del-during rows): a write that changes or deletes a key supersedes
    a computation of that key already running, as DEL does. Its readers still get the computed
    value, but it is not stored over the client's write, nor after the client's delete. A write
    that changes nothing (SET XX of a missing key, SETNX of a present one, a rename onto itself)
    supersedes nothing.

    Whether it changed a key is decided where it reaches the store: an in-process store tells the
    engine of each key a client's write changed (``LocalStore.on_change``); on a shared Redis the
    reply says (``passthrough.changed_by``). Here, for every ``write`` command of the table by its
    key positions, its keys are announced as being written from when the handler accepted its
    arguments until it lands: a fill that finishes meanwhile waits for it, so it neither lands
    over the client's write nor is dropped for a write that changes nothing. A write naming no
    key (FLUSHDB) supersedes every key. Relayed commands follow the same rule by the flags the
    backing Redis gives them (``Connection._passthrough``)."""
    first, last, step = keys

    def handler(c: Client, args: list[bytes]) -> Reply:
        if first <= 0:
            named: list[str] | None = None
        else:
            end = last if last >= 0 else len(args) + last
            named = [key_of(k) for k in args[first : end + 1 : step]]
        km = c.km
        km.writeback.writing(named)
        try:
            answer = fn(c, args)
        except BaseException:
            km.writeback.landed(named)
            raise
        if isinstance(answer, bytes):
            _landed(c, args, named, answer)
            return answer
        return _landing(c, args, named, answer)

    handler.__doc__ = fn.__doc__
    return handler


def _landing(c: Client, args: list[bytes], named: list[str] | None, pending: Awaitable[bytes]) -> Reply:
    """A task of the write (started now), whose end, however it ends, lands the write: a fill
    held for it must not wait for ever on a client that went away."""
    task = asyncio.ensure_future(pending)

    def done(t: asyncio.Future[bytes]) -> None:
        ok = not t.cancelled() and t.exception() is None
        _landed(c, args, named, t.result() if ok else b"-")

    task.add_done_callback(done)
    return task


def _landed(c: Client, args: list[bytes], named: list[str] | None, answer: bytes) -> None:
    """A write command finished with ``answer``: what it changed supersedes (an in-process store
    said so already as it wrote), then fills held for it go."""
    km = c.km
    if named is None:  # FLUSHDB and kin: every key, unless it failed for sure
        if not answer.startswith(b"-") or unsure(answer):
            km.written(None)
    elif c.shared is not None and changed_by(args, answer):
        km.written(named)
    km.writeback.landed(named)


def arg(
    name: str, kind: str = "string", *, optional: bool = False, multiple: bool = False, token: str = ""
) -> dict[str, Any]:
    """An argument description for COMMAND DOCS (what redis-cli turns into hints)."""
    flags = [reply.Status(f) for f, on in (("optional", optional), ("multiple", multiple)) if on]
    doc: dict[str, Any] = {"name": name, "type": kind}
    if token:
        doc["token"] = token
    if flags:
        doc["flags"] = flags
    if kind in ("oneof", "block"):  # redis-cli reads (and crashes without) the nested arguments
        doc["arguments"] = []
    return doc


# --- helpers -------------------------------------------------------------------------------------------
def key_of(raw: bytes) -> str:
    """Keys are binary-safe: undecodable bytes survive as surrogates and encode back unchanged."""
    return raw.decode("utf-8", "surrogateescape")


def to_int(raw: bytes, message: str = NOT_INT) -> int:
    value = resp.parse_int(raw)
    if value is None:
        raise CommandError(message)
    return value


def error_reply(exc: BaseException) -> bytes:
    """The error line a client sees for an exception raised while serving a command."""
    if isinstance(exc, CommandError):  # a whole error line, code first
        return reply.error(str(exc))
    return reply.error(error_line(exc))


def local_store_of(c: Client) -> LocalStore | None:
    """The connection's store if it is in-process (answerable without awaiting), else ``None``."""
    store = c.km.store
    return store if isinstance(store, LocalStore) else None
