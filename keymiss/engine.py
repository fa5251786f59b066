"""The read-through engine: hit, miss, single-flight, batching, write-back, TTL.

``Keymiss`` is both the Python API and what the RESP server drives. A ``get`` first asks the store;
on a miss it finds the keyspace that owns the key, joins or starts the one computation for that key,
encodes the result, commits it to the store, and only then answers every waiter — so an answer
always means the value is stored.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import codecs
from .batching import Batcher
from .errors import (
    BatchResultError,
    BusyError,
    CodecError,
    ComputeTimeoutError,
    HandlerError,
    KeymissError,
    StoreError,
)
from .keyspace import DEFAULT_TIMEOUT, Keyspace, Registry
from .singleflight import SingleFlight
from .stores import Item, Store, Write, open_store
from .stores.eviction import Policy

log = logging.getLogger("keymiss")

F = TypeVar("F", bound=Callable[..., Any])


class Keymiss:
    """A compute-on-miss cache: register functions on keyspaces, then ``get`` keys.

    ``store`` is a store URL (``"memory"``, ``"lmdb:./cache"``) or a ``Store`` instance. The store is
    opened on first use, so a server may still override ``store``/``max_memory`` with ``configure``
    after the app module registered its keyspaces.
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
    ) -> None:
        self.registry = Registry()
        self._store_spec: str | Store = store
        self._max_memory = max_memory
        self._eviction = eviction
        self._store: Store | None = store if isinstance(store, Store) else None
        self.max_in_flight = max_in_flight
        self._workers = workers or min(32, (os.cpu_count() or 1) + 4)
        self._executor: ThreadPoolExecutor | None = None
        self._flights = SingleFlight()
        self._batchers: dict[str, Batcher] = {}
        self._errors: dict[str, tuple[BaseException, float]] = {}
        self._sweep_interval = sweep_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._startup: list[Callable[[Keymiss], Any]] = []
        self._started = False
        self.hits = 0
        self.misses = 0
        self.decode_failures = 0

    # --- configuration ---------------------------------------------------------------------------
    def configure(
        self,
        *,
        store: str | Store | None = None,
        max_memory: int | str | None = None,
        eviction: str | Policy | None = None,
    ) -> None:
        """Override store settings (what ``--store``/``--max-memory`` do) before the store opens."""
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

    def keyspace(
        self,
        pattern: str,
        *,
        ttl: float | None = None,
        batch_size: int | None = None,
        batch_wait_ms: float | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        codec: str | None = None,
        error_ttl: float | None = None,
    ) -> Callable[[F], F]:
        """Decorator registering a sync or async function as the source of a keyspace's values.

        Glob patterns (``double:*``) pass the key; templates (``qa{<tag>}_<q>``) pass the fields as
        keyword arguments. With ``batch_size``, the function takes a list (keys, or named tuples of
        fields) and must return a list of the same length. ``error_ttl`` caches a failure for that
        many seconds so a broken input does not rerun an expensive model on every request.
        """

        def register(fn: F) -> F:
            self.add_keyspace(
                pattern,
                fn,
                ttl=ttl,
                batch_size=batch_size,
                batch_wait_ms=batch_wait_ms,
                timeout=timeout,
                codec=codec,
                error_ttl=error_ttl,
            )
            return fn

        return register

    def add_keyspace(self, pattern: str, handler: Callable[..., Any], **options: Any) -> Keyspace:
        """Non-decorator form of ``keyspace``."""
        ks = Keyspace(pattern, handler, **options)
        self.registry.add(ks)
        if ks.batch_size:
            self._batchers[pattern] = Batcher(
                functools.partial(self._run_batch, ks), max_size=ks.batch_size, max_wait=ks.batch_wait
            )
        return ks

    # --- lifecycle -------------------------------------------------------------------------------
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
                self._store = open_store(spec, max_memory=self._max_memory, eviction=self._eviction)
            if hasattr(self._store, "on_evict"):
                self._store.on_evict = self._evicted
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

    async def close(self, grace: float = 10.0) -> None:
        """Let running computations finish (up to ``grace`` s), then close the store."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for batcher in self._batchers.values():
            batcher.flush()
        if not await self._flights.wait_all(grace):
            log.warning("closing with computations still running after %.1fs; they are abandoned", grace)
            self._flights.cancel_all()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._store is not None:
            await self._store.close()

    async def __aenter__(self) -> Keymiss:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                await self.store.sweep()
            except Exception:  # a sweep failure must not end the sweeping
                log.exception("expiry sweep failed")

    # --- reads -------------------------------------------------------------------------------------
    async def get(self, key: str) -> Any:
        """The value for ``key``, computed on a miss; ``None`` for a missing key no keyspace owns."""
        # The hit path is inlined (not ``await self.get_item``): one coroutine less per hit.
        store = self._store or self.store
        item = store.get_now(key) if store.local else await store.get(key)
        if item is not None:
            self._count_hit(key)
        else:
            if not self._started and not self._closed:
                await self.start()
            item = await self._miss(key)
            if item is None:
                return None
        try:
            return self._decode(key, item)
        except CodecError as exc:
            self.decode_failures += 1
            log.warning("stored value of %r does not decode (%s); recomputing", key[:200], exc)
            item = await self._miss(key)
            return None if item is None else codecs.decode(item.value, item.codec)

    def _decode(self, key: str, item: Item) -> Any:
        if item.codec == 0 and not (self._store or self.store).local:
            # a shared store keeps the plain bytes clients see; the keyspace knows their codec
            ks = self.registry.route(key)
            codec = None if ks is None else (ks.codec or ks.learned_codec)
            if codec is not None:
                return codecs.decode(item.value, codec)
        return codecs.decode(item.value, item.codec)

    async def get_item(self, key: str) -> Item | None:
        """Like ``get`` but returns the stored bytes and codec tag (what the RESP server sends)."""
        store = self._store or self.store
        item = store.get_now(key) if store.local else await store.get(key)
        if item is not None:
            self._count_hit(key)
            return item
        if not self._started and not self._closed:
            await self.start()
        return await self._miss(key)

    def peek(self, key: str) -> Item | None:
        """Synchronous store lookup that counts a hit; the server's fast path for local stores.

        Returns ``None`` on a miss without computing anything; follow up with ``fill``.
        """
        item = (self._store or self.store).get_now(key)
        if item is not None:
            self._count_hit(key)
        return item

    def peek_cached(self, key: str) -> Item | None:
        """Synchronous lookup in a shared store's in-process tier (the near cache), if it has one;
        ``None`` means "ask the store", not "missing"."""
        getter = getattr(self._store or self.store, "get_cached", None)
        item = getter(key) if getter is not None else None
        if item is not None:
            self._count_hit(key)
        return item

    def _count_hit(self, key: str) -> None:
        self.hits += 1
        ks = self.registry.route(key)
        if ks is not None:
            ks.stats.hits += 1

    def peek_many(self, keys: Sequence[str]) -> list[Item | None] | None:
        """Items for ``keys`` if none needs computing (each is a hit or owned by no keyspace),
        counted as hits and misses; otherwise ``None`` and nothing counted (use ``get_many_items``)."""
        store = self._store or self.store
        items = [store.get_now(k) for k in keys]
        route = self.registry.route
        routes = [route(k) for k in keys]
        if any(i is None and ks is not None for i, ks in zip(items, routes, strict=True)):
            return None
        for key, item in zip(keys, items, strict=True):
            if item is None:
                self.misses += 1
            else:
                self._count_hit(key)
        return items

    def plain_miss(self, key: str) -> bool:
        """After a ``peek`` miss: True (and the miss counted) when no keyspace owns ``key``, so the
        answer is nil without any computation — the server then replies without a task."""
        if self.registry.route(key) is not None:
            return False
        self.misses += 1
        return True

    async def fill(self, key: str) -> Item | None:
        """The miss path on its own: compute (or join the computation of) ``key`` and store it."""
        if not self._started and not self._closed:
            await self.start()
        return await self._miss(key)

    async def get_many(self, keys: Sequence[str], *, return_exceptions: bool = False) -> list[Any]:
        """Values for ``keys`` in order: hits in one store round trip, misses computed concurrently."""
        items = await self.get_many_items(keys, return_exceptions=return_exceptions)
        out: list[Any] = []
        for key, item in zip(keys, items, strict=True):
            if item is None or isinstance(item, BaseException):
                out.append(item)
                continue
            try:
                out.append(self._decode(key, item))
            except CodecError as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    async def get_many_items(
        self, keys: Sequence[str], *, return_exceptions: bool = False
    ) -> list[Item | BaseException | None]:
        """``get_many`` returning stored items; failures are raised or, if asked, returned in place."""
        store = self._store or self.store
        found: list[Item | BaseException | None] = list(await store.get_many(keys))
        missing = [i for i, item in enumerate(found) if item is None]
        for key, item in zip(keys, found, strict=True):
            if item is not None:
                self._count_hit(key)
        if missing:
            if not self._started and not self._closed:
                await self.start()
            results = await asyncio.gather(*(self._miss(keys[i]) for i in missing), return_exceptions=True)
            for i, result in zip(missing, results, strict=True):
                if isinstance(result, BaseException) and not return_exceptions:
                    raise result
                found[i] = result
        return found

    async def _miss(self, key: str) -> Item | None:
        self.misses += 1
        ks = self.registry.route(key)
        if ks is None:
            return None
        ks.stats.misses += 1
        arg = ks.argument(key)  # raises KeyMismatchError before anything runs
        if self._errors:
            cached = self._errors.get(key)
            if cached is not None:
                if cached[1] > time.monotonic():
                    raise cached[0]
                del self._errors[key]
        fut = self._flights.get(key)
        if fut is None:
            if len(self._flights) >= self.max_in_flight:
                raise BusyError(f"too many computations in flight ({self.max_in_flight}); retry later")
            fut = self._flights.start(key, functools.partial(self._compute, ks, key, arg))
        else:
            ks.stats.coalesced += 1
        result: Item = await asyncio.shield(fut)
        return result

    # --- computation -------------------------------------------------------------------------------
    async def _compute(self, ks: Keyspace, key: str, arg: Any) -> Item:
        ks.stats.in_flight += 1
        try:
            if getattr(self.store, "distributed", False):
                return await self._compute_shared(ks, key, arg)
            return await self._compute_here(ks, key, arg)
        except Exception as exc:
            if ks.error_ttl:
                self._errors[key] = (exc, time.monotonic() + ks.error_ttl)
            raise
        finally:
            ks.stats.in_flight -= 1

    async def _compute_shared(self, ks: Keyspace, key: str, arg: Any) -> Item:
        """Cluster-wide single-flight: compute only while holding the key's lease in Redis; other
        nodes wait for the completion message (or the lease's expiry) and read the stored value."""
        store: Any = self.store
        await store.prepare_wait()
        budget = (ks.timeout or DEFAULT_TIMEOUT) + 2 * store.lease_ms / 1000
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            token = await store.acquire(key)
            if token is not None:
                renewer = asyncio.get_running_loop().create_task(self._renew(store, key, token))
                try:
                    # Another node may have stored the value and released its lease between our
                    # miss and our acquire: look again before computing it a second time.
                    item = await store.get(key)
                    if item is not None:
                        ks.stats.coalesced += 1
                        return item  # type: ignore[no-any-return]
                    return await self._compute_here(ks, key, arg)
                finally:
                    renewer.cancel()
                    await store.release(key, token)
            waiter = store.waiter(key)
            try:
                item = await store.get(key)
                if item is not None:
                    ks.stats.coalesced += 1
                    return item  # type: ignore[no-any-return]
                wait = await store.lease_pttl(key) / 1000
                if wait > 0:
                    await store.wait_for(waiter, min(wait + 0.05, max(0.0, deadline - time.monotonic())))
            finally:
                store.drop_waiter(key, waiter)
            item = await store.get(key)
            if item is not None:
                ks.stats.coalesced += 1
                return item  # type: ignore[no-any-return]
            # the holder failed or died: take the lease ourselves on the next round
        raise ComputeTimeoutError(
            f"keyspace {ks.pattern!r}: no node finished computing the key within {budget:.0f}s",
            keyspace=ks.pattern,
        )

    async def _renew(self, store: Any, key: str, token: str) -> None:
        """Keep a long computation's lease alive."""
        while True:
            await asyncio.sleep(store.lease_ms / 3000)
            try:
                if not await store.renew(key, token):
                    log.warning("lost the lease of %r while computing it", key[:200])
                    return
            except StoreError as exc:
                log.warning("could not renew the lease of %r: %s", key[:200], exc)

    async def _compute_here(self, ks: Keyspace, key: str, arg: Any) -> Item:
        if ks.batch_size:
            result = await self._batchers[ks.pattern].submit((key, arg))
        else:
            (result,) = await self._run_batch(ks, [(key, arg)])
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]

    async def _call(self, ks: Keyspace, arg: Any) -> Any:
        if ks.template is not None and not ks.batch_size:
            call = functools.partial(ks.handler, **arg._asdict())
        else:
            call = functools.partial(ks.handler, arg)
        if ks.is_async:
            return await asyncio.wait_for(call(), ks.timeout)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="keymiss-handler")
        fut = asyncio.get_running_loop().run_in_executor(self._executor, call)
        return await asyncio.wait_for(fut, ks.timeout)

    async def _run_batch(self, ks: Keyspace, entries: list[tuple[str, Any]]) -> list[Item | BaseException]:
        """Run the handler for ``entries``, then encode and commit every result in one store write."""
        n = len(entries)
        started = time.perf_counter()
        try:
            if ks.batch_size:
                values = await self._call(ks, [arg for _, arg in entries])
                if not isinstance(values, list | tuple) or len(values) != n:
                    is_seq = isinstance(values, list | tuple)
                    got = f"{len(values)} results" if is_seq else type(values).__name__
                    raise BatchResultError(
                        f"keyspace {ks.pattern!r}: batch handler returned {got} for {n} inputs",
                        keyspace=ks.pattern,
                    )
            else:
                values = [await self._call(ks, entries[0][1])]
        except TimeoutError as exc:
            ks.stats.timeouts += n
            raise ComputeTimeoutError(
                f"keyspace {ks.pattern!r}: handler did not finish within {ks.timeout}s", keyspace=ks.pattern
            ) from exc
        except KeymissError:
            ks.stats.errors += n
            raise
        except Exception as exc:
            ks.stats.errors += n
            raise HandlerError(
                f"keyspace {ks.pattern!r}: handler failed: {type(exc).__name__}: {exc}", keyspace=ks.pattern
            ) from exc
        elapsed = time.perf_counter() - started
        results: list[Item | BaseException] = []
        writes: list[Write] = []
        for (key, _), value in zip(entries, values, strict=True):
            if isinstance(value, KeymissError):  # a deliberate, already clear error: pass it on
                ks.stats.errors += 1
                results.append(value)
                continue
            if isinstance(value, BaseException):
                ks.stats.errors += 1
                err = HandlerError(
                    f"keyspace {ks.pattern!r}: handler failed for this key: {type(value).__name__}: {value}",
                    keyspace=ks.pattern,
                )
                err.__cause__ = value
                results.append(err)
                continue
            try:
                data, tag = codecs.encode(value, ks.codec)
            except CodecError as exc:
                ks.stats.errors += 1
                results.append(CodecError(f"keyspace {ks.pattern!r}: {exc}"))
                continue
            ks.learned_codec = tag
            writes.append(Write(key, data, tag, ks.ttl, cost=elapsed / n))
            results.append(Item(data, tag))
        ks.stats.observe(elapsed, len(writes))  # keys computed; failed ones count as errors
        if writes:
            try:
                stored = await self.store.set_many(writes)
            except StoreError:
                raise
            except Exception as exc:
                raise StoreError(f"keyspace {ks.pattern!r}: could not store computed values: {exc}") from exc
            ks.stats.not_stored += stored.count(False)
        return results

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
        return await self.store.set(key, data, codec=tag, ttl=ttl, nx=nx, xx=xx, keep_ttl=keep_ttl)

    async def delete(self, *keys: str) -> int:
        """Remove keys; returns how many existed."""
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
        return await self.store.expire(key, seconds)

    async def persist(self, key: str) -> bool:
        """Remove a key's expiry; False if the key does not exist or had none."""
        if await self.store.pttl(key) < 0:
            return False
        return await self.store.expire(key, None)

    async def forget(self, pattern: str) -> int:
        """Drop every cached value whose key matches a glob, e.g. after a model upgrade."""
        from .stores.base import LocalStore

        store = self.store
        if isinstance(store, LocalStore):
            keys = store.matching_keys(pattern)
        else:  # pragma: no cover - network stores walk with SCAN
            keys, cursor = [], 0
            while True:
                cursor, chunk = await store.scan(cursor, pattern, 1000)
                keys.extend(chunk)
                if cursor == 0:
                    break
        gone = set(keys)
        self._errors = {k: v for k, v in self._errors.items() if k not in gone}
        return await store.delete(keys) if keys else 0

    # --- introspection -----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Engine counters, per-keyspace counters and the store's own numbers."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "in_flight": len(self._flights),
            "decode_failures": self.decode_failures,
            "keyspaces": {ks.pattern: ks.describe() for ks in self.registry},
            "store": self.store.info(),
        }

    def keyspaces(self) -> list[Keyspace]:
        return list(self.registry)

    def __repr__(self) -> str:
        store = self._store.url if self._store is not None else self._store_spec
        return f"<Keymiss store={store!r} keyspaces={[ks.pattern for ks in self.registry]}>"
