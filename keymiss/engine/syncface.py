"""The synchronous face: keymiss from scripts, notebooks, WSGI apps and threads.

The engine is asyncio: its single-flight, batches and slots belong to one event loop, the loop the
``Keymiss`` was started on. A synchronous caller cannot ``await``; it hands the call to that loop
(``asyncio.run_coroutine_threadsafe``) and waits for the answer in its own thread. When no loop
runs the ``Keymiss`` yet, the first synchronous call starts one in a daemon thread of its own
(``LoopThread``), so every thread of a program shares one engine and N threads missing one key
still compute it once. A per-call loop (``asyncio.run`` on each call) could not do that: each call
would have its own single-flight.

A synchronous call made *on* the ``Keymiss``'s own loop (a coroutine running there, calling a
synchronous function that waits) would wait for a loop it is blocking: it is refused with a clear
error instead of hanging. A call from any other loop — a notebook's, whose cells run inside a
running loop — waits in that loop's thread while the ``Keymiss``'s thread does the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, TypeVar

from keymiss.errors import KeymissError, StoreError

T = TypeVar("T")

#: where a ``Keymiss`` keeps the loop thread this module started for it
EXTENSION = "keymiss.sync"

#: where a ``Keymiss`` keeps the lock that gives it one loop however many threads call at once
#: (one lock per ``Keymiss``: a start hook may use another ``Keymiss`` synchronously)
STARTING = "keymiss.sync.starting"

#: where a ``Keymiss`` keeps the calls its synchronous face is waiting for (``Calls``)
CALLS = "keymiss.sync.calls"


class LoopThread:
    """An event loop running forever in a daemon thread (a forgotten ``close`` never keeps the
    interpreter from exiting)."""

    def __init__(self, name: str = "keymiss-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
            # calls handed over as the loop stopped: cancelled, so their callers hear of it
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
        finally:
            self.loop.close()

    def stop(self) -> None:
        """Stop the loop and wait for its thread (not from the thread itself)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join()


class Calls:
    """The synchronous calls a ``Keymiss``'s face has handed to its loop and not seen answered:
    when ``close`` ends the loop thread, each still waiting gets a clear error instead of waiting
    for a loop that will never run again, and calls made after that are refused."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: set[Future[Any]] = set()
        self.closed = False

    def add(self, submit: Callable[[], Future[T]]) -> Future[T]:
        with self.lock:
            if self.closed:
                raise StoreError("keymiss is closed")
            fut = submit()
            self.waiting.add(fut)
        fut.add_done_callback(self._done)
        return fut

    def _done(self, fut: Future[Any]) -> None:
        with self.lock:
            self.waiting.discard(fut)

    def close(self, loop_ended: bool) -> None:
        """No more calls; those still waiting fail, if the loop that would answer them ended."""
        with self.lock:
            self.closed = True
            waiting, self.waiting = (self.waiting, set()) if loop_ended else (set(), self.waiting)
        for fut in waiting:
            with contextlib.suppress(InvalidStateError):  # answered meanwhile
                fut.set_exception(StoreError("keymiss was closed before this call was answered"))


#: the ``Keymiss`` objects whose loop is a ``LoopThread`` of this module: a forked child has no
#: such thread, and starts its own on first use (``os.register_at_fork`` below)
_THREADED: weakref.WeakSet[Any] = weakref.WeakSet()


_FORKED = (
    "this process was forked after keymiss opened its store ({}), which a child cannot share or "
    "reopen safely: start keymiss in each child (gunicorn: no --preload, or open it in a post_fork "
    "hook), or use a memory or Redis store"
)


def _after_fork_in_child() -> None:
    for km in list(_THREADED):
        if not isinstance(km.extensions.get(EXTENSION), LoopThread):
            continue
        km.extensions.pop(EXTENSION, None)
        km.extensions[STARTING] = threading.Lock()  # another thread may have held it at the fork
        calls = km.extensions.get(CALLS)
        km.extensions[CALLS] = Calls()
        if calls is not None and calls.closed:
            km.extensions[CALLS].closed = True
        km.after_fork(_FORKED)
    _THREADED.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _calls(km: Any) -> Calls:
    calls = km.extensions.get(CALLS)
    if calls is None:
        calls = km.extensions.setdefault(CALLS, Calls())  # setdefault is atomic
    return calls  # type: ignore[no-any-return]


def home_loop(km: Any) -> asyncio.AbstractEventLoop:
    """The loop ``km`` runs on; when none does yet, a ``LoopThread`` started for it, on which
    ``km`` is started (its store opened, its start hooks run) before this returns. A start that
    fails (a start hook raising) leaves the thread for the next call, which starts again."""
    loop: asyncio.AbstractEventLoop | None = km.loop
    if loop is not None:
        return loop
    with km.extensions.setdefault(STARTING, threading.Lock()):  # setdefault is atomic
        if km.loop is None:
            if _calls(km).closed:
                raise StoreError("keymiss is closed")
            runner = km.extensions.get(EXTENSION)
            if not isinstance(runner, LoopThread) or runner.loop.is_closed():
                runner = LoopThread()
                km.extensions[EXTENSION] = runner
                _THREADED.add(km)
            asyncio.run_coroutine_threadsafe(km.start(), runner.loop).result()
        return km.loop  # type: ignore[no-any-return]


def hand_over(km: Any, grace: float = 10.0) -> None:
    """Give a ``Keymiss`` this module started on a ``LoopThread`` (a synchronous call before a
    server ran: an app warming its cache at import) back to whoever starts it next, on their own
    loop: its computations finish (up to ``grace`` seconds), its loop thread ends, and the next
    ``start`` (the server's, the module worker's) makes that loop its home. Synchronous calls from
    other threads go to that loop from then on. Does nothing for a ``Keymiss`` started otherwise."""
    runner = km.extensions.get(EXTENSION)
    if not isinstance(runner, LoopThread) or km.loop is not runner.loop:
        return
    with km.extensions.setdefault(STARTING, threading.Lock()):
        if runner.loop.is_running():
            asyncio.run_coroutine_threadsafe(km.park(grace), runner.loop).result()
        km.extensions.pop(EXTENSION, None)
        _THREADED.discard(km)
        runner.stop()


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_ON_ITS_LOOP = (
    "a synchronous keymiss call was made on the event loop keymiss runs on, which it would "
    "block while waiting for it: await the async API there (`await km.get(key)`, or "
    "`await fn.acall(...)` for a cached function)"
)


def submit(km: Any, call: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
    """Run ``await call(*args)`` on ``km``'s loop from another thread (or another loop): its
    concurrent future. Refused, never a hang, from ``km``'s own loop or once that loop is gone."""
    loop = home_loop(km)
    if _running() is loop:
        raise KeymissError(_ON_ITS_LOOP)

    def hand_over() -> Future[T]:
        if loop.is_closed() or not loop.is_running():
            raise StoreError(
                "keymiss runs on an event loop that is no longer running (the loop that started it "
                "has ended): keep using it from that loop, or use one Keymiss per loop"
            )
        return asyncio.run_coroutine_threadsafe(call(*args), loop)  # type: ignore[arg-type]

    return _calls(km).add(hand_over)


def wait(km: Any, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await call(*args)`` on ``km``'s loop, waited for in this thread; its error raised here."""
    try:
        return submit(km, call, *args).result()
    except CancelledError:
        raise StoreError(
            "keymiss was closed while this call was being answered (its computation was "
            "cancelled when the close's grace period ended)"
        ) from None


async def on_home(km: Any, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await call(*args)`` from any loop: directly on ``km``'s own loop (or when it runs on none
    yet: this loop becomes its loop, one loop only however many call at once), else handed over
    to ``km``'s loop and awaited here."""
    here = asyncio.get_running_loop()
    if km.loop is None:
        with km.extensions.setdefault(STARTING, threading.Lock()):
            if km.loop is None:
                km.loop = here
    if km.loop is here:
        return await call(*args)
    return await asyncio.wrap_future(submit(km, call, *args))


class SyncKeymiss:
    """A ``Keymiss`` with blocking methods, for code that cannot ``await``: scripts, notebooks,
    WSGI apps, threads. Every call runs on the ``Keymiss``'s own event loop — the one that started
    it, or a daemon thread this face starts on first use — so all threads share one engine and
    one single-flight. Safe to call from any thread and from inside another running loop (a
    notebook); refused (``KeymissError``) from the ``Keymiss``'s own loop, where waiting would
    block the loop it waits for.

    ``close()`` (or leaving a ``with`` block) drains and closes the ``Keymiss`` and ends the loop
    thread, if this face started one.
    """

    def __init__(self, km: Any) -> None:
        self.km = km

    # registration is synchronous already: these only save reaching for ``.km``
    def keyspace(self, pattern: str, **options: Any) -> Callable[[Any], Any]:
        """``Keymiss.keyspace``: register a function as the source of a keyspace's values."""
        return self.km.keyspace(pattern, **options)  # type: ignore[no-any-return]

    def cached(self, template: str, **options: Any) -> Callable[[Any], Any]:
        """``Keymiss.cached``: a function whose calls go through the cache."""
        return self.km.cached(template, **options)  # type: ignore[no-any-return]

    def start(self) -> SyncKeymiss:
        """Start the engine now (else the first call does)."""
        home_loop(self.km)
        return self

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await fn(*args)`` on the engine's loop: any coroutine function of the async API."""
        return wait(self.km, fn, *args)

    def get(self, key: str) -> Any:
        """The value for ``key``, computed on a miss (``Keymiss.get``)."""
        return wait(self.km, self.km.get, key)

    def get_many(self, keys: Sequence[str], *, return_exceptions: bool = False) -> list[Any]:
        """Values for ``keys`` in order (``Keymiss.get_many``)."""

        async def many() -> list[Any]:
            return await self.km.get_many(keys, return_exceptions=return_exceptions)  # type: ignore[no-any-return]

        return wait(self.km, many)

    def set(self, key: str, value: Any, *, ttl: float | None = None) -> bool:
        """Store ``value`` (``Keymiss.set``)."""

        async def put() -> bool:
            return await self.km.set(key, value, ttl=ttl)  # type: ignore[no-any-return]

        return wait(self.km, put)

    def delete(self, *keys: str) -> int:
        done: int = wait(self.km, self.km.delete, *keys)
        return done

    def exists(self, *keys: str) -> int:
        done: int = wait(self.km, self.km.exists, *keys)
        return done

    def ttl(self, key: str) -> int:
        done: int = wait(self.km, self.km.ttl, key)
        return done

    def pttl(self, key: str) -> int:
        done: int = wait(self.km, self.km.pttl, key)
        return done

    def expire(self, key: str, seconds: float) -> bool:
        done: bool = wait(self.km, self.km.expire, key, seconds)
        return done

    def forget(self, pattern: str) -> int:
        """Drop every cached value whose key matches a glob (``Keymiss.forget``)."""
        done: int = wait(self.km, self.km.forget, pattern)
        return done

    def forget_tag(self, tag: str) -> int:
        """Drop every cached value whose key carries a keyspace's tag (``Keymiss.forget_tag``)."""
        done: int = wait(self.km, self.km.forget_tag, tag)
        return done

    def stats(self) -> dict[str, Any]:
        """``Keymiss.stats``, read on the engine's loop (a consistent snapshot)."""

        async def read() -> dict[str, Any]:
            return self.km.stats()  # type: ignore[no-any-return]

        return wait(self.km, read)

    def close(self, grace: float = 10.0) -> None:
        """Close the ``Keymiss`` (running computations get ``grace`` seconds) and end the loop
        thread this face started, if any. Calls still waiting then get ``StoreError``, as do
        calls made afterwards. Refused on the ``Keymiss``'s own loop (``await km.close()`` there)."""
        loop = self.km.loop
        if loop is not None and _running() is loop:
            raise KeymissError(_ON_ITS_LOOP.replace("call was made", "close was made"))
        calls = _calls(self.km)
        runner = self.km.extensions.get(EXTENSION)
        try:
            if loop is not None and loop.is_running() and not calls.closed:
                wait(self.km, self.km.close, grace)
        finally:
            calls.close(loop_ended=False)  # no call from now on
        if isinstance(runner, LoopThread):
            self.km.extensions.pop(EXTENSION, None)
            runner.stop()
            calls.close(loop_ended=True)

    def hand_over(self, grace: float = 10.0) -> None:
        """Give the ``Keymiss`` this face started on a thread of its own to the next loop that
        starts it (a server's): see ``hand_over``."""
        hand_over(self.km, grace)

    def __enter__(self) -> SyncKeymiss:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncKeymiss {self.km!r}>"
