"""A near cache: a small in-process memory tier in front of a shared Redis store.

Hot hits are answered from process memory without crossing the network. Entries live at most
``ttl`` seconds, and every write or delete that goes through keymiss is announced on a pub/sub
channel so the other nodes drop their copies at once; the short TTL bounds how long a value written
to Redis behind keymiss's back can be served stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import RedisError

from keymiss.errors import StoreError
from keymiss.stores.base import Item, SharedStore, StoreInfo, Write
from keymiss.stores.memory import MemoryStore
from keymiss.stores.redis import RedisStore

log = logging.getLogger("keymiss.near")

INVALIDATE_CHANNEL = "keymiss:invalidate"
#: The message on the invalidation channel that drops every near copy (FLUSHDB on some node).
FLUSH_ALL = b"\x00flush"
#: Arguments of a pass-through write announced one by one; beyond, every node drops its copies.
MAX_ANNOUNCED = 1024
#: Pass-through commands that change nothing, so need no invalidation.
_READ_ONLY = frozenset(
    b"hget hgetall hmget hlen hexists hkeys hvals hstrlen hscan lrange llen lindex lpos scard smembers "
    b"sismember smismember srandmember sscan zrange zrangebyscore zrevrange zscore zcard zcount zrank "
    b"zrevrank zscan xrange xrevrange xlen xread xinfo strlen getrange bitcount bitpos getbit pfcount "
    b"geopos geodist georadius_ro geosearch object memory dump exists type ttl pttl expiretime "
    b"pexpiretime keys randomkey dbsize time lastsave info ping echo wait command".split()
)


class NearCacheStore(SharedStore):
    """A ``RedisStore`` plus a bytes-bounded, short-lived in-process copy of what was read.

    Every capability is delegated explicitly: leases (``flight``) and pass-through (``raw``) are the
    shared store's; reads look at the near copy first; writes go to Redis, then invalidate.
    """

    def __init__(self, shared: RedisStore, *, max_bytes: int = 32 * 1024**2, ttl: float = 5.0) -> None:
        self.shared = shared
        self.near = MemoryStore(max_bytes, eviction="worth")
        self.ttl = ttl
        self.url = f"{shared.url} (near cache {max_bytes // 1024**2}MB, {ttl:g}s)"
        self.near_hits = 0
        self._listener: asyncio.Task[None] | None = None
        self._pubsub: Any = None  # the listener's subscription, which close() ends
        self._closing = False

    async def flight(self, key: str, compute: Callable[[], Awaitable[Item]], compute_seconds: float) -> Item:
        return await self.shared.flight(key, compute, compute_seconds)

    def lease(self, key: str) -> contextlib.AbstractAsyncContextManager[bool]:
        return self.shared.lease(key)

    async def get_expiring(self, keys: Sequence[str], *, strict: bool = False) -> list[Item | None]:
        return await self.shared.get_expiring(keys, strict=strict)

    async def raw(self, args: Sequence[bytes], proto: int = 2) -> Any:
        try:
            return await self.shared.raw(args, proto)
        finally:  # whatever the command changed, no node may keep serving an old copy of it
            if args and args[0].lower() not in _READ_ONLY:
                if len(args) > 1 + MAX_ANNOUNCED:  # too many names to announce one by one
                    await self.near.flush()
                    with contextlib.suppress(StoreError):
                        await self.shared.publish(INVALIDATE_CHANNEL, [FLUSH_ALL])
                else:
                    await self._announce(a.decode("utf-8", "surrogateescape") for a in args[1:])

    async def transaction(self, commands: Sequence[Sequence[bytes]], proto: int = 2) -> list[Any] | None:
        try:
            return await self.shared.transaction(commands, proto)
        finally:  # whatever it changed, no node may keep serving an old copy of it
            written = [a.decode("utf-8", "surrogateescape") for c in commands for a in c[1:]]
            if len(written) > MAX_ANNOUNCED:
                await self.near.flush()
                with contextlib.suppress(StoreError):
                    await self.shared.publish(INVALIDATE_CHANNEL, [FLUSH_ALL])
            elif written:
                await self._announce(written)

    async def get_strict(self, key: str) -> Item | None:
        item = self.near.get_now(key)
        if item is not None:
            return item
        (item,) = await self.shared.get_expiring([key], strict=True)
        if item is not None:
            self._keep(key, item)
        return item

    async def _listen(self) -> None:
        try:
            await self.shared.connect()
            pubsub = self.shared.subscriber()
        except StoreError as exc:
            log.warning("invalidation channel unavailable (%s): dropping the near cache", exc)
            await self.near.flush()
            return
        self._pubsub = pubsub
        try:
            await pubsub.subscribe(INVALIDATE_CHANNEL)
            while not self._closing:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg and msg.get("type") == "message":
                    if msg["data"] == FLUSH_ALL:
                        await self.near.flush()
                    else:
                        self.near.delete_now([msg["data"].decode("utf-8", "surrogateescape")])
        except (RedisError, OSError) as exc:
            if not self._closing:
                log.warning("invalidation channel lost (%s): dropping the near cache", exc)
            await self.near.flush()
        finally:
            self._pubsub = None
            # bounded: a pubsub whose connection is half gone must not keep a cancelled task (and
            # with it the event loop's shutdown) waiting for ever
            with contextlib.suppress(RedisError, OSError, AttributeError, TimeoutError):
                await asyncio.wait_for(pubsub.aclose(), 2.0)

    def _ensure_listener(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _announce(self, keys: Iterable[str]) -> None:
        """Drop our own copies and tell the other nodes to drop theirs, all messages at once."""
        keys = list(keys)
        self.near.delete_now(keys)
        try:
            await self.shared.publish(
                INVALIDATE_CHANNEL, [k.encode("utf-8", "surrogateescape") for k in keys]
            )
        except StoreError as exc:  # the write itself succeeded; others fall back on the short TTL
            log.warning("could not announce %d changed key(s): %s", len(keys), exc)

    def get_cached(self, key: str) -> Item | None:
        """The near copy alone, synchronously: lets the server answer hot hits without a task. Its
        ``expires_at`` is the copy's own (at most ``ttl`` away), not the value's: freshness that
        reads a value's expiry is decided on ``get_expiring``."""
        item = self.near.get_now(key)
        if item is not None:
            self.near_hits += 1
        return item

    async def get(self, key: str) -> Item | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        self._ensure_listener()
        out: list[Item | None] = [self.near.get_now(k) for k in keys]
        missing = [i for i, item in enumerate(out) if item is None]
        self.near_hits += len(keys) - len(missing)
        if missing:
            fetched = await self.shared.get_expiring([keys[i] for i in missing])
            for i, item in zip(missing, fetched, strict=True):
                out[i] = item
                if item is not None:
                    self._keep(keys[i], item)
        return out

    def _keep(self, key: str, item: Item) -> None:
        """Hold a copy for at most ``ttl`` seconds, and never past the value's own expiry. The copy
        keeps the value's version tag: without it, a value computed under a replaced version would
        read as a client's write, served under every version."""
        ttl = self.ttl
        if item.expires_at is not None:
            ttl = min(ttl, item.expires_at - time.time())
        if ttl > 0:
            self.near.set_now(key, item.value, codec=item.codec, ttl=ttl, version=item.version)

    async def discard_unchanged(self, items: dict[str, Item]) -> None:
        """The shared store's, then every node's copies go: a value hidden for its version must
        not come back from a near copy once its replacement is being computed."""
        try:
            await self.shared.discard_unchanged(items)
        finally:
            await self._announce(items)

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

    async def expire_at_ms(self, key: str, when_ms: int) -> bool:
        ok = await self.shared.expire_at_ms(key, when_ms)
        await self._announce([key])
        return ok

    async def scan(
        self, cursor: int, match: str | None = None, count: int = 10, kind: str | None = None
    ) -> tuple[int, list[str]]:
        return await self.shared.scan(cursor, match, count, kind)

    async def dbsize(self) -> int:
        return await self.shared.dbsize()

    async def flush(self) -> None:
        await self.shared.flush()
        await self.near.flush()
        try:
            await self.shared.publish(INVALIDATE_CHANNEL, [FLUSH_ALL])
        except StoreError as exc:
            log.warning("could not announce a flush: %s", exc)

    async def sweep(self, limit: int = 1000) -> int:
        await self.near.sweep(limit)
        return await self.shared.sweep(limit)

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            # redis-py's get_message can swallow a cancellation and wait out its timeout: closing
            # its connection ends the wait at once. The listener closes its pubsub before the
            # shared client's pool goes away.
            if self._pubsub is not None:
                with contextlib.suppress(RedisError, OSError, AttributeError):
                    await self._pubsub.connection.disconnect()
            await asyncio.wait({self._listener}, timeout=3.0)
            self._listener = None
        await self.near.close()
        await self.shared.close()

    def info(self) -> StoreInfo:
        near = self.near.info()
        info = dataclasses.replace(self.shared.info(), store=self.url)
        info.extra = {
            **info.extra,
            "near_keys": near.keys,
            "near_bytes": near.used_bytes,
            "near_hits": self.near_hits,
        }
        return info
