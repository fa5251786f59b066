"""Eviction policies for the memory store.

A policy only decides *which key goes next*; the store does the byte accounting and the removal.
Adding a policy means subclassing ``Policy`` and overriding a handful of small hooks, the way
cachetools' caches differ only in ``popitem``.
"""

from __future__ import annotations

from collections import OrderedDict


class Policy:
    """Hooks the memory store calls; the base keeps no order and must be subclassed."""

    name = "base"

    def insert(self, key: str, size: int, cost: float = 0.0) -> None:
        """A new key entered the store (``cost``: compute seconds, where the engine measured it)."""

    def touch(self, key: str) -> None:
        """An existing key was read."""

    def miss(self, key: str) -> None:
        """A lookup found nothing (frequency-based policies still learn the key is wanted)."""

    def remove(self, key: str) -> None:
        """A key left the store (delete, expiry or eviction)."""

    def victim(self) -> str:
        """The key to evict next; called while the store is over budget (the newest key included,
        so an admission policy may answer with the newcomer itself)."""
        raise NotImplementedError

    def victim_for(self, need: int) -> str:
        """The key to evict next when ``need`` bytes must be freed; size-aware admission policies
        use ``need`` to weigh a candidate against every victim it would displace."""
        return self.victim()

    def admit(self, key: str, size: int) -> bool:
        """Whether a new key may push others out; admission-aware policies override this."""
        return True

    def clear(self) -> None:
        """Forget every key."""


class LRUPolicy(Policy):
    """Least recently used first: the baseline every other policy is measured against."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str, size: int, cost: float = 0.0) -> None:
        self._order[key] = None

    def touch(self, key: str) -> None:
        try:  # noqa: SIM105 - a try costs nothing on this hot path; contextlib.suppress does
            self._order.move_to_end(key)
        except KeyError:  # a pinned record: the store keeps it outside any policy
            pass

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self) -> str:
        return next(iter(self._order))

    def clear(self) -> None:
        self._order.clear()


class FIFOPolicy(LRUPolicy):
    """First in, first out: reads do not refresh; cheapest hit path, useful for scan-heavy loads."""

    name = "fifo"

    def touch(self, key: str) -> None:
        return None
