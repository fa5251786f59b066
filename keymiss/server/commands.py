"""The command table: how a command registers, and what every handler shares.

A handler takes the connection and the arguments (command name first) and returns the encoded reply,
or an awaitable of it when it must wait (a miss being computed, a durable write). Hits on in-process
stores are answered inline, without a task, so they stay fast while a model runs elsewhere.

The commands themselves live beside this module, one module per group (``strings``, ``keys``,
``session``, ``introspection``); importing one registers its commands here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keymiss.errors import error_line
from keymiss.server import reply, resp
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
    contract's write-during and del-during rows): a command that writes or deletes a key
    supersedes a computation of that key already running, as DEL does. Its readers still get the
    computed value, but it is not stored over the client's write, nor after the client's delete.

    Applied here, to every ``write`` command of the table by its key positions (a write naming no
    key, FLUSHDB, supersedes every key), so a new write command cannot forget it. The keys are
    marked once the handler has accepted its arguments (a refused command supersedes nothing) and
    before any of its store writes can land: a synchronous handler has written already with no
    fill in between, an asynchronous one has not started yet. Relayed commands follow the same
    rule by the flags the backing Redis gives them (``Connection._passthrough``)."""
    first, last, step = keys

    def handler(c: Client, args: list[bytes]) -> Reply:
        answer = fn(c, args)
        if first <= 0:
            c.km.written(None)
        else:
            end = last if last >= 0 else len(args) + last
            c.km.written(key_of(k) for k in args[first : end + 1 : step])
        return answer

    handler.__doc__ = fn.__doc__
    return handler


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
