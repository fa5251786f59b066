"""A worker's answers: each computed key goes back to its server as FILL or FAIL.

One connection per server carries the answers of every batch in flight (pipelined). What the server
will take is learnt once per session: a value over ``proto-max-bulk-len`` would cost the connection,
so its readers get an error instead; a value over the worker's share of ``maxmemory`` is answered
to its readers with ``NOSTORE`` and never stored, since storing it would make the server evict
other values first (perhaps every one); and one that could not even pass through without eviction
is failed (the values passing through at the same time count against the free memory). A fill a
cluster refuses for a moment (CLUSTERDOWN, TRYAGAIN) is sent again with backoff instead of being
computed again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keymiss.engine.compute import Computed
from keymiss.errors import ComputeTimeoutError, KeyMismatchError, ReplyError, error_line
from keymiss.runtime.net import redact_url
from keymiss.valkey import protocol
from keymiss.valkey.respclient import RespClient

if TYPE_CHECKING:
    from keymiss.engine.cache import Keymiss

log = logging.getLogger("keymiss.worker")

#: Redis's and Valkey's default proto-max-bulk-len, where a server does not say its own.
MAX_BULK = 512 * 1024 * 1024

#: replies that say a cluster cannot take a write for a moment: the answer is sent again
TRANSIENT = ("CLUSTERDOWN", "TRYAGAIN")

#: the replies that refuse the worker's ACL user (at a session's start, or at a FILL or FAIL)
AUTH_REFUSALS = ("NOAUTH", "WRONGPASS", "NOPERM")

#: how long answers refused with a TRANSIENT reply are retried, and the first and longest pause
RETRY_SECONDS = 30.0
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


def fail_flag(result: BaseException | None) -> str | None:
    """FAIL's flag for a key's error, so that the module counts it as the Python server does: a
    key that does not fit its template computed nothing, a timeout is a timeout, not an error."""
    if isinstance(result, KeyMismatchError):
        return protocol.OPT_MISMATCH
    if isinstance(result, ComputeTimeoutError):
        return protocol.OPT_TIMEOUT
    return None


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
    #: values answered to their readers but not stored (over the share of maxmemory)
    oversized: int = 0
    #: answers sent again after a CLUSTERDOWN or TRYAGAIN
    retries: int = 0
    nodes: set[str] = field(default_factory=set)


@dataclass
class Limits:
    """What one server takes: its proto-max-bulk-len and maxmemory (0: none, or not known)."""

    max_bulk: int = MAX_BULK
    maxmemory: int = 0


async def no_evict(conn: RespClient, url: str) -> None:
    """Exempt one of the worker's connections from the server's client eviction
    (``maxmemory-clients``): dropping it would drop the keys it took or the answers it carries. A
    server without ``CLIENT NO-EVICT`` (or a user not allowed it) keeps it evictable."""
    try:
        await conn.call(["CLIENT", "NO-EVICT", "on"])
    except ReplyError as exc:
        log.debug("%s cannot exempt the worker's connection from client eviction: %s", redact_url(url), exc)


def _code(reply: Any) -> str:
    return str(reply).split(" ", 1)[0] if isinstance(reply, ReplyError) else ""


class Answers:
    """FILL or FAIL per computed key, over one connection per server."""

    def __init__(
        self,
        km: Keymiss,
        stats: WorkerStats,
        *,
        timeout: float,
        default_ttl: float | None,
        max_value_share: float,
    ) -> None:
        self.km = km
        self.stats = stats
        self.timeout = timeout
        self.default_ttl = default_ttl
        self.max_value_share = max_value_share
        self._clients: dict[str, RespClient] = {}
        self._limits: dict[str, Limits] = {}
        #: bytes per server that values passed through (not stored) may still take there: twice
        #: each value (its FILL, then its readers' reply), from its check until its FILL's reply
        self._committed: dict[str, int] = {}

    # --- connections and limits ------------------------------------------------------------------
    async def client(self, url: str) -> RespClient:
        client = self._clients.get(url)
        if client is None or client.closed:
            client = self._clients[url] = await RespClient.connect(url, wait=self.timeout)
            await no_evict(client, url)
        return client

    async def learn(self, url: str, conn: RespClient) -> Limits:
        """The server's limits, read once per session (CONFIG may be renamed or denied: then
        Redis's default bulk length, and no maxmemory known: the module still enforces the share)."""
        limits = Limits()
        for name in ("proto-max-bulk-len", "maxmemory"):
            try:
                reply = await conn.call(["CONFIG", "GET", name])
                value = int(reply[1]) if isinstance(reply, list) and len(reply) == 2 else None
            except (ReplyError, ValueError, TypeError):
                value = None
            if value is not None and name == "maxmemory":
                limits.maxmemory = value
            elif value is not None:
                limits.max_bulk = value
        self._limits[url] = limits
        return limits

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    # --- one answer --------------------------------------------------------------------------------
    async def _headroom(self, url: str) -> int | None:
        """Bytes the server has below maxmemory now (None: it would not say)."""
        limits = self._limits.get(url, Limits())
        try:
            (text,) = await (await self.client(url)).call_many([["INFO", "memory"]])
            used = int(bytes(text).split(b"used_memory:", 1)[1].split(b"\r\n", 1)[0])
        except (OSError, ConnectionError, ValueError, TypeError, IndexError):
            return None
        return limits.maxmemory - used

    async def args(self, url: str, key: str, token: int, result: Any) -> tuple[list[Any], int]:
        """The FILL or FAIL that answers ``key`` with ``result`` (a Computed, an error, or None),
        and the bytes it commits on the server (added to ``_committed``: the caller releases them
        once the command is answered)."""
        raw = key.encode("utf-8", "surrogateescape")
        if not isinstance(result, Computed):
            text = (
                f"{protocol.ERR_PREFIX}no keyspace of this worker owns the key"
                if result is None
                else error_line(result)
            )
            return protocol.fail(raw, token, text, fail_flag(result)), 0
        size = len(result.value)
        limits = self._limits.get(url, Limits())
        if size > limits.max_bulk:  # the server would drop the connection, not the value
            return protocol.fail(
                raw,
                token,
                f"{protocol.ERR_PREFIX}the value ({size} bytes) is larger than the server's "
                f"proto-max-bulk-len ({limits.max_bulk} bytes); it cannot be stored",
            ), 0
        store = True
        committed = 0
        if limits.maxmemory and size > self.max_value_share * limits.maxmemory:
            # storing it would make the server evict others first: its readers get it, nothing is
            # kept; unless even passing it through (its FILL, then a reply) would push the server
            # over maxmemory, which evicts just the same; the values of this batch and of others
            # checked before it and not yet answered are not in the server's count yet: they are
            # subtracted, so that many such values at once cannot pass on the same free memory
            headroom = await self._headroom(url)
            held = self._committed.get(url, 0)  # read after the await: no other check in between
            room = (limits.maxmemory if headroom is None else headroom) - held
            if 2 * size > room:
                log.warning(
                    "a value of %r (%d bytes) is too large for %s (maxmemory %d bytes, %s free, "
                    "%d committed to values being answered): failed",
                    key,
                    size,
                    redact_url(url),
                    limits.maxmemory,
                    "?" if headroom is None else headroom,
                    held,
                )
                return protocol.fail(
                    raw,
                    token,
                    f"{protocol.ERR_PREFIX}the value ({size} bytes) is too large for the server's "
                    f"maxmemory ({limits.maxmemory} bytes): passing it to its readers would evict "
                    "cached values",
                ), 0
            committed = 2 * size
            self._committed[url] = held + committed
            log.warning(
                "a value of %r (%d bytes) is over %g of %s's maxmemory (%d bytes): answered to its "
                "readers, not stored",
                key,
                size,
                self.max_value_share,
                redact_url(url),
                limits.maxmemory,
            )
            store = False
        ttl = result.ttl or self.default_ttl
        ks = self.km.registry.route(key)
        stale = ks.stale if ks is not None and ks.stale else 0.0  # kept for the stale window
        versioned = ks is not None and ks.version is not None
        return protocol.fill(
            raw,
            token,
            result.value,
            # the value's own TTL (``keymiss.Value``) or the keyspace's, within the module's limit
            px=min(protocol.MAX_MS, max(1, int((ttl + stale) * 1000))) if ttl else None,
            # the module discards another version's value; the companion records codec and
            # version (a typed value of an unversioned keyspace: computed, under no version)
            version=result.version.hex() if versioned or result.codec else None,
            codec=int(result.codec),
            store=store,
            cost=result.cost,  # INFO's compute seconds; the module's admission weighs it
        ), committed

    # --- sending -----------------------------------------------------------------------------------
    async def send(self, url: str, commands: list[list[Any]]) -> list[Any]:
        for attempt in range(3):  # a connection that outlived a server restart fails once
            try:
                return await (await self.client(url)).call_many(commands)
            except (OSError, ConnectionError):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def switch(self, url: str, register: list[Any], command: list[Any]) -> Any:
        """The reply of a version switch (``protocol.switch_version``), sent on a connection of its
        own that registered the keyspace first: the module takes a switch only from one of the
        keyspace's workers (a version no worker computes under leaves its readers nothing)."""
        conn = await RespClient.connect(url, wait=self.timeout)
        try:
            replies = await conn.call_many([register, command])
        finally:
            await conn.close()
        return replies[0] if isinstance(replies[0], ReplyError) else replies[1]

    async def _send_through(self, url: str, commands: list[list[Any]]) -> list[Any]:
        """The replies of ``commands``; those a cluster refused for a moment (CLUSTERDOWN,
        TRYAGAIN: a node failed and the cluster has not settled) are sent again, with backoff,
        for up to ``RETRY_SECONDS``: the value is computed, only storing it has to wait."""
        replies = await self.send(url, commands)
        again = [i for i, r in enumerate(replies) if _code(r) in TRANSIENT]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETRY_SECONDS
        pause = RETRY_FIRST
        if again:
            log.info(
                "%s cannot take %d answer(s) now (%s): retrying",
                redact_url(url),
                len(again),
                replies[again[0]],
            )
        while again and loop.time() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)
            self.stats.retries += len(again)
            for i, reply in zip(again, await self.send(url, [commands[i] for i in again]), strict=True):
                replies[i] = reply
            again = [i for i in again if _code(replies[i]) in TRANSIENT]
        return replies

    async def answer(self, url: str, results: list[tuple[str, int, Any]]) -> None:
        """FILL or FAIL each key. A FILL the server refuses before the module sees it (MISCONF: its
        disk is full; OOM: maxmemory) becomes a FAIL with the server's reason, so the readers get
        that error now instead of a timeout later."""
        commands: list[list[Any]] = []
        committed = 0
        try:
            for key, token, result in results:
                command, held = await self.args(url, key, token, result)
                commands.append(command)
                committed += held
            replies = await self._send_through(url, commands)
        finally:  # answered (or lost with the connection): now in the server's own count, or gone
            if committed:
                self._committed[url] -= committed
        refused: list[list[Any]] = []
        for args, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ReplyError):
                log.warning("the server refused %s: %s", args[0], reply)
                self.stats.failures += 1
                self._locked_out(url, args[0], reply)
                if args[0] == protocol.CMD_FILL:
                    why = f"{protocol.ERR_PREFIX}the server refused to store the value: {reply}"
                    refused.append(protocol.fail(args[1], args[2], why))
            elif args[0] == protocol.CMD_FILL and reply == protocol.FILL_STORED:
                self.stats.fills += 1
            elif args[0] == protocol.CMD_FILL and reply == protocol.FILL_NOT_STORED:
                self.stats.oversized += 1
            elif args[0] == protocol.CMD_FILL:
                self.stats.discarded += 1
            else:
                self.stats.failures += 1
        if refused:
            for reply in await self.send(url, refused):
                if isinstance(reply, ReplyError):
                    log.warning("the server refused %s too: %s", protocol.CMD_FAIL, reply)
                    self._locked_out(url, protocol.CMD_FAIL, reply)

    def _locked_out(self, url: str, command: Any, reply: ReplyError) -> None:
        """A refusal for the worker's ACL user (NOPERM: the command, or the key, no longer allowed
        to it) counts as a refused session does: a supervisor reading ``auth_refusals`` acts on it."""
        if _code(reply) not in AUTH_REFUSALS:
            return
        self.stats.auth_refusals += 1
        log.error(
            "%s refused the worker's %s for its credentials (%s; refusal %d): check that the ACL of "
            "the URL's user allows %s on every key of its keyspaces",
            redact_url(url),
            command,
            reply,
            self.stats.auth_refusals,
            ", ".join(protocol.WORKER_COMMANDS),
        )
