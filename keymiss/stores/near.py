"""A near cache: a small in-process memory tier in front of a shared Redis store.

Hot hits are answered from process memory without crossing the network. Entries live at most
``ttl`` seconds, and every write or delete that goes through keymiss is announced on a pub/sub
channel so the other nodes drop their copies at once; the short TTL bounds how long a value written
to Redis behind keymiss's back can be served stale.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import RedisError

from ..errors import StoreError
from .base import Item, Store, Write
from .memory import MemoryStore
from .redis import RedisStore

log = logging.getLogger("keymiss.near")

INVALIDATE_CHANNEL = "keymiss:invalidate"


class NearCacheStore(Store):
    """``RedisStore`` plus a bytes-bounded, short-lived in-process copy of what was read."""

    local = False
    distributed = True

    def __init__(self, shared: RedisStore, *, max_bytes: int = 32 * 1024**2, ttl: float = 5.0) -> None:
        self.shared = shared
        self.near = MemoryStore(max_bytes, eviction="tinylfu")
        self.ttl = ttl
        self.url = f"{shared.url} (near cache {max_bytes // 1024**2}MB, {ttl:g}s)"
        self.lease_ms = shared.lease_ms
        self.near_hits = 0
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None

    def __getattr__(self, name: str) -> Any:  # leases, waiters, raw pass-through: the shared store's
        return getattr(self.shared, name)

    async def _listen(self) -> None:
        await self.shared._connect()
        client = self.shared.client
        if self.shared.cluster:  # a plain connection to one node hears the whole cluster's PUBLISH
            node = self.shared.client.get_default_node() or self.shared.client.get_primaries()[0]
            from redis.asyncio import Redis

            client = Redis(host=node.host, port=node.port, **self.shared._common)
        self._pubsub = client.pubsub()
        try:
            await self._pubsub.subscribe(INVALIDATE_CHANNEL)
            while True:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg and msg.get("type") == "message":
                    self.near.delete_now([msg["data"].decode("utf-8", "surrogateescape")])
        except (RedisError, OSError) as exc:
            log.warning("invalidation channel lost (%s): dropping the near cache", exc)
            await self.near.flush()

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _announce(self, keys: Iterable[str]) -> None:
        """Drop our own copies and tell the other nodes to drop theirs, all messages at once
        (a cluster pipeline refuses PUBLISH, so they go out concurrently instead)."""
        keys = list(keys)
        self.near.delete_now(keys)
        publish = self.shared.client.publish
        try:
            await asyncio.gather(
                *(
                    self.shared._call(publish, INVALIDATE_CHANNEL, k.encode("utf-8", "surrogateescape"))
                    for k in keys
                )
            )
        except StoreError as exc:  # the write itself succeeded; others fall back on the short TTL
            log.warning("could not announce %d changed key(s): %s", len(keys), exc)

    def get_cached(self, key: str) -> Item | None:
        """The near copy alone, synchronously: lets the server answer hot hits without a task."""
        item = self.near.get_now(key)
        if item is not None:
            self.near_hits += 1
        return item

    async def get(self, key: str) -> Item | None:
        self._ensure_listener()
        item = self.near.get_now(key)
        if item is not None:
            self.near_hits += 1
            return item
        item = await self.shared.get(key)
        if item is not None:
            self.near.set_now(key, item.value, ttl=self.ttl)
        return item

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        self._ensure_listener()
        out: list[Item | None] = [self.near.get_now(k) for k in keys]
        missing = [i for i, item in enumerate(out) if item is None]
        if missing:
            fetched = await self.shared.get_many([keys[i] for i in missing])
            for i, item in zip(missing, fetched, strict=True):
                out[i] = item
                if item is not None:
                    self.near.set_now(keys[i], item.value, ttl=self.ttl)
        return out

    async def set(self, key: str, value: bytes, **kwargs: Any) -> bool:
        ok = await self.shared.set(key, value, **kwargs)
        await self._announce([key])
        return ok

    async def set_many(self, writes: Sequence[Write]) -> list[bool]:
        ok = await self.shared.set_many(writes)
        await self._announce(w.key for w in writes)
        return ok

    async def delete(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        n = await self.shared.delete(keys)
        await self._announce(keys)
        return n

    async def exists(self, keys: Iterable[str]) -> int:
        return await self.shared.exists(keys)

    async def pttl(self, key: str) -> int:
        return await self.shared.pttl(key)

    async def expire(self, key: str, ttl: float | None) -> bool:
        ok = await self.shared.expire(key, ttl)
        await self._announce([key])
        return ok

    async def scan(self, cursor: int, match: str | None = None, count: int = 10) -> tuple[int, list[str]]:
        return await self.shared.scan(cursor, match, count)

    async def dbsize(self) -> int:
        return await self.shared.dbsize()

    async def flush(self) -> None:
        await self.shared.flush()
        await self.near.flush()

    async def sweep(self, limit: int = 1000) -> int:
        await self.near.sweep(limit)
        return await self.shared.sweep(limit)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        await self.near.close()
        await self.shared.close()

    def info(self) -> dict[str, Any]:
        near = self.near.info()
        return {
            **self.shared.info(),
            "store": self.url,
            "near_keys": near["keys"],
            "near_bytes": near["used_bytes"],
            "near_hits": self.near_hits,
        }
