"""The Python API: registering keyspaces, key commands (get, set, delete, expire, forget, ...) and
stats, written over the read path, the registry and the store alone: a base of ``Keymiss``, so the
cache module holds the read path and the lifecycle itself."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from keymiss import codecs
from keymiss.engine.cached import cached
from keymiss.engine.compute import ComputeEngine
from keymiss.engine.syncface import SyncKeymiss
from keymiss.engine.writeback import WriteBack
from keymiss.errors import CodecError, ConfigError, KeymissError
from keymiss.glob import compile_glob, glob_prefix
from keymiss.keyspace import Keyspace, Registry, routable
from keymiss.options import KeyspaceOptions
from keymiss.stores import Item, LocalStore, Store
from keymiss.stores.base import PINNED_PREFIX
from keymiss.valkey.protocol import CMD_FORGET, COMPANION_PREFIX, ERR_PREFIX, MAX_GLOB, OPT_TAG

#: the command that forgets, spelled as the module spells it (the Python server answers it too)
FORGET_COMMAND = CMD_FORGET
#: its keyword before a tag: ``FORGET TAG tag``
TAG_WORD = OPT_TAG
FORGET_USAGE = f"{ERR_PREFIX}FORGET takes a pattern, or {OPT_TAG} and a tag"

#: what a forget that reaches no keyspace is told, on every front end (the module's words)
FORGET_NO_KEYSPACE = (
    ERR_PREFIX.removeprefix("ERR ")
    + "no keyspace's keys match that pattern (FORGET forgets computed values; DEL removes other keys)"
)
#: keys one store deletion of a forget removes at most
FORGET_BATCH = 1000
FORGET_NO_TAG = ERR_PREFIX.removeprefix("ERR ") + "no keyspace declares that tag"
#: what a pattern or tag of 0 or over MAX_GLOB bytes is told, on every front end (the module's words)
FORGET_BAD_LENGTH = ERR_PREFIX.removeprefix("ERR ") + f"a pattern or tag is 1 to {MAX_GLOB} bytes"


def _check_length(what: str) -> None:
    if not what or (len(what) > MAX_GLOB // 4 and len(what.encode("utf-8", "surrogateescape")) > MAX_GLOB):
        raise KeymissError(FORGET_BAD_LENGTH)


log = logging.getLogger("keymiss")

_TEXT = int(codecs.Codec.TEXT)

#: What ``read`` returns: a ready item, ``None`` (a miss no keyspace owns), or an awaitable of either.
Read = Item | None | Awaitable[Item | None]
#: What ``read_many`` returns: per key an item, ``None`` or that key's error; ready or awaitable.
Results = list[Item | BaseException | None]
ReadMany = Results | Awaitable[Results]


F = TypeVar("F", bound=Callable[..., Any])

_SYNC_FACE = "keymiss.sync_face"


class KeyCommands:
    """Keyspaces, key commands and stats over ``read``/``read_many``, the store and the
    write-back (see ``Keymiss``)."""

    registry: Registry
    engine: ComputeEngine
    extensions: dict[str, Any]
    writeback: WriteBack
    decode_failures: int
    #: reads of keys no keyspace owns: found (hits) and not (misses); a keyspace counts its own
    unowned_hits: int
    unowned_misses: int

    # what ``Keymiss`` provides (a plain base, not an ABC: ``Keymiss`` keeps the plain metaclass)
    @property
    def store(self) -> Store:
        raise NotImplementedError

    def read(self, key: str) -> Read:
        raise NotImplementedError

    def now(self) -> float:
        """The time freshness is decided on (unix seconds; injected with ``Keymiss(clock=...)``)."""
        raise NotImplementedError

    def read_many(self, keys: Sequence[str]) -> ReadMany:
        raise NotImplementedError

    def written(self, keys: Iterable[str] | None = None) -> None:
        raise NotImplementedError

    def keyspace(self, pattern: str, **options: Any) -> Callable[[F], F]:
        """Decorator registering a sync or async function as the source of a keyspace's values.

        Glob patterns (``double:*``) pass the key; templates (``qa{<tag>}_<q>``) pass the fields as
        keyword arguments. With ``batch_size``, the function takes a list (keys, or named tuples of
        fields) and must return a list of the same length. The options are ``KeyspaceOptions``'
        fields: ``ttl``, ``batch_size``, ``batch_wait_ms``, ``timeout``, ``codec``, ``error_ttl``
        (remember a failure so a broken input does not rerun an expensive model on every request),
        ``concurrency``, ``queue``, ``queue_timeout``, ``error_detail`` and ``early_refresh``
        (XFetch's beta: hits of a key nearing its TTL start one background recomputation, so a hot
        key is refreshed before it expires; with the in-process stores).
        """
        opts = KeyspaceOptions.of(**options)

        def register(fn: F) -> F:
            self.add_keyspace(pattern, fn, opts)
            return fn

        return register

    def cached(self, template: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        """Decorator making a function's calls go through the cache: ``@km.cached("sq:{n}",
        ttl=60)`` turns ``sq(12)`` into a read of the key ``sq:12``, computed by ``sq`` on a miss,
        and registers the keyspace ``sq:<n>`` so that a Redis client's ``GET sq:12`` (Python
        server, module mode) is the same read. The key's fields are the function's parameters, in
        ``str.format`` syntax (``{{``/``}}`` for literal braces); annotated ``str``, ``int``,
        ``float`` or ``bool``; text escaped so no argument can read another call's key (see
        ``keymiss.engine.cached``). The options are ``keyspace``'s.

        A sync function stays sync (its calls run on this cache's event loop: ``SyncKeymiss``),
        an async one async. The decorated function also has ``.key(*args, **kw)`` (the key a
        Redis client reads), ``.forget(*args, **kw)`` (drop that call's value and any remembered
        failure; awaitable for an async function), ``.acall``/``.aforget`` (the awaitable forms, for
        a sync function used from async code), ``.keyspace`` and ``.__wrapped__`` (the function).
        """
        return cached(self, template, **options)

    @property
    def sync(self) -> SyncKeymiss:
        """This cache's synchronous face (``SyncKeymiss``): blocking methods for scripts,
        notebooks and threads, on this cache's own event loop."""
        face = self.extensions.get(_SYNC_FACE)
        if face is None:
            face = self.extensions.setdefault(_SYNC_FACE, SyncKeymiss(self))
        return face  # type: ignore[no-any-return]

    def add_keyspace(
        self,
        pattern: str,
        handler: Callable[..., Any],
        options: KeyspaceOptions | None = None,
        **overrides: Any,
    ) -> Keyspace:
        """Non-decorator form of ``keyspace``."""
        return self.register(Keyspace(pattern, handler, options, **overrides))

    def register(self, ks: Keyspace) -> Keyspace:
        """Register a built keyspace (``add_keyspace`` and ``cached`` build theirs)."""
        ks.clock = self.now  # its version_stale window runs on the engine's clock
        self.registry.add(ks)
        self.engine.add(ks)
        return ks

    def tune(self, pattern: str, **options: Any) -> Keyspace:
        """Change a registered keyspace's options (what a config file's ``[keyspaces."…"]`` table
        does), keeping its handler and counters. Meant for before the first request."""
        old = self.registry.get(pattern)
        if old is None:
            known = ", ".join(ks.pattern for ks in self.registry) or "none"
            raise ConfigError(f"no keyspace {pattern!r} to configure; registered: {known}")
        ks = old.tuned(KeyspaceOptions.of(old.options, **options))
        ks.clock = self.now
        self.registry.replace(ks)
        self.engine.add(ks)
        return ks

    # --- introspection -----------------------------------------------------------------------------
    @property
    def hits(self) -> int:
        """Reads answered from a stored value: each keyspace's (``stats.hits``, counted once, where
        the read is decided) and those of keys no keyspace owns."""
        return self.unowned_hits + sum(ks.stats.hits for ks in self.registry.keyspaces)

    @property
    def misses(self) -> int:
        """Reads that found no value to serve (absent, or of another version)."""
        return self.unowned_misses + sum(ks.stats.misses for ks in self.registry.keyspaces)

    def stats(self) -> dict[str, Any]:
        """Engine counters, per-keyspace counters and the store's own numbers."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "in_flight": self.engine.in_flight,
            "stuck_handlers": self.engine.stuck_handlers(),
            "decode_failures": self.decode_failures,
            "keyspaces": {
                ks.pattern: {**ks.describe(), "queued": self.engine.queued(ks.pattern)}
                for ks in self.registry
            },
            "store": self.store.info().as_dict(),
        }

    def keyspaces(self) -> list[Keyspace]:
        return list(self.registry)

    async def get(self, key: str) -> Any:
        """The value for ``key``, computed on a miss; ``None`` for a missing key no keyspace owns."""
        item = self.read(key)
        if item is None:
            return None
        if type(item) is not Item:
            item = await item  # type: ignore[misc]
            if item is None:
                return None
        if item.codec == _TEXT:  # the common case, inlined: text never fails to decode
            return item.value.decode("utf-8", "surrogateescape")
        try:
            return codecs.decode(item.value, item.codec)
        except CodecError as exc:
            self.decode_failures += 1
            log.warning("stored value of %r does not decode (%s); recomputing", key[:200], exc)
            ks = self.registry.route(key)
            if ks is None:
                raise
            fresh = await self.writeback.replace(key, ks)
            return codecs.decode(fresh.value, fresh.codec)

    async def get_item(self, key: str) -> Item | None:
        """Like ``get`` but returns the stored bytes and codec tag (what the RESP server sends)."""
        item = self.read(key)
        if item is None or isinstance(item, Item):
            return item
        return await item

    async def get_many(self, keys: Sequence[str], *, return_exceptions: bool = False) -> list[Any]:
        """Values for ``keys`` in order: hits in one store round trip, misses computed concurrently."""
        items = await self.get_many_items(keys, return_exceptions=return_exceptions)
        out: list[Any] = []
        for item in items:
            if item is None or isinstance(item, BaseException):
                out.append(item)
                continue
            try:
                out.append(codecs.decode(item.value, item.codec))
            except CodecError as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    async def get_many_items(self, keys: Sequence[str], *, return_exceptions: bool = False) -> Results:
        """``get_many`` returning stored items; failures are raised or, if asked, returned in place."""
        result = self.read_many(keys)
        items = result if isinstance(result, list) else await result
        if not return_exceptions:
            for item in items:
                if isinstance(item, BaseException):
                    raise item
        return items

    # --- writes and key commands -----------------------------------------------------------------
    async def set(
        self,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        nx: bool = False,
        xx: bool = False,
        keep_ttl: bool = False,
    ) -> bool:
        """Store ``value`` (encoded by type, like a handler's result); False if NX/XX refused it."""
        data, tag = codecs.encode(value)
        if ttl is not None and ttl <= 0:
            raise KeymissError("invalid expire time in 'set' command")
        self.written([key])
        return await self.store.set(key, data, codec=tag, ttl=ttl, nx=nx, xx=xx, keep_ttl=keep_ttl)

    async def delete(self, *keys: str) -> int:
        """Remove keys; returns how many existed."""
        self.written(keys)
        return await self.store.delete(keys)

    async def exists(self, *keys: str) -> int:
        """How many of ``keys`` exist; a key named twice counts twice, as in Redis."""
        return await self.store.exists(keys)

    async def pttl(self, key: str) -> int:
        """Milliseconds to live; ``-1`` no expiry, ``-2`` no such key."""
        return await self.store.pttl(key)

    async def ttl(self, key: str) -> int:
        """Seconds to live, rounded as Redis does; ``-1`` no expiry, ``-2`` no such key."""
        ms = await self.store.pttl(key)
        return ms if ms < 0 else (ms + 500) // 1000

    async def expire(self, key: str, seconds: float) -> bool:
        """Give an existing key a time to live (zero or less deletes it)."""
        if seconds <= 0:
            self.written([key])
        self.writeback.writing([key])  # a fill ending meanwhile waits for it, as for the server's
        try:
            done = await self.store.expire(key, seconds)
            if done and seconds > 0:
                self.writeback.expiry_set(key, time.time() + seconds)
        finally:
            self.writeback.landed([key])
        return done

    async def persist(self, key: str) -> bool:
        """Remove a key's expiry; False if the key does not exist or had none."""
        if await self.store.pttl(key) < 0:
            return False
        self.writeback.writing([key])  # a fill ending meanwhile waits for it, as for the server's
        try:
            done = await self.store.expire(key, None)
            if done:
                self.writeback.expiry_set(key, None)
        finally:
            self.writeback.landed([key])
        return done

    async def forget(self, pattern: str) -> int:
        """Drop every computed value whose key matches a glob, e.g. after a model upgrade; returns
        how many. Only keys a keyspace owns are dropped (a registered keyspace's name, as KEYMISS
        KEYSPACES prints it, means all of its keys); a glob no keyspace's keys can match is refused
        (``KeymissError``): forgetting invalidates a cache, ``delete`` removes other keys. A glob
        under ``keymiss:`` names keymiss's own records instead (QA contexts; never the companions,
        which go with their values). Computations of matching keys running now are superseded (their
        callers get the value; it is not stored), and their remembered errors forgotten. The same
        rules as ``KEYMISS.FORGET`` in the module and on the Python server."""
        _check_length(pattern)
        ks = self.registry.get(pattern)
        if ks is not None:
            return await self._forget([ks.own_glob()], lambda k: self.registry.route(k) is ks)
        matches = compile_glob(pattern)
        if pattern.startswith(PINNED_PREFIX):
            return await self._forget(
                [pattern],
                lambda k: k.startswith(PINNED_PREFIX) and not k.startswith(COMPANION_PREFIX) and matches(k),
            )
        head = glob_prefix(pattern)
        if not any(head.startswith(k.prefix) or k.prefix.startswith(head) for k in self.registry):
            raise KeymissError(FORGET_NO_KEYSPACE)

        def wants(key: str) -> bool:
            return not key.startswith(PINNED_PREFIX) and matches(key) and self.registry.route(key) is not None

        return await self._forget([pattern], wants)

    async def forget_tag(self, tag: str) -> int:
        """Drop every value whose key carries ``tag`` (a keyspace's ``tags=["user:<user>"]``: the
        keys whose ``<user>`` is what ``tag`` names; a fixed label: all of its keyspace's keys);
        returns how many. A tag no keyspace declares is refused (``KeymissError``). Keys computed
        after it returns are unaffected."""
        _check_length(tag)
        found = [(ks, b) for ks in self.registry for b in ks.tag_bindings(tag)]
        if not found:
            raise KeymissError(FORGET_NO_TAG)

        def wants(key: str) -> bool:
            owner = self.registry.route(key)
            if owner is None or key.startswith(PINNED_PREFIX):
                return False
            return any(owner is ks and ks.carries(key, b) for ks, b in found)

        return await self._forget(sorted({ks.tag_glob(b) for ks, b in found}), wants)

    async def _forget(self, globs: Sequence[str], matches: Callable[[str], bool]) -> int:
        def wants(key: str) -> bool:
            return routable(key) and matches(key)  # a longer key is no keyspace's: it stays

        self.writeback.supersede_matching(wants)  # values still being computed are not stored
        self.engine.forget_errors_matching(wants)
        store = self.store
        keys: set[str] = set()
        for glob in globs:
            if isinstance(store, LocalStore):
                keys.update(k for k in store.matching_keys(glob) if wants(k))
                continue
            cursor = 0
            while True:
                cursor, chunk = await store.scan(cursor, glob, 1000)
                keys.update(k for k in chunk if wants(k))
                if cursor == 0:
                    break
        self.written(keys)
        ordered, n = sorted(keys), 0
        for i in range(0, len(ordered), FORGET_BATCH):  # a shared Redis is never held by one huge DEL
            n += await store.delete(ordered[i : i + FORGET_BATCH])
        return n
