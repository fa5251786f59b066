"""Per-keyspace handler slots: a bounded gate and the threads that run sync handlers.

Each keyspace owns its slots, so a handler that hangs exhausts only its own keyspace. A slot is held
until the handler really returns — a sync handler that outlives its timeout keeps its thread, and
its slot, until the thread comes back — which is what keeps the in-flight counts honest. Waiting for
a slot is bounded in count and time and ends in ``BusyError``; the handler's own timeout starts only
when it holds a slot, so time spent queueing is never reported as a slow handler.

The threads are daemon threads outside ``concurrent.futures``' exit hook: a handler stuck forever
cannot keep the process from exiting once shutdown's grace period is over.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

from keymiss.errors import BusyError


class Gate:
    """At most ``limit`` holders; at most ``max_waiting`` waiters, each for at most ``wait`` seconds."""

    def __init__(self, name: str, limit: int | None, *, max_waiting: int, wait: float | None) -> None:
        self.name = name
        self.limit = limit
        self.max_waiting = max_waiting
        self.wait = wait
        self.held = 0
        #: slots held by handlers that passed their timeout and have not returned yet
        self.stuck = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def check(self) -> None:
        """Fail at once when waiting could not help: every slot is held by a handler past its timeout."""
        if self.limit is not None and self.stuck >= self.limit:
            raise BusyError(
                f"keyspace {self.name!r}: all {self.limit} handler slots are held by handlers past their "
                "timeout; retry later"
            )

    async def acquire(self, expected_seconds: float = 0.0) -> None:
        """Take a slot, waiting in line if none is free. ``expected_seconds`` is the mean handler
        time: a caller whose place in line already exceeds the wait bound is refused at once."""
        if self.limit is None or (self.held < self.limit and not self._waiters):
            self.held += 1
            return
        self.check()
        if len(self._waiters) >= self.max_waiting:
            raise BusyError(
                f"keyspace {self.name!r}: {len(self._waiters)} computations already wait for a handler "
                "slot; retry later"
            )
        if self.wait is not None and (len(self._waiters) + 1) * expected_seconds / self.limit > self.wait:
            raise BusyError(
                f"keyspace {self.name!r}: the queue for a handler slot is longer than {self.wait:g}s; "
                "retry later"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait)
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over as we gave up: pass it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                raise BusyError(
                    f"keyspace {self.name!r}: no handler slot became free within {self.wait:g}s; retry later"
                ) from None
            raise

    def release(self) -> None:
        """Give the slot to the first live waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.held -= 1


class HandlerThreads:
    """Daemon threads for one keyspace's sync handler; grows up to ``size`` threads on demand."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("handler threads are shut down")
            self._queue.put((fn, fut))
            if self._idle == 0 and len(self._threads) < self.size:
                t = threading.Thread(
                    target=self._work, name=f"keymiss-{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1
        return fut

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, fut = job
            ok, outcome = True, None
            if fut.set_running_or_notify_cancel():
                try:
                    outcome = fn()
                except BaseException as exc:
                    ok, outcome = False, exc
            # Count this thread idle before the caller learns the outcome: the caller may hand us
            # the next job at once, and must not start a thread beyond the keyspace's size for it.
            with self._lock:
                self._idle += 1
            if fut.running():
                if ok:
                    fut.set_result(outcome)
                else:
                    fut.set_exception(outcome)
            del job, fn, fut, outcome

    @property
    def closed(self) -> bool:
        return self._closed

    def shutdown(self) -> None:
        """Let idle threads exit; threads stuck in a handler are left behind (they are daemons)."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
