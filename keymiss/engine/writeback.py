"""Write-back: the one fill of a missing key — compute it, store it, then answer every waiter.

The layer between the read path (``engine.Keymiss``) and the compute engine. A fill is single-flight
per key, so a value is written once however many readers missed it; on a shared store it runs under
the store's cross-node lease (``SharedStore.flight``), so it is computed once per cluster. Values
that finish together (one batch) leave in one ``set_many``: one transaction, one fsync for a
durable LMDB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable

from keymiss.engine.compute import Computed, ComputeEngine
from keymiss.engine.freshness import RefreshBackoff, outdated, refreshed_since, stored_ttl
from keymiss.engine.singleflight import SingleFlight
from keymiss.errors import ComputeTimeoutError, KeymissError, StoreError
from keymiss.keyspace import DEFAULT_TIMEOUT, Keyspace
from keymiss.stores import Item, LocalStore, SharedStore, Store, Write


class WriteBack:
    """Fills missing keys into a store with values from a ``ComputeEngine``."""

    def __init__(
        self, engine: ComputeEngine, store: Callable[[], Store], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.engine = engine
        self._store = store  # opened lazily by the owner
        self._fills = SingleFlight()
        #: keys a read or a fill is working on (a count each), and those of them a client wrote
        #: meanwhile: their fill must not store over the client's write
        self._watch: dict[str, int] = {}
        self._superseded: set[str] = set()
        #: keys a client's write is in flight on (a count each; ``_writing_all`` for a FLUSHDB):
        #: until it lands no fill may store over them, whether or not it turns out to change them
        self._writing: dict[str, int] = {}
        self._writing_all = 0
        #: computed values that finished while a client's write of their key was in flight: they
        #: wait for it to land, then go (or are superseded, if it changed the key)
        self._held: list[tuple[Write, asyncio.Future[bool | None]]] = []
        #: expiries (unix seconds; None: persist) a client gave keys being filled: the value
        #: computed keeps the client's, not its keyspace's (the read contract's ttl-during row)
        self._expiries: dict[str, float | None] = {}
        self._pending: list[tuple[Write, asyncio.Future[bool | None]]] = []
        self._writers: set[asyncio.Task[None]] = set()
        #: when a key whose refresh failed may be refreshed again
        self.backoff = RefreshBackoff(clock)

    def watch(self, key: str) -> None:
        """From now on, a client's write to ``key`` supersedes any fill of it until ``unwatch``."""
        self._watch[key] = self._watch.get(key, 0) + 1

    def unwatch(self, key: str, _: object = None) -> None:
        n = self._watch.get(key, 0) - 1
        if n > 0:
            self._watch[key] = n
        else:
            self._watch.pop(key, None)
            self._superseded.discard(key)
            self._expiries.pop(key, None)

    def begin(self, key: str, ks: Keyspace, hidden: Item | None = None) -> asyncio.Future[Item]:
        """Join or start the fill of ``key`` (owned by ``ks``), synchronously: it is watched from
        this moment, so a client's write that lands before its task first runs still wins.
        ``hidden``: the value of another version the read found, which a shared store drops (while
        it is still the one stored) so that the fill's only-if-absent write can land."""
        fut = self._fills.get(key)
        if fut is None:
            self.watch(key)
            fut = self._fills.start(key, functools.partial(self._compute_and_store, key, ks, hidden))
            fut.add_done_callback(functools.partial(self.unwatch, key))
        else:
            ks.stats.coalesced += 1
        return asyncio.shield(fut)

    def refresh(self, key: str, ks: Keyspace, *, stale: bool = False, seen: Item | None = None) -> None:
        """Recompute ``key`` in the background and store the value over the current one (an early
        refresh, or a stale value's): nothing if a fill of it is running already, or if its last
        refresh failed too recently (the wait doubles, 1 s to 60 s). Readers who find the key gone
        meanwhile join this computation; a client's write meanwhile still wins. ``seen``: the value
        the read found, so a node that gets the lease after another refreshed it computes nothing."""
        if self._fills.get(key) is not None or not self.backoff.allows(key):
            return
        if not stale:
            ks.stats.early_refreshes += 1
        self.watch(key)
        fut = self._fills.start(key, functools.partial(self._refresh, key, ks, seen))
        fut.add_done_callback(functools.partial(self.unwatch, key))
        fut.add_done_callback(functools.partial(self._refreshed, key, ks))

    async def _refresh(self, key: str, ks: Keyspace, seen: Item | None = None) -> Item:
        """Recompute and overwrite; on a shared store only while this node holds the key's lease,
        so one node of the cluster refreshes it — and only if no node refreshed it since ``seen``
        was read. While another holds it, this is a plain fill (readers who joined get the value
        the other node stores)."""
        store = self._store()
        if not isinstance(store, SharedStore):
            return await self._compute_here(key, ks, overwrite=True)
        async with store.lease(key) as held:
            if held:
                now = (await store.get_expiring([key]))[0] if seen is not None else None
                if seen is not None and now is not None and refreshed_since(seen, now, ks):
                    return now
                return await self._compute_here(key, ks, overwrite=True)
        return await self._compute_and_store(key, ks)

    def _refreshed(self, key: str, ks: Keyspace, fut: asyncio.Future[Item]) -> None:
        if fut.cancelled() or fut.exception() is None:  # the failure itself was logged where it ran
            self.backoff.succeeded(key)
            return
        ks.stats.refresh_failures += 1
        self.backoff.failed(key)

    async def fill(self, key: str, ks: Keyspace, hidden: Item | None = None) -> Item:
        """``begin``, then the item once it is stored."""
        return await self.begin(key, ks, hidden)

    def supersede(self, keys: Iterable[str] | None = None) -> None:
        """A client is writing (or deleting) ``keys`` — every key when ``None`` (FLUSHDB): a fill
        that started before must not store over what the client was told is there."""
        if not self._watch:
            return
        if keys is None:
            self._superseded |= self._watch.keys()
            return
        for key in keys:
            if key in self._watch:
                self._superseded.add(key)

    def writing(self, keys: Iterable[str] | None) -> None:
        """A client's write of ``keys`` (all: ``None``) has been accepted and not landed yet: no
        fill stores over them until ``landed``. Whether it supersedes the fill is decided when it
        lands (``supersede``, by the store or the relay, only if it changed a key)."""
        if keys is None:
            self._writing_all += 1
            return
        for key in keys:
            self._writing[key] = self._writing.get(key, 0) + 1

    def landed(self, keys: Iterable[str] | None) -> None:
        """The write ``writing`` announced has landed (or failed)."""
        if keys is None:
            self._writing_all -= 1
            return
        for key in keys:
            n = self._writing.get(key, 0) - 1
            if n > 0:
                self._writing[key] = n
            else:
                self._writing.pop(key, None)
        if self._held:
            free = [(w, f) for w, f in self._held if not self._is_held(w.key)]
            if free:
                self._held = [(w, f) for w, f in self._held if self._is_held(w.key)]
                self._queue(free)

    def _is_held(self, key: str) -> bool:
        return bool(self._writing_all) or key in self._writing

    def expiry_set(self, key: str, expires_at: float | None) -> None:
        """A client changed the expiry of ``key`` (unix seconds; ``None``: PERSIST): a fill of it
        running now stores its value with that expiry, as the client was told the key has."""
        if key in self._watch:
            self._expiries[key] = expires_at

    def supersede_matching(self, matches: Callable[[str], bool]) -> None:
        """``supersede`` every key being filled that ``matches`` (KEYMISS FORGET of a glob)."""
        self._superseded |= {k for k in self._watch if matches(k)}

    async def replace(self, key: str, ks: Keyspace) -> Item:
        """Compute ``key`` and overwrite what is stored, whatever it is: for a stored value that
        cannot be decoded (a shared store's lease would hand the bad value straight back)."""
        self.watch(key)
        try:
            return await self._compute_here(key, ks, overwrite=True)
        finally:
            self.unwatch(key)

    async def wait_all(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for running fills; True if all ended."""
        return await self._fills.wait_all(grace)

    def cancel_all(self) -> None:
        self._fills.cancel_all()

    async def _compute_and_store(self, key: str, ks: Keyspace, hidden: Item | None = None) -> Item:
        store = self._store()
        if not isinstance(store, SharedStore):
            return await self._compute_here(key, ks)  # an NX write replaces another version's value
        computed_here = False

        async def compute() -> Item:
            nonlocal computed_here
            computed_here = True
            return await self._compute_here(key, ks)

        for _ in range(2):
            if hidden is not None:
                await store.discard_unchanged({key: hidden})
            try:
                item = await store.flight(key, compute, ks.timeout or DEFAULT_TIMEOUT)
            except ComputeTimeoutError as exc:
                raise ComputeTimeoutError(f"keyspace {ks.pattern!r}: {exc}", keyspace=ks.pattern) from None
            if computed_here or not outdated(ks, item):
                break
            # what the lease's holder found stored is of another version (dropped meanwhile
            # elsewhere, or never): not another node's result, so drop it and fill once more
            hidden = item
        else:
            return await self._compute_here(key, ks, overwrite=True)
        if not computed_here:
            ks.stats.coalesced += 1  # another node computed it
        return item

    async def _compute_here(self, key: str, ks: Keyspace, *, overwrite: bool = False) -> Item:
        computed = await self.engine.compute_one(key, ks)
        assert computed is not None  # ks owns key
        if ks.version is not None and computed.version != ks.version_tag():
            # the version changed while it computed: its value is one no reader may be given
            computed = await self.engine.compute_one(key, ks)
            assert computed is not None
            if computed.version != ks.version_tag():
                raise KeymissError(
                    f"keyspace {ks.pattern!r}: its version changed twice during one computation; retry"
                )
        # Written only if still absent: a client's write on any node (which this node's watch
        # cannot see) wins over the computed value. ``overwrite`` replaces an undecodable value.
        stored = await self._put(computed, ks, nx=not overwrite)
        if stored is False and await self._present(key):
            stored = None  # refused by NX: someone wrote the key meanwhile
        if stored is None:
            ks.stats.superseded += 1
        elif not stored:
            ks.stats.not_stored += 1
        # the waiters asked before the client's write: the computed value is still their answer
        return computed.item()

    async def _present(self, key: str) -> bool:
        store = self._store()
        if isinstance(store, LocalStore):
            return store.get_now(key) is not None
        return bool(await store.exists([key]))

    async def _put(self, computed: Computed, ks: Keyspace, *, nx: bool) -> bool | None:
        """Queue one value for the next ``set_many``; True if the store kept it, False if it
        declined it, ``None`` if a client's write superseded it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool | None] = loop.create_future()
        write = computed.write(nx=nx)
        if ks.stale:  # kept past its TTL for the stale window: served as stale, refreshing
            write = dataclasses.replace(write, ttl=stored_ttl(ks, write.ttl))
        self._queue([(write, fut)])
        return await fut

    def _queue(self, items: list[tuple[Write, asyncio.Future[bool | None]]]) -> None:
        first = not self._pending
        self._pending.extend(items)
        if first:  # the flush runs after this loop turn's other puts
            task = asyncio.get_running_loop().create_task(self._flush())
            self._writers.add(task)
            task.add_done_callback(self._writers.discard)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if self._writing or self._writing_all:  # a client's write in flight: wait for it to land
            self._held.extend((w, f) for w, f in batch if self._is_held(w.key))
            batch = [(w, f) for w, f in batch if not self._is_held(w.key)]
        if self._superseded:  # checked at the last moment before the write leaves
            for w, fut in batch:
                if w.key in self._superseded and not fut.done():
                    fut.set_result(None)
            batch = [(w, fut) for w, fut in batch if not fut.done()]
        if self._expiries:  # a client's TTL change meanwhile: the value keeps it
            now = time.time()
            batch = [
                (
                    w
                    if w.key not in self._expiries
                    else dataclasses.replace(w, ttl=self._ttl_of(w.key, now)),
                    fut,
                )
                for w, fut in batch
            ]
        if batch:
            await self._write(batch)

    def _ttl_of(self, key: str, now: float) -> float | None:
        expires_at = self._expiries[key]
        return None if expires_at is None else max(expires_at - now, 0.001)

    async def _write(self, batch: list[tuple[Write, asyncio.Future[bool | None]]]) -> None:
        try:
            stored = await self._store().set_many([w for w, _ in batch])
        except Exception as exc:
            if len(batch) > 1:  # one bad write must not fail the values that finished beside it
                for one in batch:
                    await self._write([one])
                return
            if isinstance(exc, KeymissError):  # StoreError, or the store's own reply (OOM)
                err = exc
            else:
                err = StoreError(f"could not store computed values: {exc}")
                err.__cause__ = exc
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (_, fut), ok in zip(batch, stored, strict=True):
            if not fut.done():
                fut.set_result(ok)
