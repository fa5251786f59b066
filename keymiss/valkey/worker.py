"""keymiss workers: compute the misses that module-loaded Valkey / Redis servers queue.

A server with the keymiss module (``keymiss redis-module``) serves hits itself and queues each
missing key of a registered keyspace once. A worker registers the app's keyspaces on every master
(REGISTER, in the words of ``keymiss.valkey.protocol``), takes queued keys in batches (TAKE, with a
lease: a key a worker does not answer in time, or whose worker's connection closes, goes back to the
queue), computes them with the engine (``Keymiss.compute``: batching, codecs, timeouts, QA) and
answers with FILL or FAIL. Several workers, on several machines, share the queues.

On a cluster, the worker attaches to every master, follows the topology (failovers included) and
reconnects with backoff. ``stop()`` drains: no new takes; what was taken is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keymiss.engine.compute import Computed
from keymiss.errors import ConfigError, ReplyError, error_line
from keymiss.options import DEFAULT_TIMEOUT
from keymiss.runtime.net import redact_url
from keymiss.valkey import protocol
from keymiss.valkey.protocol import MAX_MS
from keymiss.valkey.respclient import RespClient
from keymiss.valkey.topology import masters_of, parse_url, with_node

#: Redis's and Valkey's default proto-max-bulk-len, where a server does not say its own.
MAX_BULK = 512 * 1024 * 1024

if TYPE_CHECKING:
    from keymiss.engine.cache import Keymiss

log = logging.getLogger("keymiss.valkey.worker")

#: extra seconds a key's module deadline allows beyond the keyspace's own timeouts (queueing, transfer)
DEADLINE_MARGIN = 5.0

#: how often a worker asks versioned keyspaces for their version (the callables should be cheap)
VERSION_POLL = 0.05


@dataclass
class WorkerStats:
    """What one worker did, over all the servers it serves."""

    takes: int = 0
    taken: int = 0
    fills: int = 0
    discarded: int = 0
    failures: int = 0
    reconnects: int = 0
    #: sessions the server refused for the worker's credentials (NOAUTH, WRONGPASS, NOPERM)
    auth_refusals: int = 0
    nodes: set[str] = field(default_factory=set)


class Worker:
    """Serves one app's keyspaces to the keymiss module of one server or one cluster."""

    def __init__(
        self,
        km: Keymiss,
        url: str,
        *,
        batch: int = 64,
        max_in_flight: int = 256,
        block_ms: int = 1000,
        refresh_seconds: float = 5.0,
        timeout: float = 5.0,
        default_ttl: float | None = None,
        max_value_share: float = 0.1,
    ) -> None:
        self.km = km
        self.cluster, self.url = parse_url(url)
        if batch < 1 or max_in_flight < 1 or block_ms < 1:
            raise ConfigError("batch, max_in_flight and block_ms must be at least 1")
        self.batch = batch
        self.max_in_flight = max_in_flight
        self.block_ms = block_ms
        self.refresh_seconds = refresh_seconds
        self.timeout = timeout
        if default_ttl is not None and not default_ttl > 0:
            raise ConfigError("default_ttl must be a positive number of seconds (or None)")
        # a TTL for values of keyspaces without one, so that a server evicting only keys with a TTL
        # (volatile-lfu) evicts answers, never the contexts they are computed from
        self.default_ttl = default_ttl
        if not 0 < max_value_share <= 1:
            raise ConfigError("max_value_share must be above 0 and at most 1 (a share of maxmemory)")
        #: a value over this share of the server's maxmemory is answered to its readers, not stored
        self.max_value_share = max_value_share
        self.registrations()  # a setting the module would refuse is a ConfigError now, not a retry loop
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._nodes: dict[str, asyncio.Task[None]] = {}
        self._in_flight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._fills: dict[str, RespClient] = {}
        self._max_bulk: dict[str, int] = {}  # each server's proto-max-bulk-len

    # --- what is registered --------------------------------------------------------------------------
    def registrations(self) -> list[list[Any]]:
        """One REGISTER command per keyspace of the app."""
        out = []
        for ks in self.km.registry:
            o = ks.options
            glob = ks.template.glob() if ks.template is not None else ks.pattern
            timeout = (o.timeout or DEFAULT_TIMEOUT) + (o.queue_timeout or o.timeout or DEFAULT_TIMEOUT)
            ttl = o.ttl or self.default_ttl
            limited = {
                "ttl": max(1, int(ttl * 1000)) if ttl else None,
                "errttl": max(1, int(o.error_ttl * 1000)) if o.error_ttl else None,
                "timeout": int((timeout + DEADLINE_MARGIN) * 1000),
                "stale": max(1, int(o.stale * 1000)) if o.stale else None,
            }
            for name, value in limited.items():
                if value is not None and value > MAX_MS:
                    raise ConfigError(
                        f"keyspace {ks.pattern!r}: its {name} ({value / 1000:g} s, timeouts and queue wait "
                        f"together) is over the module's limit of {MAX_MS // 86_400_000} days"
                    )
            versioned = ks.version is not None  # the tag is compared; the label is what INFO shows
            args = protocol.register(
                ks.pattern,
                glob,
                ttl_ms=limited["ttl"],
                error_ttl_ms=limited["errttl"],
                timeout_ms=limited["timeout"],
                queue=max(1, o.queue),
                stale_ms=limited["stale"],
                early=max(1, min(protocol.MAX_EARLY, int(o.early_refresh * 1000)))
                if o.early_refresh
                else None,
                version=ks.version_tag().hex() if versioned else None,
                label=protocol.label(ks.current_version()) if versioned else None,
                version_stale_ms=(
                    max(1, min(MAX_MS, int(o.version_stale * 1000)))
                    if versioned and o.version_stale
                    else None
                ),
            )
            out.append(args)
        if not out:
            raise ConfigError("the app has no keyspaces: a worker would have nothing to compute")
        return out

    def lease_ms(self) -> int:
        """How long a taken key stays ours: the slowest keyspace's wait and compute, plus margin."""
        worst = max(
            (ks.options.timeout or DEFAULT_TIMEOUT) + (ks.options.queue_timeout or ks.options.timeout or 0)
            for ks in self.km.registry
        )
        return int((worst + DEADLINE_MARGIN) * 1000)

    # --- running ---------------------------------------------------------------------------------------
    async def _watch_versions(self) -> None:
        """Tell every server when a keyspace's version changes (its callable answers another
        version), within ``VERSION_POLL`` seconds: from then on no value of the old one is read."""
        sent = {ks.pattern: ks.version_tag() for ks in self.km.registry if ks.version is not None}
        while not self._stopping.is_set() and sent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), VERSION_POLL)
            for ks in self.km.registry:
                if ks.version is None:
                    continue
                try:
                    tag = ks.version_tag()
                except Exception:  # counted and reported by the computations that ask it
                    continue
                if sent.get(ks.pattern) == tag:
                    continue
                command = protocol.switch_version(ks.pattern, tag.hex(), protocol.label(ks.current_version()))
                done = True
                for url in list(self.stats.nodes):
                    try:
                        reply = (await self._send(url, [command]))[0]
                    except (OSError, ConnectionError, RuntimeError) as exc:
                        log.warning(
                            "could not switch %r's version on %s: %s", ks.pattern, redact_url(url), exc
                        )
                        done = False
                        continue
                    if isinstance(reply, ReplyError):
                        log.warning("%s refused %r's new version: %s", redact_url(url), ks.pattern, reply)
                        done = False
                if done:
                    sent[ks.pattern] = tag
                    log.info("keyspace %r now serves version %s", ks.pattern, ks.current_version())

    async def run(self) -> None:
        """Serve until ``stop()``; then finish what was taken and return."""
        self.registrations()  # refuse an empty app before connecting anywhere
        await self.km.start()
        versions = asyncio.get_running_loop().create_task(self._watch_versions())
        try:
            if not self.cluster:
                self._attach(self.url)
                await self._stopping.wait()
            else:
                await self._follow_cluster()
            await asyncio.gather(*self._nodes.values(), return_exceptions=True)
            await self._idle.wait()
        finally:
            versions.cancel()
            for task in self._nodes.values():
                task.cancel()
            self._nodes.clear()
            for client in self._fills.values():
                await client.close()
            self._fills.clear()

    def stop(self) -> None:
        """Drain: take nothing more, finish what was taken."""
        self._stopping.set()
        self._room.set()

    def _attach(self, url: str) -> None:
        if url not in self._nodes or self._nodes[url].done():
            self._nodes[url] = asyncio.get_running_loop().create_task(self._serve_node(url))

    async def _follow_cluster(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        seeds = [self.url]
        while not self._stopping.is_set():
            masters: list[tuple[str, int]] | None = None
            for seed in list(dict.fromkeys(seeds)):
                client: Any = aioredis.Redis.from_url(
                    seed, socket_timeout=self.timeout, socket_connect_timeout=self.timeout
                )
                try:
                    text = await client.execute_command("CLUSTER", "NODES")
                    masters = masters_of(text.decode() if isinstance(text, bytes) else str(text))
                    break
                except (RedisError, OSError) as exc:
                    log.debug("cluster node %s: %s", seed, exc)
                finally:
                    with contextlib.suppress(RedisError, OSError, RuntimeError):
                        await client.aclose()
            if masters is not None:
                wanted = {with_node(self.url, h, p) for h, p in masters}
                for url in wanted:
                    self._attach(url)
                for url in list(self._nodes):
                    if url not in wanted:  # no longer a master: its keys moved with its slots
                        self._nodes.pop(url).cancel()
                seeds = [self.url, *wanted]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.refresh_seconds)

    async def _serve_node(self, url: str) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                await self._session(url)
                backoff = 0.1
            except (ReplyError, OSError, ConnectionError, RuntimeError) as exc:
                self.stats.reconnects += 1
                self.stats.nodes.discard(url)
                if isinstance(exc, ReplyError) and "unknown command" in str(exc).lower():
                    log.warning(
                        "%s has no keymiss module: start it with "
                        '--loadmodule "$(keymiss redis-module)" (or MODULE LOAD it); retrying in %.1fs',
                        redact_url(url),
                        backoff,
                    )
                else:
                    log.warning("worker lost %s (%s); retrying in %.1fs", redact_url(url), exc, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                backoff = min(backoff * 2, 2.0)

    async def _fill_client(self, url: str) -> RespClient:
        client = self._fills.get(url)
        if client is None or client.closed:
            client = self._fills[url] = await RespClient.connect(url, wait=self.timeout)
        return client

    async def _session(self, url: str) -> None:
        """One connection that registers and takes (the module counts it as a live worker while it
        is open); fills go over another, shared by the batches in flight."""
        take = await RespClient.connect(url, wait=self.timeout)
        try:
            for args in self.registrations():
                await take.call(args)
            await self._fill_client(url)
            self._max_bulk[url] = await self._bulk_limit(take)
            self.stats.nodes.add(url)
            log.info(
                "worker serving %s: %s", redact_url(url), ", ".join(ks.pattern for ks in self.km.registry)
            )
            lease = self.lease_ms()
            wait = self.block_ms / 1000 + self.timeout
            while not self._stopping.is_set():
                room = self.max_in_flight - self._in_flight
                if room <= 0:
                    self._room.clear()
                    await self._room.wait()
                    continue
                reply = await take.call(protocol.take(min(room, self.batch), self.block_ms, lease), wait=wait)
                self.stats.takes += 1
                pairs = protocol.decode_take(reply)
                if not pairs:
                    continue
                self.stats.taken += len(pairs)
                self._begin(len(pairs))
                task = asyncio.get_running_loop().create_task(self._compute(url, pairs))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            # draining: the module requeues what a closed connection took, so this one stays open
            # until what was taken is answered (or its lease runs out)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), lease / 1000)
        finally:
            self.stats.nodes.discard(url)
            await take.close()

    async def _bulk_limit(self, conn: RespClient) -> int:
        """The largest value the server takes in one argument (CONFIG may be renamed or denied:
        then Redis's default)."""
        try:
            reply = await conn.call(["CONFIG", "GET", "proto-max-bulk-len"])
            return int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else MAX_BULK
        except (ReplyError, ValueError, TypeError):
            return MAX_BULK

    def _begin(self, n: int) -> None:
        self._in_flight += n
        self._idle.clear()

    def _end(self, n: int) -> None:
        self._in_flight -= n
        self._room.set()
        if self._in_flight == 0:
            self._idle.set()

    async def _compute(self, url: str, pairs: Sequence[tuple[str, int]]) -> None:
        """Compute what one TAKE handed over and answer each key as soon as it is done: a key of a
        fast keyspace taken with a slow one is not held back by it (the keys finished together
        leave as one write)."""
        left = len(pairs)
        try:
            started = await self.km.compute_each([k for k, _ in pairs])
            ready: list[tuple[str, int, Any]] = []
            waiting: dict[asyncio.Future[Computed], tuple[str, int]] = {}
            for (key, token), fut in zip(pairs, started, strict=True):
                if isinstance(fut, asyncio.Future):
                    waiting[asyncio.ensure_future(asyncio.shield(fut))] = (key, token)
                else:
                    ready.append((key, token, fut))
            while True:
                if ready:
                    await self._answer(url, ready)
                    left -= len(ready)
                    self._end(len(ready))
                    ready = []
                if not waiting:
                    return
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for f in done:
                    key, token = waiting.pop(f)
                    try:
                        ready.append((key, token, f.result()))
                    except Exception as exc:  # the key's own error, sent to its readers
                        ready.append((key, token, exc))
        except (OSError, ConnectionError, RuntimeError) as exc:
            log.warning("could not answer %d key(s): %s (their leases will hand them on)", left, exc)
        finally:
            if left:
                self._end(left)

    def _answer_args(self, url: str, key: str, token: int, result: Any) -> list[Any]:
        raw = key.encode("utf-8", "surrogateescape")
        if isinstance(result, Computed):
            limit = self._max_bulk.get(url, MAX_BULK)
            if len(result.value) > limit:  # the server would drop the connection, not the value
                return protocol.fail(
                    raw,
                    token,
                    f"{protocol.ERR_PREFIX}the value ({len(result.value)} bytes) is larger than the server's "
                    f"proto-max-bulk-len ({limit} bytes); it cannot be stored",
                )
            ttl = result.ttl or self.default_ttl
            ks = self.km.registry.route(key)
            stale = ks.stale if ks is not None and ks.stale else 0.0  # kept for the stale window
            return protocol.fill(
                raw,
                token,
                result.value,
                px=max(1, int((ttl + stale) * 1000)) if ttl else None,
                # the module discards another version's value
                version=result.version.hex() if ks is not None and ks.version is not None else None,
            )
        text = (
            f"{protocol.ERR_PREFIX}no keyspace of this worker owns the key"
            if result is None
            else error_line(result)
        )
        return protocol.fail(raw, token, text)

    async def _send(self, url: str, commands: list[list[Any]]) -> list[Any]:
        for attempt in range(3):  # a connection that outlived a server restart fails once
            try:
                return await (await self._fill_client(url)).call_many(commands)
            except (OSError, ConnectionError):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _answer(self, url: str, results: list[tuple[str, int, Any]]) -> None:
        """FILL or FAIL each key. A FILL the server refuses before the module sees it (MISCONF: its
        disk is full; OOM: maxmemory) becomes a FAIL with the server's reason, so the readers get
        that error now instead of a timeout later."""
        commands = [self._answer_args(url, key, token, result) for key, token, result in results]
        replies = await self._send(url, commands)
        refused: list[list[Any]] = []
        for args, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ReplyError):
                log.warning("the server refused %s: %s", args[0], reply)
                self.stats.failures += 1
                if args[0] == protocol.CMD_FILL:
                    why = f"{protocol.ERR_PREFIX}the server refused to store the value: {reply}"
                    refused.append(protocol.fail(args[1], args[2], why))
            elif args[0] == protocol.CMD_FILL and reply == 1:
                self.stats.fills += 1
            elif args[0] == protocol.CMD_FILL:
                self.stats.discarded += 1
            else:
                self.stats.failures += 1
        if refused:
            for reply in await self._send(url, refused):
                if isinstance(reply, ReplyError):
                    log.warning("the server refused %s too: %s", protocol.CMD_FAIL, reply)


async def run_worker(km: Keymiss, url: str, **options: Any) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain; the process's exit status."""
    import signal

    worker = Worker(km, url, **options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, worker.stop)
    started = time.monotonic()
    try:
        await worker.run()
    finally:
        await km.close()
    s = worker.stats
    log.info(
        "worker stopped after %.0fs: %d taken, %d filled, %d discarded, %d failed",
        time.monotonic() - started,
        s.taken,
        s.fills,
        s.discarded,
        s.failures,
    )
    return 0
