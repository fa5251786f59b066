"""Stateless SCAN cursors for the in-process store, by Redis's reverse-binary iteration.

A cursor the server must remember can be forgotten (Redis clients start thousands of scans and
abandon most), and a forgotten cursor either ends a scan early or keeps memory for ever. Redis's
answer needs no memory at all: keys sit in a power-of-two table of buckets by hash, and the cursor
is the next bucket with its bits reversed. Counting in reversed bits visits a bucket's "children"
in a grown table, and its "parent" in a shrunk one, only after everything before it, so every key
present for the whole scan is returned at least once however the table is resized in between
(Pieter Noordhuis's dictScan, in Redis's dict.c).

A bucket holds nothing, one key (the common case: no list object), or a list of keys, so the index
costs about two table slots per key.
"""

from __future__ import annotations

from collections.abc import Callable

_M64 = (1 << 64) - 1
MIN_SIZE = 16


def _rev64(v: int) -> int:
    return int(f"{v:064b}"[::-1], 2)


class ScanIndex:
    """The keys of a store in hash buckets, for SCAN; ``hash(key)`` is stable within a process,
    which is as long as a cursor lives."""

    __slots__ = ("_mask", "_n", "_table")

    def __init__(self) -> None:
        self._table: list[str | list[str] | None] = [None] * MIN_SIZE
        self._mask = MIN_SIZE - 1
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def add(self, key: str) -> None:
        """Index a key not indexed yet (the store removes a key before it writes it again)."""
        table = self._table
        i = hash(key) & self._mask
        slot = table[i]
        if slot is None:
            table[i] = key
        elif type(slot) is str:
            table[i] = [slot, key]
        else:
            slot.append(key)  # type: ignore[union-attr]
        self._n += 1
        if self._n > len(table):
            self._resize(len(table) * 2)

    def discard(self, key: str) -> None:
        table = self._table
        i = hash(key) & self._mask
        slot = table[i]
        if slot is None:
            return
        if type(slot) is str:
            if slot != key:
                return
            table[i] = None
        else:
            try:
                slot.remove(key)  # type: ignore[union-attr]
            except ValueError:
                return
            if len(slot) == 1:
                table[i] = slot[0]
        self._n -= 1
        if len(table) > MIN_SIZE and self._n < len(table) // 8:
            self._resize(len(table) // 2)

    def clear(self) -> None:
        self._table = [None] * MIN_SIZE
        self._mask = MIN_SIZE - 1
        self._n = 0

    def _resize(self, size: int) -> None:
        old = self._table
        self._table = [None] * size
        self._mask = size - 1
        self._n = 0
        for slot in old:
            if slot is None:
                continue
            if type(slot) is str:
                self.add(slot)
            else:
                for key in slot:
                    self.add(key)

    def scan(self, cursor: int, count: int, alive: Callable[[str], bool]) -> tuple[list[str], int]:
        """Keys from ``cursor`` on, about ``count`` of them (buckets are returned whole, and at most
        ten times ``count`` buckets are visited, as Redis does); the next cursor, 0 at the end."""
        table, mask = self._table, self._mask
        out: list[str] = []
        v = cursor & _M64
        budget = max(1, count) * 10
        while True:
            slot = table[v & mask]
            if slot is not None:
                if type(slot) is str:
                    if alive(slot):
                        out.append(slot)
                else:
                    out.extend(k for k in slot if alive(k))
            # the next cursor: set the bits above the mask, increment the reversed value
            v |= ~mask & _M64
            v = _rev64((_rev64(v) + 1) & _M64)
            budget -= 1
            if v == 0 or len(out) >= count or budget <= 0:
                return out, v
