"""Redis and Redis Cluster as the shared store of several keymiss nodes.

Values live under the very key a client asked for, as the bytes a client sees, with TTL as ``PX``:
any Redis client can read cached answers straight from Redis. keymiss's own keys (leases, contexts,
fingerprints) start with ``keymiss:`` and contain the value key's ``{hash tag}``, so a context, its
answers and their leases share one slot.

A Redis that cannot be reached surfaces as ``StoreError`` quickly (a short connect timeout); redis-py
reconnects on the next command. A command, once sent, is never sent again: a Redis that is slow
(a long script, a big SORT ahead in its queue) still runs the first copy, so a resent INCR would
count twice. A reply is waited for up to ``reply_timeout`` seconds, then the command fails as BUSY
(it may or may not have been applied) and its connection is closed, never reused for another
command (the late reply would be read as that command's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from keymiss.errors import ConfigError, KeymissError, StoreError
from keymiss.stores.base import Item, SharedStore, StoreInfo, Write
from keymiss.stores.leases import Leases
from keymiss.stores.redisgate import (
    DEFAULT_CONNECTIONS,
    DEFAULT_REPLY_TIMEOUT,
    DEFAULT_WAIT,
    StoreGate,
    blocking_client,
)
from keymiss.stores.redisrecord import (
    DEL_IF_SHA,
    DROP_IF,
    NO_MAINT,
    TAGS,
    RelayParser,
    item_of,
    key_bytes,
    legacy_key,
    px_of,
    relay_error,
    reply_error,
    sum_nodes,
    tag_key,
    tag_value,
    tagged,
    wrap_error,
)

# A typed value, then its record: SET key value [PX ms] [NX]; where it was written, SET companion
# record [PX ms]. One script, so that the two are one write to readers and to the keymiss module
# (which keeps the record of a value whose companion is written right after it).
WRITE_WITH_TAG = (
    "local px, nx = ARGV[3], ARGV[4] == '1' "
    "local value = {'set', KEYS[1], ARGV[1]} "
    "local tag = {'set', KEYS[2], ARGV[2]} "
    "if px ~= '' then table.insert(value, 'px') table.insert(value, px) "
    "table.insert(tag, 'px') table.insert(tag, px) end "
    "if nx then table.insert(value, 'nx') end "
    "if not redis.call(unpack(value)) then return 0 end "
    "redis.call(unpack(tag)) return 1"
)

log = logging.getLogger("keymiss.redis")


class RedisStore(SharedStore):
    """A ``SharedStore`` over redis-py's asyncio client (standalone) or cluster client.

    A value's record (codec, CRC32, version) lives beside it in its companion key
    ``keymiss:v:{<slot tag>}<key>`` (same TTL, same slot; written first, then the value), for values
    that are not plain bytes or that have a version, in the format the module's workers write: so
    the value a client GETs stays exactly the bytes the codec wrote, ``Keymiss.get`` returns the
    type the handler returned, and a value a worker filled reads typed and version-checked here.
    An earlier release's ``keymiss:codec:<key>`` tag is read where a value has no companion, and
    removed by the next write of the value.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        reply_timeout: float = DEFAULT_REPLY_TIMEOUT,
        lease_ms: int = 30_000,
        max_concurrency: int = DEFAULT_CONNECTIONS,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        self.cluster = scheme in ("redis+cluster", "rediss+cluster")
        self.lease_ms = lease_ms
        clean = urlunsplit((scheme.replace("+cluster", ""), parts.netloc, parts.path, "", ""))
        self.url = url if not parts.password else url.replace(parts.password, "***")
        self.reply_timeout = reply_timeout
        # No retry of a command: one that timed out or lost its connection after it was written
        # may have run. A pooled connection Redis closed while idle is found (and replaced) by the
        # pool before a command is written on it.
        common: dict[str, Any] = {
            "socket_timeout": reply_timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), retries=0),
            "decode_responses": False,
        }
        self._common = common
        self._clean_url = clean
        self._raw_clients: dict[int, Any] = {}
        self._ready = False
        self._init_lock = asyncio.Lock()
        self._gets: list[tuple[str, asyncio.Future[Item | None]]] = []
        self._gets_scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Commands queue for one of ``max_concurrency`` places instead of failing when every
        # connection is busy (see ``redisgate``); on a cluster it also keeps redis-py's client from
        # bursts of connections it mishandles while it opens them ("handler is closed").
        self._gate = StoreGate(max_concurrency, wait)
        try:
            if self.cluster:
                self.client: Any = RedisCluster.from_url(clean, **common)
            else:
                self.client = blocking_client(clean, self._gate, health_check_interval=10, **common)
        except (ValueError, RedisError) as exc:
            raise ConfigError(f"bad redis store URL {self.url!r}: {exc}") from exc
        self.leases = Leases(self)
        self._info = StoreInfo(store=self.url, eviction_policy="redis")

    async def _connect(self) -> None:
        """Discover the cluster's slots once, before any traffic: redis-py initialises lazily, and a
        burst of first commands initialising concurrently closes connections under each other."""
        async with self._init_lock:
            if not self._ready:
                if self.cluster:
                    await self.client.initialize()
                self._ready = True

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """Run one redis-py coroutine function. Redis's own error replies (WRONGTYPE, OOM) come out
        as ``ReplyError`` with their code; every other failure as ``StoreError``."""
        if not self._ready:
            try:
                await self._connect()
            except (RedisError, OSError) as exc:
                raise wrap_error(exc, self.reply_timeout) from exc
        try:
            async with self._gate.held():
                return await fn(*args, **kwargs)
        except ResponseError as exc:
            raise reply_error(exc) from None
        except RedisError as exc:
            raise wrap_error(exc, self.reply_timeout) from exc
        except (OSError, RuntimeError) as exc:  # RuntimeError: a transport closed under a command
            raise wrap_error(exc, self.reply_timeout) from exc

    # --- values ---------------------------------------------------------------------------------------
    async def get(self, key: str) -> Item | None:
        """Single GETs issued in the same event-loop turn (many clients, pipelines) leave as one MGET:
        redis-py costs tens of microseconds per command, so one round trip for all of them."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Item | None] = loop.create_future()
        self._gets.append((key, fut))
        if not self._gets_scheduled:
            self._gets_scheduled = True
            loop.call_soon(self._flush_gets)
        return await fut

    def _flush_gets(self) -> None:
        batch, self._gets = self._gets, []
        self._gets_scheduled = False
        task = asyncio.get_running_loop().create_task(self._fetch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mget(self, keys: Sequence[str]) -> list[Item | None]:
        """Values, their companions and earlier releases' tags in one round trip."""
        raw: list[bytes] = []
        for k in keys:
            raw += (key_bytes(k), tag_key(k), legacy_key(k))
        fn = self.client.mget_nonatomic if self.cluster else self.client.mget
        values = await self.call(fn, raw)
        return [item_of(*values[i : i + 3]) for i in range(0, len(values), 3)]

    async def _fetch(self, batch: list[tuple[str, asyncio.Future[Item | None]]]) -> None:
        keys = list(dict.fromkeys(k for k, _ in batch))
        try:
            items = await self._mget(keys)
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        found = dict(zip(keys, items, strict=True))
        for key, fut in batch:
            if not fut.done():
                fut.set_result(found[key])

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        if not keys:
            return []
        return await self._mget(keys)

    async def get_expiring(self, keys: Sequence[str], *, strict: bool = False) -> list[Item | None]:
        """Values with their records and their expiry times (``expires_at``), in one round trip:
        what a copy held elsewhere (the near cache) needs so that it never outlives the value. A key
        holding another type reads as missing, as in MGET, or with ``strict`` raises WRONGTYPE."""
        if not keys:
            return []
        pipe = self.client.pipeline(transaction=False)
        for k in keys:
            pipe.get(key_bytes(k))
            pipe.get(tag_key(k))
            pipe.get(legacy_key(k))
            pipe.pttl(key_bytes(k))
        replies = await self.call(pipe.execute, raise_on_error=False)
        now = time.time()
        out: list[Item | None] = []
        for i in range(0, len(replies), 4):
            value, tag, legacy, pttl = replies[i : i + 4]
            if isinstance(value, ResponseError):
                if strict:
                    raise reply_error(value)
                value = None
            if any(isinstance(r, Exception) for r in (tag, legacy, pttl)):
                tag, legacy, pttl = None, None, -1
            item = item_of(value, tag, legacy)
            if item is not None and int(pttl) >= 0:
                item.expires_at = now + int(pttl) / 1000
            out.append(item)
        return out

    def lease(self, key: str) -> contextlib.AbstractAsyncContextManager[bool]:
        return self.leases.holding(key)

    async def get_strict(self, key: str) -> Item | None:
        """One key with a plain GET: WRONGTYPE for a key of another type (MGET would say nil)."""
        return (await self.get_expiring([key], strict=True))[0]

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
        px = px_of(ttl)
        if not (xx or keep_ttl):
            return (await self.set_many([Write(key, value, codec, ttl, nx=nx)]))[0]
        ok = await self.call(
            self.client.set, key_bytes(key), value, px=px, nx=nx, xx=xx, keepttl=keep_ttl and px is None
        )
        if ok:  # a write only-if-present: the record follows once the value is known to be ours
            if codec:
                await self.call(
                    self.client.set, tag_key(key), tag_value(codec, value), px=px, keepttl=px is None
                )
            else:
                await self.call(self.client.delete, tag_key(key))
            await self.call(self.client.delete, legacy_key(key))
        return bool(ok)

    async def set_many(self, writes: Sequence[Write]) -> list[bool]:
        """A typed value and then its companion in one script (WRITE_WITH_TAG): a reader never sees
        the value without its record, and a server with the keymiss module sees the companion's
        write right after the value's, so it keeps this record instead of marking the value a
        client's. A write only-if-absent that loses writes neither. A plain value is a plain SET,
        and the record an earlier value left goes."""
        if not writes:
            return []
        pipe = self.client.pipeline(transaction=False)
        extra: list[int] = []  # the DELs after each write: an old record and an earlier tag go
        for w in writes:
            if tagged(w):
                px = px_of(w.ttl)
                tag = tag_value(w.codec, w.value, w.version)
                nx = b"1" if w.nx else b""
                pipe.eval(WRITE_WITH_TAG, 2, key_bytes(w.key), tag_key(w.key), w.value, tag, px or b"", nx)
            else:
                pipe.set(key_bytes(w.key), w.value, px=px_of(w.ttl), nx=w.nx)
            drop = [] if w.nx else [legacy_key(w.key)] if tagged(w) else [tag_key(w.key), legacy_key(w.key)]
            for k in drop:  # one key each: on a cluster the two live in different slots
                pipe.delete(k)
            extra.append(len(drop))
        replies = iter(await self.call(pipe.execute, raise_on_error=False))
        results: list[Any] = []
        for n in extra:
            results.append(next(replies))
            for _ in range(n):
                next(replies)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            first = failed[0]
            if isinstance(first, ResponseError):
                raise reply_error(first)
            raise wrap_error(first, self.reply_timeout)
        fix = self.client.pipeline(transaction=False)
        for w, r in zip(writes, results, strict=True):
            if w.nx and r:  # ours now: an earlier release's tag goes, and an old record of a plain one
                fix.delete(legacy_key(w.key))
                if not tagged(w):
                    fix.delete(tag_key(w.key))
        if len(fix):
            with contextlib.suppress(KeymissError):
                await self.call(fix.execute, raise_on_error=False)
        return [bool(r) for r in results]

    async def discard_unchanged(self, items: dict[str, Item]) -> None:
        """Each value, then its tag, deleted while still the one read: single-key scripts, as a key
        and its tag share a slot only when the key has a hash tag."""
        pipe = self.client.pipeline(transaction=False)
        for key, item in items.items():
            pipe.eval(DEL_IF_SHA, 1, key_bytes(key), hashlib.sha1(item.value).hexdigest())
            pipe.eval(DROP_IF, 1, tag_key(key), tag_value(item.codec, item.value, item.version))
        replies = await self.call(pipe.execute, raise_on_error=False)
        for r in replies:
            if isinstance(r, Exception):
                raise reply_error(r) if isinstance(r, ResponseError) else wrap_error(r, self.reply_timeout)

    async def delete(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        if not keys:
            return 0
        n = int(await self.call(self.client.delete, *(key_bytes(k) for k in keys)))
        await self.call(self.client.delete, *(tag_key(k) for k in keys))
        await self.call(self.client.delete, *(legacy_key(k) for k in keys))
        return n

    async def exists(self, keys: Iterable[str]) -> int:
        raw = [key_bytes(k) for k in keys]
        return int(await self.call(self.client.exists, *raw)) if raw else 0

    async def pttl(self, key: str) -> int:
        return int(await self.call(self.client.pttl, key_bytes(key)))

    async def expire(self, key: str, ttl: float | None) -> bool:
        if ttl is None:
            ok = bool(await self.call(self.client.persist, key_bytes(key)))
            for tag in (tag_key(key), legacy_key(key)):
                await self.call(self.client.persist, tag)
            return ok
        if ttl <= 0:
            return bool(await self.delete([key]))
        ok = bool(await self.call(self.client.pexpire, key_bytes(key), px_of(ttl)))
        for tag in (tag_key(key), legacy_key(key)):
            await self.call(self.client.pexpire, tag, px_of(ttl))
        return ok

    async def expire_at_ms(self, key: str, when_ms: int) -> bool:
        """PEXPIREAT itself, exact for any time Redis takes, on the value and then its records."""
        ok = bool(await self.call(self.client.pexpireat, key_bytes(key), when_ms))
        if ok:
            for tag in (tag_key(key), legacy_key(key)):
                await self.call(self.client.pexpireat, tag, when_ms)
        return ok

    async def scan(
        self, cursor: int, match: str | None = None, count: int = 10, kind: str | None = None
    ) -> tuple[int, list[str]]:
        """Redis SCAN, without the companions and earlier tags (part of their value, not keys)."""
        if self.cluster:  # one pass over every primary: cluster cursors do not compose
            keys = [k async for k in self.client.scan_iter(match=match, count=max(count, 100), _type=kind)]
            return 0, [k.decode("utf-8", "surrogateescape") for k in keys if not k.startswith(TAGS)]
        nxt, keys = await self.call(self.client.scan, cursor, match=match, count=count, _type=kind)
        return int(nxt), [k.decode("utf-8", "surrogateescape") for k in keys if not k.startswith(TAGS)]

    async def dbsize(self) -> int:
        if self.cluster:
            n = await self.call(self.client.dbsize, target_nodes=RedisCluster.PRIMARIES)
        else:
            n = await self.call(self.client.dbsize)
        return sum(int(v) for v in n.values()) if isinstance(n, dict) else int(n)

    async def flush(self) -> None:
        await self.call(self.client.flushdb)

    async def sweep(self, limit: int = 1000) -> int:
        """Redis expires keys itself; the periodic sweep refreshes the numbers ``info`` reports."""
        try:
            nodes = {"target_nodes": RedisCluster.PRIMARIES} if self.cluster else {}
            info = await self.call(self.client.info, "memory", **nodes)
            stats = await self.call(self.client.info, "stats", **nodes)
            keys = await self.dbsize()
        except StoreError:
            return 0
        if self.cluster:  # per-node dicts: add them up
            info = sum_nodes(info)
            stats = sum_nodes(stats)
        self._info = StoreInfo(
            store=self.url,
            used_bytes=int(info.get("used_memory", 0)),
            max_bytes=int(info.get("maxmemory", 0)),
            keys=keys,
            evictions=int(stats.get("evicted_keys", 0)),
            expired=int(stats.get("expired_keys", 0)),
            eviction_policy="redis",
        )
        return 0

    async def close(self) -> None:
        await self.leases.close()
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()
        for extra in self._raw_clients.values():
            with contextlib.suppress(RedisError, OSError):
                await extra.aclose()
        self._raw_clients.clear()

    def info(self) -> StoreInfo:
        """Numbers from the last sweep (INFO is a network call; this must not block)."""
        return self._info

    def _relay_client(self, proto: int) -> Any:
        """The pass-through's client for a client speaking ``proto``: RESP2 through a parser that
        keeps status replies apart from bulk strings, so a RESP2 client gets Redis's bytes; RESP3
        (maps, sets, doubles intact) through redis-py's own parser, which reads ``+OK`` as a bulk."""
        client = self._raw_clients.get(proto)
        if client is not None:
            return client
        extra: dict[str, Any] = {"protocol": proto}
        if proto == 2:
            extra["parser_class"] = RelayParser
            if NO_MAINT is not None:  # redis-py ≥ 7 wants hiredis or RESP3 for these
                extra["maint_notifications_config"] = NO_MAINT
        if self.cluster:  # the cluster client takes no parser_class: its nodes' connections do
            client = RedisCluster.from_url(self._clean_url, **self._common)
            manager = client.nodes_manager
            manager.connection_kwargs.update(extra)
            for node in manager.startup_nodes.values():
                node.connection_kwargs.update(extra)
        else:
            client = blocking_client(self._clean_url, self._gate, **extra, **self._common)
        client.response_callbacks = {}
        self._raw_clients[proto] = client
        return client

    async def raw(self, args: Sequence[bytes], proto: int = 2) -> Any:
        """Run a command keymiss does not own on the backing Redis (pass-through), in the client's
        protocol. Response callbacks are off, so replies stay what Redis sent; Redis's own error
        lines come back as ``ReplyError`` with their code, and an unreachable Redis as ``StoreError``."""
        client = self._relay_client(proto)
        name = args[0].decode("ascii", "replace")  # the cluster client routes by a str command name
        try:
            async with self._gate.held():
                return await client.execute_command(name, *args[1:])
        except (RedisError, RedisClusterException, OSError, RuntimeError) as exc:
            raise relay_error(exc, self.reply_timeout) from None

    async def transaction(self, commands: Sequence[Sequence[bytes]], proto: int = 2) -> list[Any] | None:
        """MULTI, the commands and EXEC on one connection of the relay (a cluster needs them all in
        one slot); Redis's error lines keep their code, inside the replies and for EXEC itself."""
        pipe = self._relay_client(proto).pipeline(transaction=True)
        for args in commands:
            pipe.execute_command(args[0].decode("ascii", "replace"), *args[1:])
        try:
            async with self._gate.held():
                replies = await pipe.execute(raise_on_error=False)
        except (RedisError, RedisClusterException, OSError, RuntimeError) as exc:
            raise relay_error(exc, self.reply_timeout) from None
        return [reply_error(r) if isinstance(r, ResponseError) else r for r in replies]

    # --- cluster-wide single-flight ---------------------------------------------------------------------
    async def flight(self, key: str, compute: Callable[[], Awaitable[Item]], compute_seconds: float) -> Item:
        """Compute only while holding the key's lease in Redis; see ``keymiss.stores.leases``."""
        return await self.leases.flight(key, compute, compute_seconds)

    # --- what the near cache builds on ------------------------------------------------------------------
    async def connect(self) -> None:
        """Open the client (a cluster discovers its slots) before the first command."""
        try:
            await self._connect()
        except (RedisError, OSError) as exc:
            raise wrap_error(exc, self.reply_timeout) from exc

    def subscriber(self) -> Any:
        """A new pub/sub object on a connection that hears every node's PUBLISH (classic PUBLISH
        reaches every node of a cluster, so one plain connection to any node will do)."""
        if self.cluster:
            node = self.client.get_default_node() or self.client.get_primaries()[0]
            return aioredis.Redis(host=node.host, port=node.port, **self._common).pubsub()
        return self.client.pubsub()

    async def publish(self, channel: str, messages: Sequence[bytes]) -> None:
        """Publish ``messages`` on ``channel`` concurrently (a cluster pipeline refuses PUBLISH)."""
        await asyncio.gather(*(self.call(self.client.publish, channel, m) for m in messages))
