"""How many commands the Redis store has on the wire at once, and what the rest do: they queue.

redis-py's default asyncio pool fails a command at once (``MaxConnectionsError: Too many
connections``) when all its connections are busy, so a burst of clients failed against a healthy
Redis. The store instead holds every command behind one gate of ``connections`` places; the rest
wait their turn, and only one that waits longer than ``wait`` seconds fails, with an error that says
the store is busy and which setting sizes it. Its clients' pools block too (``BlockingConnectionPool``),
with room for the connections a pub/sub listener keeps, so the pool itself never fails a command
the gate let through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from keymiss.errors import BusyError

#: Connections of a pool beyond the gate's places: pub/sub listeners (lease completions, the near
#: cache's invalidations) each keep one for as long as they listen.
LISTENERS = 4
DEFAULT_CONNECTIONS = 32
DEFAULT_WAIT = 10.0
#: seconds a sent command waits for Redis's reply: generous, as a busy Redis is slow, not gone
DEFAULT_REPLY_TIMEOUT = 30.0


class StoreGate:
    """At most ``size`` store commands at once; the others queue for up to ``wait`` seconds."""

    def __init__(self, size: int = DEFAULT_CONNECTIONS, wait: float = DEFAULT_WAIT) -> None:
        self.size = size
        self.wait = wait
        self._places = asyncio.Semaphore(size)
        self.queued = 0  # commands waiting for a place now

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """A place on the wire for one command (a pipeline counts as one)."""
        places = self._places
        if places.locked():
            self.queued += 1
            try:
                async with asyncio.timeout(self.wait):
                    await places.acquire()
            except TimeoutError:
                raise BusyError(
                    f"the redis store is busy: all {self.size} of its connections stayed in use for "
                    f"{self.wait:g}s (size them with --store-connections / --store-wait-seconds)"
                ) from None
            finally:
                self.queued -= 1
        else:
            await places.acquire()
        try:
            yield
        finally:
            places.release()


def blocking_client(url: str, gate: StoreGate, **options: Any) -> aioredis.Redis:
    """A standalone client whose pool waits for a free connection instead of failing: the gate
    keeps the commands within ``gate.size``, the pool has ``LISTENERS`` more for pub/sub."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=gate.size + LISTENERS, timeout=gate.wait, **options
    )
    return aioredis.Redis.from_pool(pool)
