"""Compute keys and store nothing: route, single-flight, batch, run the handler, encode.

This is the engine's lower layer. Whoever needs values computed — the read-through cache above it
(library mode and the Python server) or a worker filling misses for a Valkey/Redis module — calls
``ComputeEngine.compute`` and decides itself where the bytes go. Each key is computed once however
many callers ask while it runs; misses of one keyspace are batched; each keyspace runs its handler in
its own bounded slots (``keymiss.engine.handlers``), so one hung keyspace cannot starve another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from keymiss import codecs
from keymiss.engine.batching import Batcher
from keymiss.engine.failures import ErrorRecord, FailureLog, RememberedErrors, client_text
from keymiss.engine.handlers import Gate, HandlerThreads
from keymiss.engine.singleflight import SingleFlight
from keymiss.errors import (
    BatchResultError,
    BusyError,
    CodecError,
    ComputeTimeoutError,
    HandlerError,
    KeymissError,
    StoreError,
)
from keymiss.keyspace import Keyspace, Registry
from keymiss.options import default_concurrency
from keymiss.stores.base import NO_VERSION, Item, Write

log = logging.getLogger("keymiss")


@dataclass(frozen=True, slots=True)
class Computed:
    """A computed value, encoded: the bytes a client will read, the codec tag, its TTL (the
    keyspace's, or the one the handler chose with ``keymiss.Value``), and the handler seconds it
    cost (cost-aware eviction weighs it)."""

    key: str
    value: bytes
    codec: int
    ttl: float | None
    cost: float
    #: the keyspace's version tag when the computation started
    version: bytes = NO_VERSION

    def item(self) -> Item:
        return Item(self.value, self.codec, None, self.version)

    def write(self, *, nx: bool = False) -> Write:
        return Write(self.key, self.value, self.codec, self.ttl, self.cost, nx, self.version)


class ClosedError(StoreError):
    """The engine is closed: nothing more is computed."""


class _Lane:
    """What one keyspace runs on: its slots, its threads, its batcher, its failure log."""

    def __init__(self, engine: ComputeEngine, ks: Keyspace) -> None:
        o = ks.options
        limit = o.concurrency or (None if ks.is_async else engine.concurrency)
        wait = o.queue_timeout or ks.timeout
        self.gate = Gate(ks.pattern, limit, max_waiting=o.queue, wait=wait)
        self.threads = None if ks.is_async else HandlerThreads(_thread_name(ks.pattern), limit or 1)
        self.batcher = (
            Batcher(functools.partial(engine._run, ks, self), max_size=ks.batch_size, max_wait=ks.batch_wait)
            if ks.batch_size
            else None
        )
        self.failures = FailureLog(ks.pattern)
        self.detail = o.error_detail or engine.error_detail


def _thread_name(pattern: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in pattern)[:24].strip("-") or "keyspace"


class ComputeEngine:
    """Computes keys of registered keyspaces; never touches a store."""

    def __init__(
        self,
        registry: Registry,
        *,
        max_in_flight: int = 10_000,
        concurrency: int | None = None,
        error_detail: str = "message",
    ) -> None:
        self.registry = registry
        self.max_in_flight = max_in_flight
        self.concurrency = concurrency or default_concurrency()
        self.error_detail = error_detail
        self._flights = SingleFlight()
        self._lanes: dict[str, _Lane] = {}
        #: failures kept for ``error_ttl``, bounded in number and bytes (``error_memory``)
        self.errors = RememberedErrors()
        self._in_flight = 0

    def add(self, ks: Keyspace) -> None:
        """Give a newly registered keyspace its slots (the registry already holds it)."""
        self._lanes[ks.pattern] = _Lane(self, ks)

    @property
    def in_flight(self) -> int:
        """Keys being computed, counting those whose handler passed its timeout and still runs."""
        return self._in_flight

    # --- entry points ------------------------------------------------------------------------------
    def start(self, key: str, ks: Keyspace | None = None) -> asyncio.Future[Computed] | None:
        """Join or start the computation of ``key``; ``None`` when no keyspace owns it.

        Raises at once, before anything runs: ``KeyMismatchError`` for a key that does not fit its
        template, a remembered error (``error_ttl``), or ``BusyError`` when too much is in flight.
        """
        if ks is None:
            ks = self.registry.route(key)
            if ks is None:
                return None
        fut = self._flights.get(key)
        if fut is not None:
            ks.stats.coalesced += 1
            return fut
        arg = ks.argument(key)
        if self.errors:
            record = self.errors.get(key, time.monotonic())
            if record is not None:
                raise record.fresh()
        if self._in_flight >= self.max_in_flight:
            raise BusyError(f"too many computations in flight ({self.max_in_flight}); retry later")
        lane = self._lanes[ks.pattern]
        lane.gate.check()
        # Counted from now, not from when the task first runs: a burst of misses in one loop turn
        # must see each other, or the in-flight bound lets them all through.
        ks.stats.in_flight += 1
        self._in_flight += 1
        fut = self._flights.start(key, functools.partial(self._compute, ks, lane, key, arg))
        fut.add_done_callback(functools.partial(self._ended, ks))
        return fut

    def _ended(self, ks: Keyspace, _: object) -> None:
        ks.stats.in_flight -= 1
        self._in_flight -= 1

    async def compute_one(self, key: str, ks: Keyspace | None = None) -> Computed | None:
        """The computed value of one key (raises its error); ``None`` when no keyspace owns it."""
        fut = self.start(key, ks)
        if fut is None:
            return None
        result: Computed = await asyncio.shield(fut)
        return result

    def start_each(self, keys: Sequence[str]) -> list[asyncio.Future[Computed] | BaseException | None]:
        """Start computing ``keys`` (the keys of one keyspace share its batches) and return, per key,
        the future of its value, its error, or ``None`` for a key no keyspace owns: a caller can
        answer each key as soon as it is done, not when the slowest of them is."""
        out: list[asyncio.Future[Computed] | BaseException | None] = []
        for key in keys:
            try:
                out.append(self.start(key))
            except KeymissError as exc:
                out.append(exc)
        return out

    async def compute(self, keys: Sequence[str]) -> list[Computed | BaseException | None]:
        """Compute ``keys`` and store nothing. Each result is the encoded value, the key's error, or
        ``None`` for a key no keyspace owns; the keys of one keyspace share its batches."""
        out: list[Computed | BaseException | None] = [None] * len(keys)
        futures: list[asyncio.Future[Computed]] = []
        where: list[int] = []
        for i, key in enumerate(keys):
            try:
                fut = self.start(key)
            except KeymissError as exc:
                out[i] = exc
                continue
            if fut is not None:
                futures.append(fut)
                where.append(i)
        if futures:
            results = await asyncio.gather(*(asyncio.shield(f) for f in futures), return_exceptions=True)
            for i, result in zip(where, results, strict=True):
                out[i] = result
        return out

    def _remember(self, key: str, record: ErrorRecord) -> None:
        """Keep a failure for ``error_ttl``; expired records go as new ones arrive, and the oldest
        go past the bounds in number and bytes, so a flood of distinct failing keys is bounded."""
        self.errors.put(key, record)

    def sweep(self) -> int:
        """Drop expired remembered failures (the engine's periodic sweep calls this)."""
        return self.errors.sweep(time.monotonic())

    def forget_errors(self, keys: set[str]) -> None:
        """Drop remembered errors of these keys (their values were forgotten)."""
        if self.errors:
            self.errors.forget(keys)

    def forget_errors_matching(self, matches: Callable[[str], bool]) -> None:
        """Drop remembered errors of the keys that ``matches`` (a forget: the next read computes)."""
        if self.errors:
            self.errors.forget_matching(matches)

    # --- lifecycle ------------------------------------------------------------------------------------
    async def drain(self, grace: float) -> bool:
        """Close open batches and wait up to ``grace`` seconds for computations; True if all ended."""
        for lane in self._lanes.values():
            if lane.batcher is not None:
                lane.batcher.flush()
        done = await self._flights.wait_all(grace)
        if not done:
            self._flights.cancel_all()
        return done

    def queued(self, pattern: str) -> int:
        """Computations of a keyspace waiting for one of its handler slots."""
        lane = self._lanes.get(pattern)
        return 0 if lane is None else lane.gate.waiting

    def stuck_handlers(self) -> int:
        """Handler calls that passed their timeout and have not returned."""
        return sum(lane.gate.stuck for lane in self._lanes.values())

    def close(self) -> int:
        """Release handler threads; returns how many are abandoned inside a handler."""
        stuck = self.stuck_handlers()
        for lane in self._lanes.values():
            if lane.threads is not None:
                lane.threads.shutdown()
        return stuck

    # --- running handlers ---------------------------------------------------------------------------
    async def _compute(self, ks: Keyspace, lane: _Lane, key: str, arg: Any) -> Computed:
        try:
            if lane.batcher is not None:
                result = await lane.batcher.submit((key, arg))
            else:
                (result,) = await self._run(ks, lane, [(key, arg)])
            if isinstance(result, BaseException):
                raise result
            return result  # type: ignore[no-any-return]
        except KeymissError as exc:
            if ks.error_ttl and not isinstance(exc, BusyError):
                self._remember(key, ErrorRecord.of(exc, ks.error_ttl))
            raise

    async def _invoke(self, ks: Keyspace, lane: _Lane, payload: Any, n: int) -> Any:
        """Call the handler within its timeout; the caller holds a slot, which this gives back when
        the handler has really returned."""
        if ks.template is not None and not ks.batch_size:
            call = functools.partial(ks.handler, **payload._asdict())
        else:
            call = functools.partial(ks.handler, payload)
        if lane.threads is None:
            try:
                async with asyncio.timeout(ks.timeout):
                    return await call()
            finally:
                lane.gate.release()
        try:
            cf = lane.threads.submit(call)
        except RuntimeError:  # shut down between the check in _run and now
            lane.gate.release()
            raise ClosedError("keymiss is closed") from None
        try:
            async with asyncio.timeout(ks.timeout):
                result = await asyncio.wrap_future(cf)
        except BaseException:
            if cf.done():
                lane.gate.release()
            else:
                self._overdue(ks, lane, cf, n)
            raise
        lane.gate.release()
        return result

    def _overdue(self, ks: Keyspace, lane: _Lane, cf: Any, n: int) -> None:
        """A sync handler outlived its caller: its keys stay in flight, and its slot stays taken,
        until its thread returns."""
        loop = asyncio.get_running_loop()
        lane.gate.stuck += 1
        ks.stats.stuck += 1
        ks.stats.in_flight += n
        self._in_flight += n

        def settle() -> None:
            lane.gate.stuck -= 1
            ks.stats.stuck -= 1
            ks.stats.in_flight -= n
            self._in_flight -= n
            lane.gate.release()

        def returned(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody counts any more
                loop.call_soon_threadsafe(settle)

        cf.add_done_callback(returned)

    async def _run(
        self, ks: Keyspace, lane: _Lane, entries: list[tuple[str, Any]]
    ) -> list[Computed | BaseException]:
        """Run the handler once for ``entries`` and encode each result."""
        n = len(entries)
        keys = [k for k, _ in entries]
        if lane.threads is not None and lane.threads.closed:
            raise ClosedError("keymiss is closed")
        await lane.gate.acquire(ks.stats.mean_call_seconds)
        try:
            version = ks.version_tag()  # what the values are computed under, asked before the call
        except Exception as exc:  # the application's version callable failed: no value is versionless
            lane.gate.release()
            raise self._failed(ks, lane, keys, exc) from exc
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ks.timeout if ks.timeout is not None else None
        try:
            if ks.batch_size:
                values = await self._invoke(ks, lane, [arg for _, arg in entries], n)
                if not isinstance(values, list | tuple) or len(values) != n:
                    got = (
                        f"{len(values)} results"
                        if isinstance(values, list | tuple)
                        else type(values).__name__
                    )
                    raise BatchResultError(
                        f"keyspace {ks.pattern!r}: batch handler returned {got} for {n} inputs",
                        keyspace=ks.pattern,
                    )
            else:
                values = [await self._invoke(ks, lane, entries[0][1], 1)]
        except TimeoutError as exc:
            # on the timer's own clock (uvloop's is in milliseconds, cached per loop turn), so a
            # timeout that fired is never taken for the handler's own TimeoutError
            if deadline is None or loop.time() < deadline - 0.002:
                raise self._failed(ks, lane, keys, exc) from exc  # the handler's own TimeoutError
            ks.stats.timeouts += n
            lane.failures.failed(f"handler did not finish within {ks.timeout:g}s", keys, None)
            raise ComputeTimeoutError(
                f"keyspace {ks.pattern!r}: handler did not finish within {ks.timeout:g}s", keyspace=ks.pattern
            ) from exc
        except ClosedError:
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled (shutdown), not the handler failing
            raise self._failed(ks, lane, keys, exc) from exc
        except BaseException as exc:  # SystemExit, KeyboardInterrupt from a handler fail its keys only
            raise self._failed(ks, lane, keys, exc) from exc
        elapsed = time.perf_counter() - started
        results: list[Computed | BaseException] = []
        computed = 0
        for key, value in zip(keys, values, strict=True):
            if isinstance(value, BaseException):
                results.append(self._failed(ks, lane, [key], value, one=True))
                continue
            ttl = ks.ttl
            if isinstance(value, codecs.Value):  # the handler chose this value's own time to live
                ttl = ks.ttl if value.ttl is None else value.ttl
                value = value.value
            try:
                data, tag = codecs.encode(value, ks.codec)
            except CodecError as exc:
                ks.stats.errors += 1
                lane.failures.failed("the handler's value cannot be encoded", [key], exc)
                results.append(CodecError(f"keyspace {ks.pattern!r}: {exc}"))
                continue
            results.append(Computed(key, data, tag, ttl, elapsed / n, version))
            computed += 1
        ks.stats.observe(elapsed, computed)
        return results

    def _failed(
        self, ks: Keyspace, lane: _Lane, keys: list[str], exc: BaseException, *, one: bool = False
    ) -> KeymissError:
        """Count and log a handler failure; the error its callers get."""
        ks.stats.errors += len(keys)
        if isinstance(exc, KeymissError):  # a deliberate answer (unknown context): no traceback
            lane.failures.failed(
                f"handler refused: {client_text(exc, 'message')}", keys, None, logging.WARNING
            )
        else:
            lane.failures.failed("handler failed", keys, exc)
        if isinstance(exc, KeymissError) and lane.detail == "message":  # deliberate and clear: as is
            return exc
        scope = " for this key" if one else ""
        err = HandlerError(
            f"keyspace {ks.pattern!r}: handler failed{scope}: {client_text(exc, lane.detail)}",
            keyspace=ks.pattern,
        )
        err.__cause__ = exc
        return err
