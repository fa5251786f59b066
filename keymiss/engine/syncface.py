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
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from keymiss.errors import KeymissError, StoreError

T = TypeVar("T")

#: where a ``Keymiss`` keeps the loop thread this module started for it
EXTENSION = "keymiss.sync"

#: where a ``Keymiss`` keeps the lock that gives it one loop however many threads call at once
#: (one lock per ``Keymiss``: a start hook may use another ``Keymiss`` synchronously)
STARTING = "keymiss.sync.starting"


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
        finally:
            self.loop.close()

    def stop(self) -> None:
        """Stop the loop and wait for its thread (not from the thread itself)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join()


def home_loop(km: Any) -> asyncio.AbstractEventLoop:
    """The loop ``km`` runs on; when none does yet, a ``LoopThread`` started for it, on which
    ``km`` is started (its store opened, its start hooks run) before this returns."""
    loop: asyncio.AbstractEventLoop | None = km.loop
    if loop is not None:
        return loop
    with km.extensions.setdefault(STARTING, threading.Lock()):  # setdefault is atomic
        if km.loop is None:
            runner = LoopThread()
            km.extensions[EXTENSION] = runner
            try:
                asyncio.run_coroutine_threadsafe(km.start(), runner.loop).result()
            except BaseException:
                km.extensions.pop(EXTENSION, None)
                runner.stop()
                raise
        return km.loop  # type: ignore[no-any-return]


def _running() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def submit(km: Any, call: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
    """Run ``await call(*args)`` on ``km``'s loop from another thread (or another loop): its
    concurrent future. Refused, never a hang, from ``km``'s own loop or once that loop is gone."""
    loop = home_loop(km)
    if _running() is loop:
        raise KeymissError(
            "a synchronous keymiss call was made on the event loop keymiss runs on, which it would "
            "block while waiting for it: await the async API there (`await km.get(key)`, or "
            "`await fn.acall(...)` for a cached function)"
        )
    if loop.is_closed() or not loop.is_running():
        raise StoreError(
            "keymiss runs on an event loop that is no longer running (the loop that started it has "
            "ended): keep using it from that loop, or use one Keymiss per loop"
        )
    return asyncio.run_coroutine_threadsafe(call(*args), loop)  # type: ignore[arg-type]


def wait(km: Any, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await call(*args)`` on ``km``'s loop, waited for in this thread; its error raised here."""
    return submit(km, call, *args).result()


async def on_home(km: Any, call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await call(*args)`` from any loop: directly on ``km``'s own loop (or when it runs on none
    yet: this loop becomes its loop), else handed over to ``km``'s loop and awaited here."""
    home = km.loop
    if home is None or home is asyncio.get_running_loop():
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
        thread this face started, if any."""
        runner = self.km.extensions.get(EXTENSION)
        loop = self.km.loop
        if loop is not None and loop.is_running() and _running() is not loop:
            wait(self.km, self.km.close, grace)
        if isinstance(runner, LoopThread):
            self.km.extensions.pop(EXTENSION, None)
            runner.stop()

    def __enter__(self) -> SyncKeymiss:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncKeymiss {self.km!r}>"
