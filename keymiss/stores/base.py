"""The Store contract every backend honours, and the shared machinery of in-process stores.

A store keeps bytes plus a one-byte codec tag and an absolute expiry time; it never interprets the
bytes. Methods are coroutines so that network stores fit the same seam; in-process stores also offer
``get_now`` so the engine's hit path costs a dictionary or B-tree lookup and no coroutine hop.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from keymiss.errors import ReplyError
from keymiss.glob import compile_glob

#: keymiss's own records (QA contexts, model fingerprints) live under this prefix. Stores never evict
#: them to make room — losing a context would turn every question about it into an error — but they
#: count against the budget like any value.
PINNED_PREFIX = "keymiss:"

#: Redis's answers for PTTL: no such key, key without expiry.
PTTL_MISSING = -2
PTTL_PERSISTENT = -1


#: The version tag of a value computed by a keyspace without a version (``Item.version``).
NO_VERSION = bytes(8)


class Item:
    """One stored value: its bytes, the codec tag that wrote them, when it expires (unix s), and
    the version tag of the keyspace that computed it (8 bytes; ``None`` for a client's write)."""

    __slots__ = ("codec", "expires_at", "value", "version")

    def __init__(
        self, value: bytes, codec: int = 0, expires_at: float | None = None, version: bytes | None = None
    ) -> None:
        self.value = value
        self.codec = codec
        self.expires_at = expires_at
        self.version = version

    def __repr__(self) -> str:
        return f"Item({self.value[:40]!r}, codec={self.codec}, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True)
class Write:
    """One write of a batch (``Store.set_many``)."""

    key: str
    value: bytes
    codec: int = 0
    ttl: float | None = None
    cost: float = 0.0  # compute seconds that produced the value (cost-aware eviction)
    #: only if the key is absent (SET NX): a computed value never replaces what a client wrote,
    #: on whichever node the client wrote it. A computed write (``version`` set) counts a value
    #: computed under another version as absent: that value is hidden, and its key a miss.
    nx: bool = False
    #: the version tag of the keyspace that computed the value; ``None`` for a client's write
    version: bytes | None = None


def superseded_version(old: Item, w: Write) -> bool:
    """Whether a computed write may replace ``old`` despite NX: ``old`` was computed (not written
    by a client) under another version, so no reader is served it any more."""
    return w.version is not None and old.version is not None and old.version != w.version


#: Called with each key a store evicts to stay within its budget (the engine counts per keyspace).
EvictHook = Callable[[str], None]


@dataclass
class StoreInfo:
    """A store's numbers for INFO, CONFIG GET and metrics; ``extra`` holds backend-specific ones."""

    store: str
    used_bytes: int = 0
    max_bytes: int = 0
    keys: int = 0
    evictions: int = 0
    expired: int = 0
    eviction_policy: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


class Store(abc.ABC):
    """What the engine and the server need of a backend: the asynchronous face every store has.

    Two capabilities are declared by subclassing, never probed: ``LocalStore`` (in-process, with a
    synchronous face) and ``SharedStore`` (several nodes share it: cross-node single-flight and
    pass-through of commands keymiss does not own).
    """

    #: URL-like name shown in logs and INFO (``memory``, ``lmdb:/var/cache/km``).
    url: str = "store"
    #: True for ``LocalStore``s: ``get_now`` answers without I/O waits.
    local: bool = False

    @abc.abstractmethod
    async def get(self, key: str) -> Item | None: ...

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[Item | None]: ...

    @abc.abstractmethod
    async def set(
        self,
        key: str,
        value: bytes,
        *,
        codec: int = 0,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
        keep_ttl: bool = False,
    ) -> bool:
        """Store ``value``; returns False when NX/XX refused it or it can never fit the budget."""

    @abc.abstractmethod
    async def set_many(self, writes: Sequence[Write]) -> list[bool]:
        """Store several values in one round trip (one transaction where the backend has them)."""

    @abc.abstractmethod
    async def delete(self, keys: Iterable[str]) -> int: ...

    @abc.abstractmethod
    async def exists(self, keys: Iterable[str]) -> int:
        """How many of ``keys`` exist (a key named twice counts twice, as in Redis)."""

    @abc.abstractmethod
    async def pttl(self, key: str) -> int:
        """Milliseconds left, ``-1`` for no expiry, ``-2`` for no key (Redis's PTTL)."""

    @abc.abstractmethod
    async def expire(self, key: str, ttl: float | None) -> bool:
        """Set (or with ``None`` remove) the expiry of an existing key; False if there is no key."""

    @abc.abstractmethod
    async def scan(
        self, cursor: int, match: str | None = None, count: int = 10, kind: str | None = None
    ) -> tuple[int, list[str]]:
        """Redis SCAN: every key present for the whole iteration is returned at least once."""

    @abc.abstractmethod
    async def dbsize(self) -> int: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    @abc.abstractmethod
    async def sweep(self, limit: int = 1000) -> int:
        """Drop up to ``limit`` expired entries; returns how many went."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def info(self) -> StoreInfo:
        """Numbers for INFO and metrics; must not block (network stores report their last reading)."""


class StatusReply(bytes):
    """A status reply (``+OK``) relayed from the backing server, kept apart from a bulk string."""

    __slots__ = ()


class NullArray:
    """A null array reply (RESP2 ``*-1``) relayed from the backing server, kept apart from a null
    bulk string (``$-1``)."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False


NULL_ARRAY = NullArray()


class SharedStore(Store):
    """A store several keymiss nodes share (Redis, Redis Cluster).

    It owns what sharing needs: cross-node single-flight (``flight``), pass-through of commands
    keymiss does not own (``raw``), and the translation of its client library's errors into
    ``StoreError`` (unreachable) or ``ReplyError`` (the server's own error line), so the protocol
    layer never sees a client library's exceptions.
    """

    @abc.abstractmethod
    async def flight(self, key: str, compute: Callable[[], Awaitable[Item]], compute_seconds: float) -> Item:
        """Run ``compute`` only while this node holds ``key``'s cluster-wide lease; while another
        node holds it, wait for that node's result and return it. ``timeout`` is what the
        computation itself may take."""

    @abc.abstractmethod
    async def raw(self, args: Sequence[bytes], proto: int = 2) -> Any:
        """Run a command keymiss does not own on the backing server and return its reply, shaped
        for a client speaking RESP ``proto``."""

    async def transaction(self, commands: Sequence[Sequence[bytes]], proto: int = 2) -> list[Any] | None:
        """Run ``commands`` as one MULTI/EXEC on the backing server (one connection, atomic there):
        each reply (an error as an exception), or ``None`` if the server aborted it."""
        raise ReplyError("ERR this store runs no transactions")

    async def discard_unchanged(self, items: dict[str, Item]) -> None:
        """Delete each key while it still holds the value read (``Item.value``); a key written since
        is left alone. How a value computed under an old version makes way for its replacement."""

    async def get_expiring(self, keys: Sequence[str], *, strict: bool = False) -> list[Item | None]:
        """Like ``get_many``, with each item's ``expires_at`` (what freshness decisions need)."""
        return await self.get_many(keys)

    def lease(self, key: str) -> contextlib.AbstractAsyncContextManager[bool]:
        """``async with store.lease(key) as held``: whether this node holds ``key``'s cluster-wide
        lease for the block (a store without leases: always)."""
        return contextlib.nullcontext(True)

    def get_cached(self, key: str) -> Item | None:
        """A copy held in process (a near cache), synchronously; ``None`` means "ask the store"."""
        return None

    async def get_strict(self, key: str) -> Item | None:
        """Like ``get``, but a key holding another data type raises ``ReplyError`` (WRONGTYPE)
        instead of reading as missing: checked before a miss is computed over it."""
        return await self.get(key)

    async def expire_at_ms(self, key: str, when_ms: int) -> bool:
        """Give an existing key (and its records) the absolute expiry ``when_ms`` (unix ms, in the
        future) exactly as given, as PEXPIREAT does; False if there is no key."""
        return await self.expire(key, (when_ms - time.time() * 1000) / 1000)


class LocalStore(Store):
    """Shared code of in-process stores: synchronous primitives, async face, SCAN cursors."""

    local = True
    #: the wall clock (unix seconds) expiries are set and read against; injected in tests, and
    #: what the engine's freshness decisions read unless it was given a clock of its own
    clock: Callable[[], float]

    def __init__(self, on_evict: EvictHook | None = None) -> None:
        self.on_evict = on_evict
        #: called with the keys a client's write set or deleted (not a computed value's write, nor
        #: one that set nothing, as SET XX of a missing key): their computations are superseded
        self.on_change: Callable[[list[str]], None] | None = None
        self.evictions = 0
        self.expired = 0

    # --- primitives a subclass provides -------------------------------------------------------
    @abc.abstractmethod
    def get_now(self, key: str) -> Item | None: ...

    @abc.abstractmethod
    def _set(self, writes: Sequence[Write], nx: bool, xx: bool, keep_ttl: bool) -> list[bool]: ...

    @abc.abstractmethod
    def _delete(self, keys: Iterable[str]) -> int: ...

    @abc.abstractmethod
    def _set_expiry(self, key: str, expires_at: float | None) -> bool: ...

    @abc.abstractmethod
    def _scan_start(self) -> Any: ...

    @abc.abstractmethod
    def _scan_step(self, state: Any, count: int) -> tuple[list[str], Any, bool]:
        """A full walk, keymiss's records included (``matching_keys``, for operators)."""

    @abc.abstractmethod
    def _scan_from(self, cursor: int, count: int) -> tuple[list[str], int]:
        """SCAN's step: live keys from a stateless cursor, keymiss's records left out; the next
        cursor (0: done)."""

    @abc.abstractmethod
    def _len(self) -> int: ...

    def now(self) -> float:
        """The store's clock, the one its expiries are read against (injected in tests), so the
        engine's freshness decisions agree with the store's own."""
        return self.clock()

    #: True where writes finish without blocking (memory; LMDB without fsync): the server then
    #: answers SET/DEL inline instead of through a task.
    sync_writes = True

    def _write_now(self, fn: Any, *args: Any) -> Any:
        """Run a mutating primitive on this thread (LMDB wraps it to grow the map when full)."""
        return fn(*args)

    async def _write(self, fn: Any, *args: Any) -> Any:
        """Run a mutating primitive; durable LMDB overrides this to use its writer thread."""
        return self._write_now(fn, *args)

    def begin_batch(self) -> None:
        """Writes until ``end_batch`` may share one sync to disk (a durable store's EXEC)."""

    async def end_batch(self) -> None:
        """Make the batch's writes durable (nothing to do for a store without syncs)."""

    def fits(self, key: str, size: int) -> bool:
        """Whether a value of ``size`` bytes under ``key`` could be kept at all (the budget): a
        write that could not is refused up front, as Redis refuses one over maxmemory."""
        return True

    def _noted_set(self, writes: Sequence[Write], nx: bool, xx: bool, keep_ttl: bool) -> list[bool]:
        """``_set``, telling ``on_change`` which clients' writes landed."""
        results = self._set(writes, nx, xx, keep_ttl)
        if self.on_change is not None:
            changed = [w.key for w, ok in zip(writes, results, strict=True) if ok and w.version is None]
            if changed:
                self._notify(changed)
        return results

    def _noted_delete(self, keys: Sequence[str]) -> int:
        """``_delete``, telling ``on_change`` of every key named: a delete supersedes a computation
        of its key even if it found none stored yet (the read contract's del-during row)."""
        n = self._delete(keys)
        if self.on_change is not None and keys:
            self._notify(list(keys))
        return n

    def _notify(self, keys: list[str]) -> None:
        """Call ``on_change`` (on the event loop's thread; LMDB's writer thread hands it over)."""
        assert self.on_change is not None
        self.on_change(keys)

    # --- synchronous face (valid for reads always, for writes where ``sync_writes``) -------------
    def set_now(
        self,
        key: str,
        value: bytes,
        *,
        codec: int = 0,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
        keep_ttl: bool = False,
        version: bytes | None = None,
    ) -> bool:
        """``set`` on this thread; ``version``: the tag of the keyspace version that computed the
        value, kept beside it (a copy of a computed value, as the near cache holds)."""
        write = Write(key, value, codec, ttl, version=version)
        result: list[bool] = self._write_now(self._noted_set, [write], nx, xx, keep_ttl)
        return result[0]

    def delete_now(self, keys: Iterable[str]) -> int:
        result: int = self._write_now(self._noted_delete, list(keys))
        return result

    def _update(self, key: str, edit: Callable[[Item | None], tuple[bytes | None, Any]]) -> Any:
        """Read, edit and write one key as a single step of the store's writer: ``edit`` gets the
        current item and returns ``(new value or None for no write, result)``. Every write of a
        store goes through one writer (the event loop, or LMDB's writer thread), so no other write
        lands between the read and the write: INCR from two clients never loses an increment."""
        new, result = edit(self.get_now(key))
        if new is not None and not self._noted_set([Write(key, new, 0, None)], False, False, True)[0]:
            raise ReplyError("OOM command not allowed when used memory > 'maxmemory'.")  # unchanged
        return result

    def update_now(self, key: str, edit: Callable[[Item | None], tuple[bytes | None, Any]]) -> Any:
        """``update`` on this thread (valid where ``sync_writes``)."""
        return self._write_now(self._update, key, edit)

    async def update(self, key: str, edit: Callable[[Item | None], tuple[bytes | None, Any]]) -> Any:
        """A read-modify-write of one key (INCR, APPEND, SETRANGE); the TTL is kept, as Redis does."""
        return await self._write(self._update, key, edit)

    def step_now(self, step: Callable[[], Any]) -> Any:
        """Run ``step`` as one step of the store's single writer, on this thread (valid where
        ``sync_writes``): a command touching several keys (RENAME, MSETNX) reads and writes them
        with no other write in between. Inside it, write with ``put`` and ``remove``."""
        return self._write_now(step)

    async def step(self, step: Callable[[], Any]) -> Any:
        """``step_now`` on the writer (LMDB's writer thread when durable)."""
        return await self._write(step)

    def put(
        self, key: str, value: bytes, *, codec: int = 0, ttl: float | None = None, nx: bool = False
    ) -> bool:
        """Inside a ``step``: write one key (False if ``nx`` and it exists, or it does not fit)."""
        return self._noted_set([Write(key, value, codec, ttl)], nx, False, False)[0]

    def remove(self, keys: Iterable[str]) -> int:
        """Inside a ``step``: delete keys; how many existed."""
        return self._noted_delete(list(keys))

    def exists_now(self, keys: Iterable[str]) -> int:
        return sum(1 for k in keys if self.get_now(k) is not None)

    def pttl_now(self, key: str) -> int:
        item = self.get_now(key)
        if item is None:
            return PTTL_MISSING
        if item.expires_at is None:
            return PTTL_PERSISTENT
        return max(0, round((item.expires_at - self.clock()) * 1000))

    # --- the async contract ---------------------------------------------------------------------
    async def get(self, key: str) -> Item | None:
        return self.get_now(key)

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        get = self.get_now
        return [get(k) for k in keys]

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        codec: int = 0,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
        keep_ttl: bool = False,
    ) -> bool:
        write = Write(key, value, codec, ttl)
        result: list[bool] = await self._write(self._noted_set, [write], nx, xx, keep_ttl)
        return result[0]

    async def set_many(self, writes: Sequence[Write]) -> list[bool]:
        if not writes:
            return []
        result: list[bool] = await self._write(self._noted_set, list(writes), False, False, False)
        return result

    async def delete(self, keys: Iterable[str]) -> int:
        result: int = await self._write(self._noted_delete, list(keys))
        return result

    async def exists(self, keys: Iterable[str]) -> int:
        return self.exists_now(keys)

    async def pttl(self, key: str) -> int:
        return self.pttl_now(key)

    async def expire(self, key: str, ttl: float | None) -> bool:
        if ttl is not None and ttl <= 0:
            return bool(await self.delete([key]))
        expires_at = None if ttl is None else self.clock() + ttl
        result: bool = await self._write(self._set_expiry, key, expires_at)
        return result

    async def expire_at(self, key: str, expires_at: float) -> bool:
        """Give an existing key an absolute expiry (unix seconds, in the future): EXPIREAT's
        time is kept as given, not recomputed from a relative one."""
        result: bool = await self._write(self._set_expiry, key, expires_at)
        return result

    async def scan(
        self, cursor: int, match: str | None = None, count: int = 10, kind: str | None = None
    ) -> tuple[int, list[str]]:
        """Stateless cursors (nothing is remembered between calls, so no scan can be cut short by
        others): every key present for the whole scan is returned at least once. keymiss's own
        records (``keymiss:*``) are not listed."""
        keys, nxt = self._scan_from(cursor, max(1, count))
        if match is not None and match != "*":
            matches = compile_glob(match)
            keys = [k for k in keys if matches(k)]
        return nxt, keys

    async def flush_data(self) -> int:
        """FLUSHDB: every key except keymiss's own records, which the keyspaces need (a QA
        keyspace's contexts) and which only ``KEYMISS FORGET keymiss:*`` removes."""
        n = 0
        cursor = 0
        while True:
            keys, cursor = self._scan_from(cursor, 1000)
            if keys:
                n += await self.delete(keys)
            if cursor == 0:
                return n

    async def dbsize(self) -> int:
        return self._len()

    def matching_keys(self, pattern: str) -> list[str]:
        """All keys matching a glob (used by ``forget``); a full walk, so meant for operators."""
        state = self._scan_start()
        matches = compile_glob(pattern)
        out: list[str] = []
        while True:
            keys, state, done = self._scan_step(state, 1000)
            out.extend(k for k in keys if matches(k))
            if done:
                return out
