"""The read-through cache: a store in front of the compute engine, writing back what it computes.

``Keymiss`` is the Python API and what the Python RESP server drives. Every read goes through
``read`` (one key) or ``read_many`` (several): a hit comes back ready, a miss as an awaitable that
joins or starts the key's single computation (``keymiss.engine.compute``), commits the value to the store,
and only then answers — so an answer always means the value is stored.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from keymiss import codecs
from keymiss.engine.compute import Computed, ComputeEngine
from keymiss.engine.keyapi import KeyCommands, Read, ReadMany, Results
from keymiss.engine.writeback import WriteBack
from keymiss.errors import KeymissError, StoreError
from keymiss.keyspace import Keyspace, Registry
from keymiss.options import KeyspaceOptions
from keymiss.stores import Item, LocalStore, SharedStore, Store, open_store
from keymiss.stores.eviction import Policy

log = logging.getLogger("keymiss")

_TEXT = int(codecs.Codec.TEXT)


class Keymiss(KeyCommands):
    """A compute-on-miss cache: register functions on keyspaces, then ``get`` keys.

    ``store`` is a store URL (``"memory"``, ``"lmdb:./cache"``) or a ``Store`` instance. The store is
    opened on first use, so a server may still override ``store``/``max_memory`` with ``configure``
    after the app module registered its keyspaces. ``workers`` is the number of threads each sync
    keyspace may use (``KeyspaceOptions.concurrency`` overrides it per keyspace); ``error_detail``
    chooses what clients see of a handler's exception: ``"message"`` (type and message) or
    ``"type"``.
    """

    def __init__(
        self,
        store: str | Store = "memory",
        *,
        max_memory: int | str = "auto",
        eviction: str | Policy = "tinylfu",
        max_in_flight: int = 10_000,
        workers: int | None = None,
        sweep_interval: float = 1.0,
        error_detail: str = "message",
    ) -> None:
        KeyspaceOptions(error_detail=error_detail)  # validates it
        self.registry = Registry()
        self.engine = ComputeEngine(
            self.registry, max_in_flight=max_in_flight, concurrency=workers, error_detail=error_detail
        )
        self._store_spec: str | Store = store
        self._max_memory = max_memory
        self._eviction = eviction
        self._store: Store | None = store if isinstance(store, Store) else None
        self.writeback = WriteBack(self.engine, lambda: self.store)
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._startup: list[Callable[[Keymiss], Any]] = []
        self._started = False
        #: services an app attaches to the engine (the QA keyspace keeps its reader here)
        self.extensions: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0
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
    ) -> None:
        """Override settings (what ``--store``/``--max-memory`` do) before the store opens."""
        changing = store is not None or max_memory is not None or eviction is not None
        if self._store is not None and changing:
            raise KeymissError("the store is already open; configure it before the first request")
        if store is not None:
            self._store_spec = store
            self._store = store if isinstance(store, Store) else None
        if max_memory is not None:
            self._max_memory = max_memory
        if eviction is not None:
            self._eviction = eviction
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
                raise StoreError("keymiss is closed")
            spec = self._store_spec
            if isinstance(spec, Store):
                self._store = spec
            else:
                self._store = open_store(
                    spec, max_memory=self._max_memory, eviction=self._eviction, on_evict=self._evicted
                )
        return self._store

    def on_start(self, hook: Callable[[Keymiss], Any]) -> None:
        """Run ``await hook(km)`` once when the engine starts (after a server applied its store
        settings): loading a model, ingesting a default corpus, checking stored fingerprints."""
        self._startup.append(hook)

    def _evicted(self, key: str) -> None:
        ks = self.registry.route(key)
        if ks is not None:
            ks.stats.evictions += 1

    async def start(self) -> None:
        """Open the store, run start hooks and start the expiry sweep (``get`` does this on first use)."""
        _ = self.store
        if not self._started:
            self._started = True
            for hook in self._startup:
                await hook(self)
        if self._sweeper is None and self._sweep_interval > 0:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

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
    def read(self, key: str) -> Read:
        """The one read entry point: the stored item (a hit, ready), ``None`` (a miss no keyspace
        owns, ready), or an awaitable that computes, stores and returns the item. Errors — a key
        that does not fit its template among them — are raised by the awaitable. A miss is begun
        here, synchronously, so a client's write from this moment on wins over its value."""
        store = self._store or self.store
        if store.local:
            item: Item | None = store.get_now(key)  # type: ignore[attr-defined]
            ks = self.registry.route(key)
            if (
                item is not None
                and ks is not None
                and ks.version is not None
                and not self._serves(ks, item, key)
            ):
                item = None  # computed under another version: a miss, and its fill replaces it
            if item is not None:
                self.hits += 1
                if ks is not None:
                    ks.stats.hits += 1
                    if (ks.early_refresh is not None or ks.stale) and item.expires_at is not None:
                        self._maybe_refresh(key, ks, item, store)
                return item
            self.misses += 1
            if ks is None:
                return None
            ks.stats.misses += 1
            if self._started and not self._closed:
                return self.writeback.begin(key, ks)  # watched from now: a client's write wins
            return self._fill(key, ks)
        if isinstance(store, SharedStore):
            near = store.get_cached(key)
            if near is not None:
                ks = self.registry.route(key)
                if ks is not None and (ks.stale or ks.early_refresh is not None):
                    pass  # its freshness is decided on the store's own expiry, read below
                elif ks is None or ks.version is None or near.version is None or self._serves(ks, near, key):
                    self._count_hit(key)
                    return near
        return self._read_shared(key)

    def _serves(self, ks: Keyspace, item: Item, key: str) -> bool:
        """Whether ``item`` may be served under ``ks``'s current version (counted when not). A
        value of the version just replaced is served inside ``version_stale``, while one refresh
        recomputes it. A version callable that fails serves nothing: the fill reports its error."""
        try:
            if ks.serves(item.version):
                return True
            if ks.serves_previous(item.version):
                ks.stats.version_stale_hits += 1
                if self._started and not self._closed:
                    self.writeback.refresh(key, ks, stale=True, seen=item)
                return True
        except Exception:
            log.exception("keyspace %r: its version callable failed", ks.pattern)
        ks.stats.version_misses += 1
        return False

    def _serves_quietly(self, ks: Keyspace, item: Item) -> bool:
        try:
            return ks.serves(item.version) or ks.serves_previous(item.version)
        except Exception:
            return False

    def _maybe_refresh(self, key: str, ks: Keyspace, item: Item, store: Store) -> None:
        """Stale-while-revalidate (RFC 5861): a value past its TTL but inside ``stale`` is served
        while one refresh runs. XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): before the
        TTL, recompute early with a probability that grows as expiry nears, scaled by how long the
        keyspace takes to compute, so a hot key is refreshed once before it expires."""
        if not self._started or self._closed or item.expires_at is None:
            return
        now = store.now() if isinstance(store, LocalStore) else time.time()
        remaining = item.expires_at - now - (ks.stale or 0.0)  # to the end of the TTL
        if ks.stale and remaining <= 0:  # past its TTL, in the stale window: served, and refreshed
            ks.stats.stale_hits += 1
            self.writeback.refresh(key, ks, stale=True, seen=item)
            return
        delta = ks.stats.mean_call_seconds
        if ks.early_refresh is None or delta <= 0:
            return
        if ks.ttl is not None and remaining > ks.ttl / 2:
            return  # not in the first half of a value's life: at most two computations per TTL
        assert ks.early_refresh is not None
        if -delta * ks.early_refresh * math.log(1.0 - random.random()) >= remaining:
            self.writeback.refresh(key, ks, seen=item)

    def read_many(self, keys: Sequence[str]) -> ReadMany:
        """``read`` for several keys, in order, with each key's error in its place. Ready when every
        key is a hit or owned by no keyspace; otherwise one awaitable for all of them."""
        store = self._store or self.store
        if not store.local:
            return self._read_many_shared(keys)
        get_now = store.get_now  # type: ignore[attr-defined]
        found: Results = [get_now(k) for k in keys]
        pending = self._tally(keys, found)
        if not pending:
            return found
        if self._started and not self._closed:  # begun now, so client writes from now on win
            return self._gather(found, [(i, self.writeback.begin(keys[i], ks)) for i, ks in pending])
        return self._fill_many(keys, found, pending)

    async def _gather(self, found: Results, fills: list[tuple[int, asyncio.Future[Item]]]) -> Results:
        results = await asyncio.gather(*(f for _, f in fills), return_exceptions=True)
        for (i, _), result in zip(fills, results, strict=True):
            found[i] = result
        return found

    async def _fill_many(
        self, keys: Sequence[str], found: Results, pending: list[tuple[int, Keyspace]]
    ) -> Results:
        if not self._started and not self._closed:
            await self.start()
        results = await asyncio.gather(
            *(self._fill(keys[i], ks) for i, ks in pending), return_exceptions=True
        )
        for (i, _), result in zip(pending, results, strict=True):
            found[i] = result
        return found

    async def _read_shared(self, key: str) -> Item | None:
        store = self.store
        ks = self.registry.route(key)
        if ks is None:
            item = await store.get(key)
            if item is None and isinstance(store, SharedStore):
                item = await store.get_strict(key)  # nil, or WRONGTYPE for a key of another type
            if item is not None:
                self._count_hit(key)
            else:
                self.misses += 1
            return item
        fresh = (bool(ks.stale) or ks.early_refresh is not None) and isinstance(store, SharedStore)
        # with the value's expiry where freshness is decided on it (a PTTL in the same round trip)
        if fresh and isinstance(store, SharedStore):
            item = (await store.get_expiring([key]))[0]
        else:
            item = await store.get(key)
        if item is not None and ks.version is not None and not self._serves(ks, item, key):
            await self._discard({key: item})
            item = None
        if item is not None:
            self._count_hit(key)
            if fresh and item.expires_at is not None:
                self._maybe_refresh(key, ks, item, store)
            return item
        self.misses += 1
        ks.stats.misses += 1
        return await self._fill(key, ks)

    async def _discard(self, hidden: dict[str, Item]) -> None:
        """Delete values computed under another version from a shared store, each only while it is
        still the value read (a client's write since stays), so the fill's NX write can land."""
        store = self.store
        if isinstance(store, SharedStore):
            await store.discard_unchanged(hidden)

    async def _read_many_shared(self, keys: Sequence[str]) -> Results:
        store = self.store
        fresh = [ks for ks in map(self.registry.route, keys) if ks and (ks.stale or ks.early_refresh)]
        if fresh and isinstance(store, SharedStore):
            found: Results = list(await store.get_expiring(keys))
            for key, item in zip(keys, found, strict=True):
                ks = self.registry.route(key)
                if (
                    ks in fresh
                    and isinstance(item, Item)
                    and item.expires_at is not None
                    and (ks.version is None or self._serves_quietly(ks, item))
                ):
                    self._maybe_refresh(key, ks, item, store)
        else:
            found = list(await store.get_many(keys))
        hidden: dict[str, Item] = {}
        pending = self._tally(keys, found, hidden)
        if hidden:
            await self._discard(hidden)
        if pending:
            await self._fill_many(keys, found, pending)
        return found

    def _tally(
        self, keys: Sequence[str], found: Results, hidden: dict[str, Item] | None = None
    ) -> list[tuple[int, Keyspace]]:
        """Count the hits and misses of a multi-key lookup; the misses a keyspace must fill. Values
        computed under another version become misses (kept in ``hidden``, when given)."""
        route = self.registry.route
        pending: list[tuple[int, Keyspace]] = []
        for i, (key, item) in enumerate(zip(keys, found, strict=True)):
            ks = route(key)
            if (
                isinstance(item, Item)
                and ks is not None
                and ks.version is not None
                and not self._serves(ks, item, key)
            ):
                if hidden is not None:
                    hidden[key] = item
                item = found[i] = None  # computed under another version: a miss
            if item is not None:
                self.hits += 1
                if ks is not None:
                    ks.stats.hits += 1
                continue
            self.misses += 1
            if ks is not None:
                ks.stats.misses += 1
                pending.append((i, ks))
        return pending

    def _count_hit(self, key: str) -> None:
        self.hits += 1
        ks = self.registry.route(key)
        if ks is not None:
            ks.stats.hits += 1

    # --- write-back --------------------------------------------------------------------------------
    async def _fill(self, key: str, ks: Keyspace) -> Item:
        if self._closed:
            raise StoreError("keymiss is closed")
        if not self._started:
            await self.start()
        return await self.writeback.fill(key, ks)

    def written(self, keys: Iterable[str] | None = None) -> None:
        """Tell the write-back that a client is writing or deleting ``keys`` (all keys: ``None``):
        a value being computed since before must not be stored afterwards — not over the write,
        and not once a written value has expired or been deleted. (Writes on other nodes of a
        shared Redis are covered by fills being stored only if the key is still absent.)"""
        self.writeback.supersede(keys)

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
