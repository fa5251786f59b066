"""Dynamic batching: misses for different keys of one keyspace gathered into one call.

A batch closes when it holds ``max_size`` items or ``max_wait`` seconds after its first item,
whichever comes first, so a lone request waits at most ``max_wait`` and a burst fills the model.
The batch function must return one result per input; anything else fails every caller of that
batch with ``BatchResultError`` rather than handing someone another key's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from keymiss.errors import BatchResultError

#: The batch function receives the items and returns one result per item; a result that is an
#: exception instance fails only that item.
BatchFn = Callable[[list[Any]], Awaitable[list[Any]]]


class Batcher:
    """Collects items into batches and runs ``fn`` on each batch as a task."""

    def __init__(self, fn: BatchFn, *, max_size: int, max_wait: float) -> None:
        self._fn = fn
        self.max_size = max_size
        self.max_wait = max_wait
        self._items: list[tuple[Any, asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0

    def submit(self, item: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._items.append((item, fut))
        if len(self._items) >= self.max_size:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self.flush)
        return fut

    def flush(self) -> None:
        """Close the current batch now (also called by the timer)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, self._items = self._items, []
        self.batches += 1
        task = asyncio.get_running_loop().create_task(self._run(items))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, items: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._fn([item for item, _ in items])
        except BaseException as exc:
            for _, fut in items:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if len(results) != len(items):
            err = BatchResultError(f"batch function returned {len(results)} results for {len(items)} inputs")
            results = [err] * len(items)
        for (_, fut), result in zip(items, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
