"""keymiss workers: compute the misses that module-loaded Valkey / Redis servers queue.

A server with the keymiss module (``keymiss redis-module``) serves hits itself and queues each
missing key of a registered keyspace once. A worker registers the app's keyspaces on every master
(REGISTER, in the words of ``keymiss.valkey.protocol``), takes queued keys in batches (TAKE, with a
lease: a key a worker does not answer in time, or whose worker's connection closes, goes back to the
queue), computes them with the engine (``Keymiss.compute``: batching, codecs, timeouts, QA) and
answers with FILL or FAIL. Several workers, on several machines, share the queues.

On a cluster, the worker attaches to every master, follows the topology (failovers included) and
reconnects with backoff. ``stop()`` drains: no new takes; what was taken is finished. A worker
stopped before that (cancelled) says once how many keys it abandoned; their leases hand them on.

Slots are shared fairly: each keyspace keeps a few of ``max_in_flight`` that no other may take
(TAKE's ``LIMIT``), so any number of keyspaces whose handlers hang cannot hold every slot while the
others' readers wait; a single busy keyspace still has nearly every slot while the others are idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from keymiss.engine.compute import Computed
from keymiss.errors import ConfigError, KeymissError, ReplyError
from keymiss.options import DEFAULT_TIMEOUT
from keymiss.runtime.net import redact_url
from keymiss.valkey import protocol
from keymiss.valkey.answers import (
    AUTH_REFUSALS,
    MAX_BULK,
    RETRY_MAX,
    TRANSIENT,
    Answers,
    WorkerStats,
    no_evict,
)
from keymiss.valkey.respclient import RespClient
from keymiss.valkey.topology import masters_of, parse_url, with_node

__all__ = ["MAX_BULK", "Worker", "WorkerStats", "run_worker"]

if TYPE_CHECKING:
    from keymiss.engine.cache import Keymiss

log = logging.getLogger("keymiss.worker")

#: extra seconds a key's module deadline allows beyond the keyspace's own timeouts (queueing, transfer)
DEADLINE_MARGIN = 5.0

#: how often a worker asks versioned keyspaces for their version (the callables should be cheap)
VERSION_POLL = 0.05

#: how long a TAKE blocks while some keyspace has no room (so it is taken from again soon after)
SATURATED_BLOCK_MS = 100

#: slots each keyspace keeps for itself at most (fewer where ``max_in_flight`` is small)
RESERVE = 8

#: the keyspace a key no keyspace owns is counted under
NO_KEYSPACE = ""


def claim_glob(prefix: str) -> str:
    """Every key starting with a template's literal prefix, as the engine routes them: one there
    that does not fit the template is failed with the engine's error, not left a silent nil."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"


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
        max_in_flight_per_keyspace: int | None = None,
    ) -> None:
        self.km = km
        self.cluster, self.url = parse_url(url)
        if batch < 1 or max_in_flight < 1 or block_ms < 1:
            raise ConfigError("batch, max_in_flight and block_ms must be at least 1")
        self.batch = batch
        self.max_in_flight = max_in_flight
        if max_in_flight_per_keyspace is not None and max_in_flight_per_keyspace < 1:
            raise ConfigError("max_in_flight_per_keyspace must be at least 1")
        self.max_in_flight_per_keyspace = max_in_flight_per_keyspace
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
        self.answers = Answers(
            km, self.stats, timeout=timeout, default_ttl=default_ttl, max_value_share=max_value_share
        )
        self._stopping = asyncio.Event()
        self._nodes: dict[str, asyncio.Task[None]] = {}
        self._in_flight = 0
        self._by_keyspace: dict[str, int] = {}  # keys in flight by keyspace pattern
        self._room = asyncio.Event()
        self._room.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- what is registered --------------------------------------------------------------------------
    def registrations(self) -> list[list[Any]]:
        """One REGISTER command per keyspace of the app."""
        out = []
        for ks in self.km.registry:
            o = ks.options
            glob = ks.pattern if ks.template is None else claim_glob(ks.template.prefix)
            timeout = (o.timeout or DEFAULT_TIMEOUT) + (o.queue_timeout or o.timeout or DEFAULT_TIMEOUT)
            ttl = o.ttl or self.default_ttl
            limited = {
                "ttl": max(1, int(ttl * 1000)) if ttl else None,
                "errttl": max(1, int(o.error_ttl * 1000)) if o.error_ttl else None,
                "timeout": int((timeout + DEADLINE_MARGIN) * 1000),
                "stale": max(1, int(o.stale * 1000)) if o.stale else None,
            }
            for name, value in limited.items():
                if value is not None and value > protocol.MAX_MS:
                    raise ConfigError(
                        f"keyspace {ks.pattern!r}: its {name} ({value / 1000:g} s, timeouts and queue wait "
                        f"together) is over the module's limit of {protocol.MAX_MS // 86_400_000} days"
                    )
            versioned = ks.version is not None  # the tag is compared; the label is what INFO shows
            early = max(1, min(protocol.MAX_EARLY, int(o.early_refresh * 1000))) if o.early_refresh else None
            args = protocol.register(
                ks.pattern,
                glob,
                ttl_ms=limited["ttl"],
                error_ttl_ms=limited["errttl"],
                timeout_ms=limited["timeout"],
                queue=max(1, o.queue),
                stale_ms=limited["stale"],
                early=early,
                version=ks.version_tag().hex() if versioned else None,
                label=protocol.label(ks.current_version()) if versioned else None,
                version_stale_ms=(
                    max(1, min(protocol.MAX_MS, int(o.version_stale * 1000)))
                    if versioned and o.version_stale
                    else None
                ),
                share_ppm=max(1, min(protocol.MAX_SHARE, round(self.max_value_share * protocol.MAX_SHARE))),
                tags=ks.tags,
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
            for i, ks in enumerate(self.km.registry):
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
                        reply = await self.answers.switch(url, self.registrations()[i], command)
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
            # stopped before what was taken is answered (cancelled after a grace): said once, with
            # the count; the server hands the keys on when this worker's connections close
            abandoned = self._in_flight
            versions.cancel()
            for task in [*self._nodes.values(), *self._tasks]:
                task.cancel()
            self._nodes.clear()
            await self.answers.close()
            if abandoned:
                log.warning(
                    "worker stopped with %d key(s) still computing: abandoned, the servers hand them "
                    "to other workers",
                    abandoned,
                )

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
                if (why := _credentials_refused(exc)) is not None:
                    self.stats.auth_refusals += 1
                    log.error(
                        "%s refused the worker's credentials (%s; refusal %d): check the user and "
                        "password of the URL and that its ACL allows %s; retrying in %.1fs",
                        redact_url(url),
                        why,
                        self.stats.auth_refusals,
                        ", ".join(protocol.WORKER_COMMANDS),
                        backoff,
                    )
                elif isinstance(exc, ReplyError) and "unknown command" in str(exc).lower():
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

    def keyspace_cap(self) -> int:
        """Keys one keyspace may have in flight at most (``max_in_flight_per_keyspace``; by default
        all of ``max_in_flight``: the others' reserves are what keep room for them)."""
        if self.max_in_flight_per_keyspace is not None:
            return min(self.max_in_flight_per_keyspace, self.max_in_flight)
        return self.max_in_flight

    def reserve(self) -> int:
        """Slots each keyspace keeps for itself: no other keyspace may take them, so however many
        keyspaces hang, each of the others can still take keys (none for an app of one keyspace)."""
        n = len(self.km.registry)
        return 0 if n <= 1 else max(1, min(RESERVE, self.max_in_flight // (2 * n)))

    def _plan(self) -> tuple[int, dict[str, int]]:
        """How many keys the next TAKE may take, and its LIMITs (each keyspace with less room than
        that, by its name). A keyspace may take into its own unused reserve, and beyond it only
        into the slack (the free slots over every unused reserve); the count is held to what keeps
        the slack from going negative when several keyspaces take beyond their reserves at once."""
        free = self.max_in_flight - self._in_flight
        reserve, cap = self.reserve(), self.keyspace_cap()
        unused = {
            ks.pattern: max(0, reserve - self._by_keyspace.get(ks.pattern, 0)) for ks in self.km.registry
        }
        slack = max(0, free - sum(unused.values()))
        room = {p: max(0, min(u + slack, cap - self._by_keyspace.get(p, 0))) for p, u in unused.items()}
        takers = [unused[p] for p, r in room.items() if r > 0]
        count = min(free, self.batch, slack + min(takers)) if takers else 0
        return count, {p: r for p, r in room.items() if r < count}

    def _pattern(self, key: str) -> str:
        ks = self.km.registry.route(key)
        return NO_KEYSPACE if ks is None else ks.pattern

    async def _session(self, url: str) -> None:
        """One connection that registers and takes (the module counts it as a live worker while it
        is open); fills go over another, shared by the batches in flight."""
        take = await RespClient.connect(url, wait=self.timeout)
        try:
            await no_evict(take, url)
            for args in self.registrations():
                await take.call(args)
            await self.answers.client(url)
            await self.answers.learn(url, take)
            self.stats.nodes.add(url)
            log.info("worker serving %s: %s", redact_url(url), self.km.registry.shown())
            lease = self.lease_ms()
            while not self._stopping.is_set():
                count, limits = self._plan()
                if count <= 0:
                    self._room.clear()  # no room at all, or none in any keyspace
                    await self._room.wait()
                    continue
                # a keyspace without room is not taken from, so wait briefly: it may have room soon
                block = min(self.block_ms, SATURATED_BLOCK_MS) if 0 in limits.values() else self.block_ms
                command = protocol.take(count, block, lease, limits)
                try:
                    reply = await take.call(command, wait=block / 1000 + self.timeout)
                except ReplyError as exc:
                    if str(exc).split(" ", 1)[0] not in TRANSIENT:
                        raise
                    # a cluster that went down answers a blocked TAKE so: the session, and what
                    # it took, stay (a closed one would hand its keys to be computed again)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), RETRY_MAX)
                    continue
                self.stats.takes += 1
                pairs = protocol.decode_take(reply)
                if not pairs:
                    continue
                self.stats.taken += len(pairs)
                patterns = [self._pattern(key) for key, _ in pairs]
                self._begin(patterns)
                task = asyncio.get_running_loop().create_task(self._compute(url, pairs, patterns))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            # draining: the module requeues what a closed connection took, so this one stays open
            # until what was taken is answered (or its lease runs out)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), lease / 1000)
        finally:
            self.stats.nodes.discard(url)
            await take.close()

    def _begin(self, patterns: Sequence[str]) -> None:
        self._in_flight += len(patterns)
        for p in patterns:
            self._by_keyspace[p] = self._by_keyspace.get(p, 0) + 1
        self._idle.clear()

    def _end(self, patterns: Sequence[str]) -> None:
        self._in_flight -= len(patterns)
        for p in patterns:
            self._by_keyspace[p] -= 1
        self._room.set()
        if self._in_flight == 0:
            self._idle.set()

    async def _compute(self, url: str, pairs: Sequence[tuple[str, int]], patterns: Sequence[str]) -> None:
        """Compute what one TAKE handed over and answer each key as soon as it is done: a key of a
        fast keyspace taken with a slow one is not held back by it (the keys finished together
        leave as one write). Cancelled (the worker stopped), it leaves its keys to their leases."""
        left = dict(enumerate(patterns))  # the keys not yet answered, by their place in pairs
        try:
            started = await self.km.compute_each([k for k, _ in pairs])
            ready: list[tuple[int, Any]] = []
            waiting: dict[asyncio.Future[Computed], int] = {}
            for i, fut in enumerate(started):
                if isinstance(fut, asyncio.Future):
                    # waited on, never cancelled by this task; its outcome read even if it is
                    # abandoned, so that a stopped worker leaves no "exception never retrieved"
                    fut.add_done_callback(_retrieve)
                    waiting[fut] = i
                else:
                    ready.append((i, fut))
            while True:
                if ready:
                    await self.answers.answer(url, [(*pairs[i], result) for i, result in ready])
                    self._end([left.pop(i) for i, _ in ready])
                    ready = []
                if not waiting:
                    return
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                ready = [(waiting.pop(f), _outcome(f)) for f in done]
        except (OSError, ConnectionError, RuntimeError) as exc:
            log.warning("could not answer %d key(s): %s (their leases will hand them on)", len(left), exc)
        finally:
            if left:
                self._end(list(left.values()))


def _credentials_refused(exc: BaseException) -> str | None:
    """Why the server refused the session's credentials (NOAUTH, WRONGPASS, NOPERM), or None. A
    server that wants a password answers a long command (a REGISTER) from a client that gave none
    with a protocol error before it could say NOAUTH: that is a NOAUTH too."""
    if not isinstance(exc, ReplyError):
        return None
    text = str(exc)
    if text.split(" ", 1)[0] in AUTH_REFUSALS:
        return text
    if "Protocol error: unauthenticated" in text:
        return f"NOAUTH: the server wants a password ({text})"
    return None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _outcome(fut: asyncio.Future[Computed]) -> Any:
    """A finished computation's value, or its error (a cancelled one's too) for its readers."""
    if fut.cancelled():
        return KeymissError("the computation was cancelled")
    return fut.exception() or fut.result()


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
