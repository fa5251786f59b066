"""The in-process store, bounded by bytes.

The budget covers keys, values and a per-entry overhead measured on CPython (the dict slot, the entry
object and the two objects it holds), so ``max_memory`` is close to what the process really spends.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from keymiss.sizes import format_size
from keymiss.stores.base import (
    PINNED_PREFIX,
    EvictHook,
    Item,
    LocalStore,
    StoreInfo,
    Write,
    superseded_version,
)
from keymiss.stores.eviction import Policy
from keymiss.stores.policies import make_policy
from keymiss.stores.scanindex import ScanIndex

#: Bytes a stored entry costs beyond its key and value: the dict slot, the Item (3 slots), the key
#: str and value bytes object headers, and the eviction policy's own node. Measured with
#: tracemalloc in tests/test_memory_store.py::test_overhead_estimate_is_honest.
ENTRY_OVERHEAD = 340


def key_bytes(key: str) -> int:
    """Bytes a key occupies in the budget (its UTF-8 length, exact for ASCII without encoding)."""
    return len(key) if key.isascii() else len(key.encode("utf-8", "surrogateescape"))


class MemoryStore(LocalStore):
    """Keys and values in a dict, evicted by a pluggable policy when the byte budget is reached."""

    def __init__(
        self,
        max_memory: int,
        *,
        eviction: str | Policy = "worth",
        clock: Callable[[], float] = time.time,
        on_evict: EvictHook | None = None,
    ) -> None:
        super().__init__(on_evict)
        self.max_bytes = int(max_memory)
        self.policy = make_policy(eviction, self.max_bytes)
        self._touch = self.policy.touch
        self._miss = self.policy.miss
        self.url = "memory"
        self._data: dict[str, Item] = {}
        self._sizes: dict[str, int] = {}
        self._bytes = 0
        self._pinned_bytes = 0
        self._pinned_keys = 0
        self.clock = clock
        self._expiry: list[tuple[float, str]] = []  # heap; stale rows are skipped
        self._index = ScanIndex()  # SCAN's stateless cursors, over every key but keymiss's records

    # --- reads ------------------------------------------------------------------------------------
    def get_now(self, key: str) -> Item | None:
        item = self._data.get(key)
        if item is None:
            self._miss(key)
            return None
        if item.expires_at is not None and item.expires_at <= self.clock():
            self._remove(key)
            self.expired += 1
            return None
        self._touch(key)
        return item

    def fits(self, key: str, size: int) -> bool:
        return key_bytes(key) + size + ENTRY_OVERHEAD <= self.max_bytes

    # --- writes -----------------------------------------------------------------------------------
    def _set(self, writes: Sequence[Write], nx: bool, xx: bool, keep_ttl: bool) -> list[bool]:
        now = self.clock()
        return [self._set_one(w, nx or w.nx, xx, keep_ttl, now) for w in writes]

    def _set_one(self, w: Write, nx: bool, xx: bool, keep_ttl: bool, now: float) -> bool:
        old = self.get_now(w.key) if (nx or xx or keep_ttl) else self._data.get(w.key)
        if (nx and old is not None and not superseded_version(old, w)) or (xx and old is None):
            return False
        if keep_ttl and old is not None:
            expires_at = old.expires_at
        else:
            expires_at = None if w.ttl is None else now + w.ttl
        size = key_bytes(w.key) + len(w.value) + ENTRY_OVERHEAD
        if size > self.max_bytes or not self.policy.admit(w.key, size):
            # As Redis refuses a write over maxmemory (-OOM): declined, and the old value stays.
            return False
        old_size = self._sizes.get(w.key, 0)
        if old is not None:
            self._remove(w.key)
        self._insert(w.key, Item(w.value, w.codec, expires_at, w.version), size, w.cost)
        while self._bytes > self.max_bytes:
            if len(self._data) == self._pinned_keys:  # only pinned records left: refuse the newcomer
                self._remove(w.key)
                break
            victim = self.policy.victim_for(self._bytes - self.max_bytes)
            self._remove(victim)
            self.evictions += 1
            if self.on_evict is not None and victim != w.key:
                self.on_evict(victim)
        if w.key not in self._data:  # refused (the policy preferred what it holds, or no room)
            if old is not None:  # a declined write leaves the old value where it was (it fits:
                self._insert(w.key, old, old_size, 0.0)  # it did before, and others went since)
                if old.expires_at is not None:
                    heapq.heappush(self._expiry, (old.expires_at, w.key))
            return False
        if expires_at is not None:
            heapq.heappush(self._expiry, (expires_at, w.key))
        return True

    def _insert(self, key: str, item: Item, size: int, cost: float) -> None:
        self._data[key] = item
        self._sizes[key] = size
        self._bytes += size
        if key.startswith(PINNED_PREFIX):
            self._pinned_bytes += size
            self._pinned_keys += 1
        else:
            self.policy.insert(key, size, cost)
            self._index.add(key)

    def _remove(self, key: str) -> None:
        if self._data.pop(key, None) is not None:
            size = self._sizes.pop(key)
            self._bytes -= size
            if key.startswith(PINNED_PREFIX):
                self._pinned_bytes -= size
                self._pinned_keys -= 1
            else:
                self.policy.remove(key)
                self._index.discard(key)

    def _delete(self, keys: Iterable[str]) -> int:
        n = 0
        for key in keys:
            if self.get_now(key) is not None:
                self._remove(key)
                n += 1
        return n

    def _set_expiry(self, key: str, expires_at: float | None) -> bool:
        item = self.get_now(key)
        if item is None:
            return False
        item.expires_at = expires_at
        if expires_at is not None:
            heapq.heappush(self._expiry, (expires_at, key))
        return True

    async def sweep(self, limit: int = 1000) -> int:
        now = self.clock()
        heap, n = self._expiry, 0
        while heap and heap[0][0] <= now and n < limit:
            _, key = heapq.heappop(heap)
            item = self._data.get(key)
            if item is not None and item.expires_at is not None and item.expires_at <= now:
                self._remove(key)
                self.expired += 1
                n += 1
        if len(heap) > 2 * len(self._data) + 1024:  # overwritten TTLs leave stale rows: compact
            self._expiry = [(t, k) for t, k in heap if (i := self._data.get(k)) and i.expires_at == t]
            heapq.heapify(self._expiry)
        return n

    async def flush(self) -> None:
        self._data.clear()
        self._sizes.clear()
        self._expiry.clear()
        self._bytes = 0
        self._pinned_bytes = 0
        self._pinned_keys = 0
        self.policy.clear()
        self._index.clear()

    async def close(self) -> None:
        await self.flush()

    # --- introspection -------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        return self._bytes

    def _len(self) -> int:
        return len(self._data) - self._pinned_keys

    def _scan_from(self, cursor: int, count: int) -> tuple[list[str], int]:
        data, now = self._data, self.clock()

        def alive(key: str) -> bool:  # no policy touch: a SCAN is not a use of the key
            item = data.get(key)
            return item is not None and (item.expires_at is None or item.expires_at > now)

        return self._index.scan(cursor, count, alive)

    def _scan_start(self) -> Any:
        return (list(self._data), 0)

    def _scan_step(self, state: Any, count: int) -> tuple[list[str], Any, bool]:
        snapshot, pos = state
        chunk = [k for k in snapshot[pos : pos + count] if self.get_now(k) is not None]
        pos += count
        return chunk, (snapshot, pos), pos >= len(snapshot)

    def info(self) -> StoreInfo:
        return StoreInfo(
            store=self.url,
            used_bytes=self._bytes,
            max_bytes=self.max_bytes,
            keys=len(self._data),
            evictions=self.evictions,
            expired=self.expired,
            eviction_policy=self.policy.name,
            extra={"used_human": format_size(self._bytes), "pinned_bytes": self._pinned_bytes},
        )
