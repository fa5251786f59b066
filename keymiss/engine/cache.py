"""The read-through cache: a store in front of the compute engine, writing back what it computes.

``Keymiss`` is the Python API and what the Python RESP server drives. Every read goes through
``read`` (one key) or ``read_many`` (several): a hit comes back ready, a miss as an awaitable that
joins or starts the key's single computation (``keymiss.engine.compute``), commits the value to the store,
and only then answers — so an answer always means the value is stored.
"""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Self

from keymiss.engine.compute import Computed, ComputeEngine
from keymiss.engine.freshness import (
    EARLY,
    FILL,
    HIDE,
    SERVE,
    STALE,
    VERSION_STALE,
    Decision,
    decide,
    needs_expiry,
)
from keymiss.engine.keyapi import KeyCommands, Read, ReadMany, Results
from keymiss.engine.writeback import WriteBack
from keymiss.errors import KeymissError, StoreError
from keymiss.keyspace import Keyspace, Registry
from keymiss.options import KeyspaceOptions
from keymiss.stores import Item, LocalStore, SharedStore, Store, open_store
from keymiss.stores.eviction import Policy
from keymiss.stores.memory import MemoryStore

_POOL = ("connections", "connection_wait", "reply_timeout")  # a Redis store's pool settings (configure)
log = logging.getLogger("keymiss")


class Keymiss(KeyCommands):
    """A compute-on-miss cache: register functions on keyspaces, then ``get`` keys.

    ``store`` is a store URL (``"memory"``, ``"lmdb:./cache"``) or a ``Store`` instance. The store is
    opened on first use, so a server may still override ``store``/``max_memory`` with ``configure``
    after the app module registered its keyspaces. ``workers`` is the number of threads each sync
    keyspace may use (``KeyspaceOptions.concurrency`` overrides it per keyspace); ``error_detail``
    chooses what clients see of a handler's exception: ``"message"`` (type and message) or
    ``"type"``.

    ``clock`` (a callable returning unix seconds) is what freshness is decided on — the stale
    window, XFetch — and what the in-process stores keymiss opens keep expiries by; refresh
    backoff runs on it too. Left out, a store given as an instance lends its own clock (the
    monotonic clock times backoff), and an opened one runs on ``time.time``. ``random`` draws
    XFetch's uniform number in [0, 1). Both are there so tests run freshness in virtual time.
    """

    def __init__(
        self,
        store: str | Store = "memory",
        *,
        max_memory: int | str = "auto",
        eviction: str | Policy = "worth",
        max_in_flight: int = 10_000,
        workers: int | None = None,
        sweep_interval: float = 1.0,
        error_detail: str = "message",
        clock: Callable[[], float] | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        KeyspaceOptions(error_detail=error_detail)  # validates it
        self.registry = Registry()
        self.engine = ComputeEngine(
            self.registry, max_in_flight=max_in_flight, concurrency=workers, error_detail=error_detail
        )
        self._store_spec: str | Store = store
        self._max_memory = max_memory
        self._eviction = eviction
        self._pool: dict[str, Any] = {}  # a Redis store's connections and wait (configure)
        self._given_clock = clock
        self._clock: Callable[[], float] = clock or time.time  # settled when the store opens
        self._draw = random
        self._begun = 0  # fills begun by reads, ever
        self._store: Store | None = None
        self._local: LocalStore | None = None  # the store, when it is an in-process one
        self.writeback = WriteBack(self.engine, lambda: self.store, clock or time.monotonic)
        if isinstance(store, Store):  # after the write-back: the store reports changes to it
            self._adopt(store)
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._startup: list[Callable[[Any], Any]] = []  # each takes this cache (on_start)
        self._started = False
        self._forked: list[Store] = []  # stores of the parent process, after a fork (kept, not used)
        self._fork_refusal, self._parked = "", False  # see after_fork and park
        self.extensions: dict[str, Any] = {}  #: an app's services (the QA keyspace's reader)
        #: the event loop this cache runs on: the one that started it (its single-flight, batches
        #: and slots belong to it); ``SyncKeymiss`` and cached functions hand calls to it
        self.loop: asyncio.AbstractEventLoop | None = None
        self.unowned_hits = 0
        self.unowned_misses = 0
        self.decode_failures = 0
        #: handler threads left running when the engine closed (shutdown reports them)
        self.abandoned_handlers = 0

    # --- configuration ---------------------------------------------------------------------------
    @property
    def max_in_flight(self) -> int:
        return self.engine.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self.engine.max_in_flight = value

    def configure(
        self,
        *,
        store: str | Store | None = None,
        max_memory: int | str | None = None,
        eviction: str | Policy | None = None,
        error_detail: str | None = None,
        store_connections: int | None = None,
        store_wait: float | None = None,
        error_memory: int | None = None,
        store_timeout: float | None = None,
    ) -> None:
        """Override settings (what ``--store``/``--max-memory`` do) before the store opens: a Redis
        store's queue for connections (``store_connections``, ``store_wait``) and reply wait
        (``store_timeout``) where its URL does not say; ``error_memory`` for remembered errors."""
        asked = (store, max_memory, eviction, store_connections, store_wait, store_timeout)
        have = (self._store_spec, self._max_memory, self._eviction, *map(self._pool.get, _POOL))
        if self._parked and any(a is not None and a != h for a, h in zip(asked, have, strict=True)):
            self._store = self._local = None  # another store: its values go, the hooks run again
            self._started = False
        if self._store is not None and asked != (None,) * 6 and not self._parked:
            raise KeymissError("the store is already open; configure it before the first request")
        if store is not None:
            self._store_spec = store
            if isinstance(store, Store):
                self._adopt(store)
        if max_memory is not None:
            self._max_memory = max_memory
        if eviction is not None:
            self._eviction = eviction
        for name, value in zip(_POOL, (store_connections, store_wait, store_timeout), strict=True):
            if value is not None:
                self._pool[name] = value
        if error_memory is not None:
            self.engine.errors.max_bytes = error_memory
        if error_detail is not None:
            KeyspaceOptions(error_detail=error_detail)
            self.engine.error_detail = error_detail
            for ks in self.registry:  # lanes read the default when they are built
                self.engine.add(ks)

    # --- lifecycle -------------------------------------------------------------------------------
    @property
    def store_spec(self) -> str | Store:
        """The store the app asked for (a URL or a Store), before any server setting opens it."""
        return self._store_spec

    @property
    def max_memory(self) -> int | str:
        """The memory budget the app asked for (``"auto"`` by default)."""
        return self._max_memory

    @property
    def eviction(self) -> str | Policy:
        return self._eviction

    @property
    def store(self) -> Store:
        """The store, opened on first use."""
        if self._store is None:
            if self._closed:
                raise StoreError(self._fork_refusal or "keymiss is closed")
            spec = self._store_spec
            if isinstance(spec, Store):
                self._adopt(spec)
            else:
                self._adopt(
                    open_store(
                        spec,
                        max_memory=self._max_memory,
                        eviction=self._eviction,
                        on_evict=self._evicted,
                        clock=self._given_clock,
                        **self._pool,
                    )
                )
        assert self._store is not None
        return self._store

    def now(self) -> float:
        """The time freshness is decided on: the injected clock, the store's, or ``time.time``."""
        return self._clock()

    def _adopt(self, store: Store) -> None:
        """Take ``store`` as the store: reads of an in-process one take its synchronous path, its
        ``on_change`` supersedes fills, and freshness is decided on its clock (unless given one)."""
        self._store = store
        self._local = store if isinstance(store, LocalStore) else None
        if self._local is not None:
            self._local.on_change = self.writeback.supersede
        if self._given_clock is None:
            self._clock = store.clock if isinstance(store, LocalStore) else time.time

    def on_start(self, hook: Callable[[Self], Any]) -> None:
        """Run ``await hook(km)`` once when the engine starts (after a server applied its store
        settings): loading a model, ingesting a default corpus, checking stored fingerprints."""
        self._startup.append(hook)

    def _evicted(self, key: str) -> None:
        ks = self.registry.route(key)
        if ks is not None:
            ks.stats.evictions += 1

    async def start(self) -> None:
        """Open the store, run start hooks and start the expiry sweep (``get`` does this on first use)."""
        if self.loop is not None and self.loop is not asyncio.get_running_loop():
            self.sync.hand_over()  # started by a sync call on a thread of its own: this loop takes it
        _ = self.store
        self._parked = False
        if claimed := self.loop is None:
            self.loop = asyncio.get_running_loop()
        if not self._started:
            self._started = True
            try:
                for hook in self._startup:
                    await hook(self)
            except BaseException:  # not started: the next start (a later call) runs them again
                self._started = False
                if claimed:
                    self.loop = None
                raise
        if self._sweeper is None and self._sweep_interval > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    def after_fork(self, refusal: str) -> None:
        """In a child forked while this cache ran on a thread's loop (gone here, with the parent's
        computations): start afresh on first use. A memory store is the parent's copy, a Redis URL
        opens connections of the child's own; LMDB or an app-built store is refused (StoreError
        with ``refusal``, formatted with the store's URL)."""
        self.loop, self._sweeper, old = None, None, self.engine  # the sweeper: the parent's task
        sizes = {"max_in_flight": old.max_in_flight, "concurrency": old.concurrency}
        self.engine = ComputeEngine(self.registry, error_detail=old.error_detail, **sizes)
        self.engine.errors.max_bytes = old.errors.max_bytes
        for ks in self.registry:
            self.engine.add(ks)
        self.writeback = WriteBack(self.engine, lambda: self.store, self._given_clock or time.monotonic)
        store = self._store
        if store is None or isinstance(store, MemoryStore):
            return
        self._forked.append(store)  # never closed here: its sockets or map belong to the parent
        self._store = self._local = None
        if isinstance(self._store_spec, Store) or isinstance(store, LocalStore):
            self._closed = True
            self._fork_refusal = refusal.format(store.url)

    async def park(self, grace: float = 10.0) -> None:
        """Stop running on this loop, for another to start it (a server taking over a cache a sync
        call started at import): computations get ``grace`` s; a memory store keeps its values
        (unless the server's settings replace it), another store closes, to open on the next loop."""
        if not await self.drain(grace):
            self.writeback.cancel_all()
        _ = self._sweeper is not None and self._sweeper.cancel()
        self._sweeper = self.loop = None
        if self._store is not None and not isinstance(self._store, MemoryStore):
            await self._store.close()
            self._store = self._local = None
        self._parked = True

    async def run_start_hooks(self) -> None:
        """Run the start hooks again: a server that restarted without its data needs its
        contexts re-ingested. The hooks are idempotent (unchanged contexts are left alone)."""
        for hook in self._startup:
            await hook(self)

    async def drain(self, grace: float) -> bool:
        """Let running computations finish and store their values, up to ``grace`` seconds."""
        deadline = asyncio.get_running_loop().time() + grace
        computed = await self.engine.drain(grace)
        stored = await self.writeback.wait_all(max(0.0, deadline - asyncio.get_running_loop().time()))
        return computed and stored

    async def close(self, grace: float = 10.0) -> None:
        """Let running computations finish (up to ``grace`` s), then close the store. Handler
        threads still stuck after that are abandoned and counted in ``abandoned_handlers``."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if not await self.drain(grace):
            log.warning("closing with computations still running after %.1fs; they are abandoned", grace)
            self.writeback.cancel_all()
        self.abandoned_handlers = self.engine.close()
        if self.abandoned_handlers:
            log.warning("%d handler thread(s) still inside a handler are abandoned", self.abandoned_handlers)
        if self._store is not None:
            await self._store.close()

    async def __aenter__(self) -> Keymiss:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _sweep_loop(self) -> None:
        failing = ""  # the failure being repeated: logged when it starts, then once a minute
        last_logged = 0.0
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.engine.sweep()
            try:
                await self.store.sweep()
            except Exception as exc:  # a sweep failure must not end the sweeping
                now = time.monotonic()
                if str(exc) != failing:
                    log.exception("expiry sweep failed")
                    failing, last_logged = str(exc), now
                elif now - last_logged >= 60:
                    log.error("expiry sweep still failing: %s", exc)
                    last_logged = now
            else:
                if failing:
                    log.info("expiry sweep works again")
                failing = ""

    # --- the read path -----------------------------------------------------------------------------
    # Every read, of one key or many, over any store, takes the same steps: route each key once,
    # look it up once, ``decide`` (keymiss.engine.freshness: the read contract) and ``_settle``
    # the decision — where reads are counted and refreshes and fills begin. ``read_many`` over an
    # in-process store is ``read`` for each key; over a shared one, one round trip for every key,
    # then each key decided and settled as ``read`` would.
    def read(self, key: str) -> Read:
        """The one read entry point: the stored item (a hit, ready), ``None`` (a miss no keyspace
        owns, ready), or an awaitable that computes, stores and returns the item. Errors — a key
        that does not fit its template among them — are raised by the awaitable. A miss is begun
        here, synchronously, so a client's write from this moment on wins over its value."""
        ks = self.registry.route(key)
        local = self._local or self._open_local()
        if local is not None:
            item = local.get_now(key)
        else:
            item = self._near(key, ks)
            if item is None:
                return self._read_shared(key, ks)
        decision = decide(ks, item, self._clock, self._draw)
        if decision is SERVE and ks is not None:  # the hit path, kept to one call: ``_settle``'s
            ks.stats.hits += 1  # first case, inlined
            return item
        return self._settle(key, ks, item, decision)

    def read_many(self, keys: Sequence[str]) -> ReadMany:
        """``read`` for several keys, in order, with each key's error in its place. Ready when every
        key is served or owned by no keyspace; otherwise one awaitable for all of them."""
        if (self._local or self._open_local()) is not None:
            read, begun = self.read, self._begun
            results: list[Any] = [read(k) for k in keys]
            return results if self._begun == begun else self._ready(results)
        route = self.registry.route
        spaces = [route(k) for k in keys]
        found = [self._near(k, ks) for k, ks in zip(keys, spaces, strict=True)]
        if None in found:  # one round trip for the keys not held near
            return self._read_many_shared(keys, spaces, found)
        decided = self._decided
        return self._ready([decided(k, ks, item) for k, ks, item in zip(keys, spaces, found, strict=True)])

    def _open_local(self) -> LocalStore | None:
        """The in-process store, opening the store on the first read; ``None`` for a shared one."""
        if self._store is None:
            _ = self.store  # opens it, and with it ``_local``
        return self._local

    def _near(self, key: str, ks: Keyspace | None) -> Item | None:
        """A shared store's copy held in process (the near cache), where the decision does not
        need the value's own expiry."""
        return None if needs_expiry(ks) else self.store.get_cached(key)  # type: ignore[attr-defined]

    async def _read_shared(self, key: str, ks: Keyspace | None) -> Item | None:
        (item,) = await self._fetch([key], [ks], strict=ks is None)
        result = self._decided(key, ks, item)
        return result if result is None or type(result) is Item else await result  # type: ignore[misc]

    async def _read_many_shared(
        self, keys: Sequence[str], spaces: list[Keyspace | None], found: list[Item | None]
    ) -> Results:
        missing = [i for i, item in enumerate(found) if item is None]
        fetched = await self._fetch([keys[i] for i in missing], [spaces[i] for i in missing])
        for i, item in zip(missing, fetched, strict=True):
            found[i] = item
        decided = self._decided
        result = self._ready([decided(k, ks, item) for k, ks, item in zip(keys, spaces, found, strict=True)])
        return result if isinstance(result, list) else await result

    async def _fetch(
        self, keys: Sequence[str], spaces: Sequence[Keyspace | None], strict: bool = False
    ) -> list[Item | None]:
        """Look keys up in a shared store in one round trip: with their expiry where a decision
        reads it. ``strict`` (one key, as GET): a key of another type is WRONGTYPE, not nil."""
        store = self.store
        if not isinstance(store, SharedStore):  # a Store that is neither: its plain contract
            return list(await store.get_many(keys))
        if any(map(needs_expiry, spaces)):
            return await store.get_expiring(keys, strict=strict)
        found = await store.get_many(keys)
        if strict and found[0] is None:
            return [await store.get_strict(keys[0])]  # nil, or WRONGTYPE for a key of another type
        return list(found)

    def _ready(self, results: list[Any]) -> ReadMany:
        """Per-key results as one answer: ready if no key waits for a fill, else one awaitable."""
        pending = [i for i, r in enumerate(results) if r is not None and type(r) is not Item]
        return self._gather(results, pending) if pending else results

    async def _gather(self, results: list[Any], pending: list[int]) -> Results:
        done = await asyncio.gather(*(results[i] for i in pending), return_exceptions=True)
        for i, result in zip(pending, done, strict=True):
            results[i] = result
        return results

    def _decided(self, key: str, ks: Keyspace | None, item: Item | None) -> Item | Awaitable[Item] | None:
        return self._settle(key, ks, item, decide(ks, item, self._clock, self._draw))

    def _settle(
        self, key: str, ks: Keyspace | None, item: Item | None, decision: Decision
    ) -> Item | Awaitable[Item] | None:
        """Carry out ``decision`` for one key: count it (the one place reads are counted; ``read``
        inlines the first case), start the refresh or the fill it calls for, and return what the
        reader gets — the item, ``None`` (nil), or an awaitable of the filled item."""
        if decision is SERVE:
            if ks is not None:
                ks.stats.hits += 1
            else:
                self.unowned_hits += 1
            return item
        if ks is None:  # NIL: no keyspace owns the key
            self.unowned_misses += 1
            return None
        stats = ks.stats
        if decision is FILL or decision is HIDE:
            stats.misses += 1
            if decision is HIDE:
                stats.version_misses += 1
                return self._begin(key, ks, item)
            return self._begin(key, ks, None)
        stats.hits += 1  # served while one refresh recomputes it
        if decision is STALE:
            stats.stale_hits += 1
        elif decision is VERSION_STALE:
            stats.version_stale_hits += 1
        if self._started and not self._closed:
            self.writeback.refresh(key, ks, stale=decision is not EARLY, seen=item)
        return item

    def _begin(self, key: str, ks: Keyspace, hidden: Item | None) -> Awaitable[Item]:
        self._begun += 1  # (``read_many`` looks for awaitables only where fills began)
        if self._started and not self._closed:
            return self.writeback.begin(key, ks, hidden)  # watched from now: a client's write wins
        return self._fill(key, ks, hidden)

    # --- write-back --------------------------------------------------------------------------------
    async def _fill(self, key: str, ks: Keyspace, hidden: Item | None = None) -> Item:
        if self._closed:
            raise StoreError("keymiss is closed")
        if not self._started:
            await self.start()
        return await self.writeback.fill(key, ks, hidden)

    def written(self, keys: Iterable[str] | None = None) -> None:
        """A client wrote or deleted ``keys`` (all: ``None``): a fill started before is not stored."""
        self.writeback.supersede(keys)

    def expiry_set(self, key: str, expires_at: float | None) -> None:
        """A client gave ``key`` an expiry (unix s; ``None``: none): a fill of it keeps that one."""
        self.writeback.expiry_set(key, expires_at)

    async def compute(self, keys: Sequence[str]) -> list[Computed | BaseException | None]:
        """Compute ``keys`` and store nothing (the worker's call): see ``ComputeEngine.compute``."""
        if not self._started and not self._closed:
            await self.start()
        return await self.engine.compute(keys)

    async def compute_each(
        self, keys: Sequence[str]
    ) -> list[asyncio.Future[Computed] | BaseException | None]:
        """Start computing ``keys``, storing nothing: per key its future, its error or ``None`` (the
        worker answers each key as it finishes); see ``ComputeEngine.start_each``."""
        if not self._started and not self._closed:
            await self.start()
        return self.engine.start_each(keys)

    def __repr__(self) -> str:
        store = self._store.url if self._store is not None else self._store_spec
        return f"<Keymiss store={store!r} keyspaces={[ks.pattern for ks in self.registry]}>"
