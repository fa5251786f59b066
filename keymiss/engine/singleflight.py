"""One computation per key in flight; every caller of that key shares its outcome.

Callers await the shared future through ``asyncio.shield``: a caller that gives up (a client
disconnects, a request is cancelled) leaves the computation running for everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class SingleFlight:
    """Maps a key to the future of its running computation."""

    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, key: str) -> bool:
        return key in self._calls

    def get(self, key: str) -> asyncio.Future[Any] | None:
        return self._calls.get(key)

    def start(self, key: str, compute: Callable[[], Awaitable[Any]]) -> asyncio.Future[Any]:
        """Begin computing ``key``; the caller must have checked that nothing is in flight for it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        # Mark the outcome as retrieved even when every waiter left, so an error nobody waited for
        # does not log "exception was never retrieved".
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._calls[key] = fut
        task = loop.create_task(self._run(key, fut, compute))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def _run(self, key: str, fut: asyncio.Future[Any], compute: Callable[[], Awaitable[Any]]) -> None:
        try:
            result = await compute()
        except asyncio.CancelledError:
            if not fut.done():
                fut.set_exception(asyncio.CancelledError(f"computation of {key!r} was cancelled"))
            raise
        except BaseException as exc:  # every waiter gets the error, whatever it is
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(result)
        finally:
            if self._calls.get(key) is fut:
                del self._calls[key]

    async def wait_all(self, grace: float | None) -> bool:
        """Wait for running computations (graceful shutdown); True if all finished in time."""
        if not self._tasks:
            return True
        _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        return not pending

    def cancel_all(self) -> None:
        """Cancel every computation; a waiter whose computation never began gets the error too."""
        for task in list(self._tasks):
            task.cancel()
        for key, fut in list(self._calls.items()):
            if not fut.done():
                fut.set_exception(asyncio.CancelledError(f"computation of {key!r} was cancelled"))
            del self._calls[key]
