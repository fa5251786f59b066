"""What a command handler may use of its client and of the server: the seam between the command
modules and the connection that dispatches to them.

``Client`` and ``Host`` are structural types (``Connection`` and ``Server`` satisfy them without
naming them), so the command modules depend on this module alone and the connection may import
the command table without a circle. The per-client and per-server state of transactions lives here
too, because both sides hold it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Protocol

from keymiss.config import Settings
from keymiss.stores.base import Item, LocalStore, SharedStore

if TYPE_CHECKING:  # types of this package's lower layers only
    from keymiss.engine.cache import Keymiss
    from keymiss.server.passthrough import Relay


class Client(Protocol):
    """One client connection, as command handlers see it."""

    km: Keymiss
    server: Host
    id: int
    proto: int
    name: str
    lib: dict[str, str]
    authenticated: bool
    shared: SharedStore | None
    query_limit: int
    output_limit: int
    waiting: bool
    closed: bool
    close_after_reply: bool
    multi: Transaction | None
    watched: dict[str, Item | None]
    watch_dirty: bool
    in_exec: bool
    exec_task: asyncio.Future[bytes] | None

    def error(self, exc: BaseException) -> bytes: ...
    async def settle(self, pending: Awaitable[bytes]) -> bytes: ...
    def dispatch_queued(self, args: list[bytes]) -> bytes | Awaitable[bytes]: ...
    def resume_processing(self) -> None: ...
    def relay(self, args: list[bytes]) -> Awaitable[bytes]: ...
    def relay_rules(self, store: SharedStore) -> Relay: ...
    def keys_of(self, cmd: Any, args: list[bytes]) -> list[str] | None: ...
    def describe(self) -> str: ...


class Host(Protocol):
    """The server, as its connections and command handlers see it."""

    km: Keymiss
    settings: Settings
    config_file: str | None
    connections: dict[int, Any]
    ids: itertools.count[int]
    started_at: float
    port: int
    loop_name: str
    access_log: bool
    total_connections: int
    total_commands: int
    rejected_connections: int
    error_replies: int
    busy_rejections: int
    output_disconnections: int
    slow_request_disconnections: int
    auth_failures: int
    relay: Relay | None
    watches: Watches
    exclusive: Any
    paused: set[Any]
    background: set[asyncio.Future[Any]]

    @property
    def serving(self) -> bool: ...
    def release(self) -> None: ...


class Transaction:
    """What one connection has queued since MULTI."""

    __slots__ = ("aborted", "commands", "shared", "size")

    def __init__(self, shared: bool) -> None:
        self.commands: list[list[bytes]] = []
        self.aborted = False
        self.size = 0
        self.shared = shared  # EXEC relays it to the shared Redis


class Watches:
    """The server's WATCHed keys: who watches which key, and the value each saw at WATCH."""

    def __init__(self) -> None:
        self.by_key: dict[str, set[Client]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_key)

    def add(self, c: Client, key: str, seen: Item | None) -> None:
        if key not in c.watched:
            c.watched[key] = seen
            self.by_key.setdefault(key, set()).add(c)

    def drop(self, c: Client) -> None:
        for key in c.watched:
            watchers = self.by_key.get(key)
            if watchers is not None:
                watchers.discard(c)
                if not watchers:
                    del self.by_key[key]
        c.watched.clear()
        c.watch_dirty = False

    def among(self, keys: list[str] | None) -> list[str]:
        """Which of ``keys`` (``None``: any key, FLUSHDB) someone watches."""
        if keys is None:
            return list(self.by_key)
        return [k for k in keys if k in self.by_key]

    def touch_changed(self, store: LocalStore, before: dict[str, Item | None]) -> None:
        for key, seen in before.items():
            if not same(seen, store.get_now(key)):
                for c in self.by_key.get(key, ()):
                    c.watch_dirty = True


def same(a: Item | None, b: Item | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.value == b.value and a.codec == b.codec and a.expires_at == b.expires_at
