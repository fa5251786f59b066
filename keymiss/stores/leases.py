"""Cluster-wide single-flight over Redis: a lease per key being computed, and completion messages.

The node that misses takes ``keymiss:lease:<key>`` with ``SET NX PX`` (the key's hash tag keeps the
lease in the value's slot), renews it while the computation runs, looks for the value once more,
computes, releases the lease only if it is still its own, and announces completion on
``keymiss:done``. Other nodes wait for that message — not polling — or for the lease to expire if
its holder died, then read the value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from keymiss.errors import ComputeTimeoutError, StoreError
from keymiss.stores.base import PTTL_MISSING, Item

log = logging.getLogger("keymiss.redis")

DONE_CHANNEL = "keymiss:done"
LEASE_PREFIX = "keymiss:lease:"

# Release or renew a lease only while it is still ours (compare the token first).
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end
"""
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end
"""


def _k(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


class LeaseHost(Protocol):
    """What the lease protocol needs of the Redis store it serves (``RedisStore``), and no more."""

    lease_ms: int
    client: Any

    async def get(self, key: str) -> Item | None: ...
    async def get_strict(self, key: str) -> Item | None: ...
    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any: ...
    async def connect(self) -> None: ...
    def subscriber(self) -> Any: ...


class Leases:
    """The lease protocol of one ``RedisStore``: one completion listener, waiters per key."""

    def __init__(self, store: LeaseHost) -> None:
        self.store = store
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._listener_lock = asyncio.Lock()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await self._close_pubsub()

    async def _close_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError, AttributeError, RuntimeError):
                await self._pubsub.aclose()  # disconnects its connection
            self._pubsub = None

    async def flight(self, key: str, compute: Callable[[], Awaitable[Item]], compute_seconds: float) -> Item:
        """Compute only while holding the key's lease in Redis (``SET NX PX``, renewed while the
        computation runs); other nodes wait for the completion message — or the lease's expiry, if
        the holder died — and read the stored value."""
        await self._ensure_listener()
        budget = compute_seconds + 2 * self.store.lease_ms / 1000
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            token = await self._acquire(key)
            if token is not None:
                renewer = asyncio.get_running_loop().create_task(self._renew(key, token))
                try:
                    # Another node may have stored the value and released its lease between our
                    # miss and our acquire: look again before computing it a second time.
                    # GET, not MGET: a key of another type (a hash) is WRONGTYPE, never overwritten
                    item = await self.store.get_strict(key)
                    return item if item is not None else await compute()
                finally:
                    renewer.cancel()
                    await self._release(key, token)
            waiter = self._waiter(key)
            try:
                item = await self.store.get(key)
                if item is not None:
                    return item
                wait = await self._lease_pttl(key) / 1000
                if wait > 0:
                    remaining = max(0.0, deadline - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(waiter), min(wait + 0.05, remaining))
            finally:
                self._drop_waiter(key, waiter)
            item = await self.store.get(key)
            if item is not None:
                return item
            # the holder failed or died: take the lease ourselves on the next round
        raise ComputeTimeoutError(f"no node finished computing the key within {budget:.0f}s")

    @contextlib.asynccontextmanager
    async def holding(self, key: str) -> AsyncIterator[bool]:
        """Hold ``key``'s lease for the block if no node holds it (True), else hold nothing (False):
        a background refresh of a value that is still served runs on one node of the cluster."""
        await self._ensure_listener()
        token = await self._acquire(key)
        if token is None:
            yield False
            return
        renewer = asyncio.get_running_loop().create_task(self._renew(key, token))
        try:
            yield True
        finally:
            renewer.cancel()
            await self._release(key, token)

    async def _renew(self, key: str, token: str) -> None:
        """Keep a long computation's lease alive."""
        while True:
            await asyncio.sleep(self.store.lease_ms / 3000)
            try:
                if not await self.store.call(
                    self.store.client.eval, _RENEW, 1, _k(LEASE_PREFIX + key), token, self.store.lease_ms
                ):
                    log.warning("lost the lease of %r while computing it", key[:200])
                    return
            except StoreError as exc:
                log.warning("could not renew the lease of %r: %s", key[:200], exc)

    async def _acquire(self, key: str) -> str | None:
        """Take the computation lease for ``key``: a token if we hold it, ``None`` if another node does."""
        token = uuid.uuid4().hex
        ok = await self.store.call(
            self.store.client.set, _k(LEASE_PREFIX + key), token, nx=True, px=self.store.lease_ms
        )
        return token if ok else None

    async def _release(self, key: str, token: str) -> None:
        try:
            await self.store.call(self.store.client.eval, _RELEASE, 1, _k(LEASE_PREFIX + key), token)
        finally:
            await self.store.call(
                self.store.client.publish, DONE_CHANNEL, key.encode("utf-8", "surrogateescape")
            )

    async def _lease_pttl(self, key: str) -> int:
        ms = int(await self.store.call(self.store.client.pttl, _k(LEASE_PREFIX + key)))
        return ms if ms != PTTL_MISSING else 0

    async def _ensure_listener(self) -> None:
        # One listener however many first misses arrive together: without the lock, a cold burst
        # opened one SUBSCRIBE connection per miss and exhausted the pool.
        if self._listener is not None and not self._listener.done():
            return
        async with self._listener_lock:
            if self._listener is not None and not self._listener.done():
                return
            await self.store.connect()
            await self._close_pubsub()
            self._pubsub = self.store.subscriber()
            await self.store.call(self._pubsub.subscribe, DONE_CHANNEL)
            self._listener = asyncio.get_running_loop().create_task(self._listen(self._pubsub))

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("completion channel lost (%s); waiters fall back to lease expiry", exc)
                for futures in self._waiters.values():
                    for fut in futures:
                        if not fut.done():
                            fut.set_result(None)
                self._waiters.clear()
                return
            if message is None or message.get("type") != "message":
                continue
            key = message["data"].decode("utf-8", "surrogateescape")
            for fut in self._waiters.pop(key, []):
                if not fut.done():
                    fut.set_result(None)

    def _waiter(self, key: str) -> asyncio.Future[None]:
        """A future set when some node announces it finished ``key``; registered *before* checking
        for the value, so an announcement in between is not missed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(fut)
        return fut

    def _drop_waiter(self, key: str, fut: asyncio.Future[None]) -> None:
        futures = self._waiters.get(key)
        if futures and fut in futures:
            futures.remove(fut)
            if not futures:
                del self._waiters[key]
