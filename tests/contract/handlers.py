"""The keyspace function every scenario registers: it counts its runs and can be held or failed."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable

from keymiss import Value

from ..support import Gate


class Fn:
    """A keyspace's function: counts its calls per key and answers ``<key>#<n>`` (its n-th run
    for that key). ``hold()`` makes the following runs wait on a fresh ``Gate`` until the
    scenario opens it; ``fail`` makes them raise; ``delay`` makes them take that long; a key in
    ``ttls`` is answered as ``Value(answer, ttl=ttls[key])``, its own time to live."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.calls: Counter[str] = Counter()
        self.gate: Gate | None = None
        self.fail = False
        self.delay = delay
        self.gates: list[Gate] = []
        self.ttls: dict[str, float] = {}

    def hold(self) -> Gate:
        self.gate = Gate()
        self.gates.append(self.gate)
        return self.gate

    def release(self) -> None:
        """Open every gate and hold nothing more (a scenario's end: no handler is left waiting)."""
        self.gate = None
        for g in self.gates:
            g.open()

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    async def __call__(self, key: str) -> str | Value:
        self.calls[key] += 1
        n = self.calls[key]
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.gate is not None:
            await self.gate.hold(key)
        if self.fail:
            raise ValueError(f"no value for {key} (run {n})")
        if key in self.ttls:
            return Value(f"{key}#{n}", ttl=self.ttls[key])
        return f"{key}#{n}"


def handler(fn: Fn) -> Callable[[str], Awaitable[str | Value]]:
    """``fn`` as a plain coroutine function (how a keyspace knows a handler is async), naming
    ``fn`` so the front end can release its gates before closing."""

    async def compute(key: str) -> str | Value:
        return await fn(key)

    compute.fn = fn  # type: ignore[attr-defined]
    return compute
