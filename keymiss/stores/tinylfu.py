"""W-TinyLFU eviction and admission, weighted by bytes and optionally by compute cost.

The shape is Caffeine's: a small LRU *window* takes every new entry; entries the window pushes out
become *candidates* for the segmented LRU main space (*probation* then *protected*), and a candidate
gets in only if a frequency sketch says it is used more often than the probation entry it would
push out. One scan of one-off keys therefore churns the 1 % window and leaves hot entries alone —
where LRU would lose them all. A hill climber moves the window's share to whatever raised the hit
rate in the last sample.

With ``cost_aware`` the contest weighs frequency × compute seconds ÷ bytes: the cache keeps what is
most expensive to recompute per byte it occupies.

Hits do no policy work on the caller's path (as Caffeine's read buffer): a hit appends its key to a
bounded buffer, which is replayed into the sketch and the segments when a key is written (before any
eviction is decided). A buffer full between two writes forgets its oldest reads, which costs the
sketch a few samples of a hot key, never a hit its value, TTL or counters.

Admission is size-aware (Einziger, Eytan, Friedman, Manes, "Lightweight Robust Size Aware Cache
Management", ACM TOS 2022): a candidate of many bytes would push out several probation entries,
so ``av`` (aggregated victims, the default) admits it only if it is used more than those victims
together; ``iv`` (iterative victims) compares it with one victim at a time, as plain TinyLFU does.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque

from keymiss.stores.eviction import Policy

_HALVE = bytes(i >> 1 for i in range(256))
#: hits buffered between two writes before further ones are dropped
READ_BUFFER = 1024
#: at most this many victims are weighed against one candidate (a huge value against tiny ones)
AV_MAX_VICTIMS = 64
#: compute seconds assumed for entries nobody measured (values a client SET)
COST_FLOOR = 1e-3


class FrequencySketch:
    """Count-min sketch of 4-bit counters (stored one per byte, capped at 15), 4 rows.

    Every ``sample`` increments all counters halve, so frequencies describe recent use and an entry
    that was hot yesterday cannot squat forever. Width is a power of two ≥ the expected entries, so
    the table costs 4 bytes per entry of capacity.
    """

    def __init__(self, expected_entries: int = 1024, cap: int = 15) -> None:
        self.cap = cap
        self._allocate(self._width_for(expected_entries))

    @staticmethod
    def _width_for(expected_entries: int) -> int:
        width = 64
        while width < expected_entries:
            width <<= 1
        return width

    def _allocate(self, width: int) -> None:
        """A zeroed table of ``width`` slots per row (construction only)."""
        self._set_width(width)
        self.table = bytearray(4 * width)
        self.additions = 0

    def _set_width(self, width: int) -> None:
        self.width = width
        self.mask = width - 1
        self.w1, self.w2, self.w3 = width, 2 * width, 3 * width
        self.sample = 10 * width

    def resize(self, expected_entries: int) -> None:
        """Grow to fit ``expected_entries``, keeping every count; never shrinks.

        Each row index is ``x & mask`` for some hash-derived ``x``, and the old mask's bits are a
        subset of the new one's, so a key's new index reduces to its old index under the old mask.
        Tiling each old row across the wider one (``new_row[i] = old_row[i & old_mask]``) therefore
        leaves every key reading the very cells' values it read before: no estimate drops, the sketch
        forgets nothing (a key's old collisions stay in its estimate until aging halves them away).
        ``additions`` carries over; the aging sample scales with the width.
        """
        width = self._width_for(expected_entries)
        old = self.width
        if width <= old:
            return
        t, factor = self.table, width // old
        table = bytearray()
        for row in range(4):
            table += t[row * old : (row + 1) * old] * factor  # repeating a row is tiling it
        self.table = table
        self._set_width(width)

    # str hashes are SipHash: 64 well-mixed bits. Three disjoint 21-bit fields and one mixed field
    # give the four row indexes (independent for widths up to 2**21). Inlined: this runs on every hit.
    def increment(self, key: object) -> None:
        h = hash(key)
        m, t = self.mask, self.table
        a = h & m
        b = self.w1 + ((h >> 21) & m)
        c = self.w2 + ((h >> 42) & m)
        d = self.w3 + (((h >> 11) ^ (h >> 37)) & m)
        added = False
        cap = self.cap
        if t[a] < cap:
            t[a] += 1
            added = True
        if t[b] < cap:
            t[b] += 1
            added = True
        if t[c] < cap:
            t[c] += 1
            added = True
        if t[d] < cap:
            t[d] += 1
            added = True
        if added:
            self.additions += 1
            if self.additions >= self.sample:
                self.reset()

    def frequency(self, key: object) -> int:
        h = hash(key)
        m, t = self.mask, self.table
        return min(
            t[h & m],
            t[self.w1 + ((h >> 21) & m)],
            t[self.w2 + ((h >> 42) & m)],
            t[self.w3 + (((h >> 11) ^ (h >> 37)) & m)],
        )

    def reset(self) -> None:
        """Halve every counter (aging), once: the count of additions restarts at most half a period
        in, so a period that fell since (``worth`` sets it from the entries held, fewer after a
        clear) halves the counts once rather than at every addition until the count is back under
        it, which would sweep the table each time and leave the favourites nothing."""
        self.table = bytearray(self.table.translate(_HALVE))
        self.additions = min(self.additions // 2, self.sample // 2)


class TinyLFUPolicy(Policy):
    """Byte-weighted W-TinyLFU with an adaptive window; ``cost_aware`` adds compute cost."""

    name = "tinylfu"

    def __init__(
        self, max_bytes: int, *, cost_aware: bool = False, window_share: float = 0.01, admission: str = "av"
    ) -> None:
        self.max_bytes = max(1, int(max_bytes))
        self.cost_aware = cost_aware
        if admission not in ("av", "iv"):
            raise ValueError(f"admission must be 'av' or 'iv', not {admission!r}")
        self.admission = admission
        if cost_aware:
            self.name = "tinylfu-cost"
        elif admission != "av":
            self.name = f"tinylfu-{admission}"
        # hits not yet replayed into the policy; a full buffer forgets its oldest (lossy, bounded).
        # ``touch`` is the buffer's own append: a hit costs one C call, no Python frame.
        self.reads: deque[str] = deque(maxlen=READ_BUFFER)
        self.touch = self.reads.append  # type: ignore[method-assign,assignment]
        self.window: OrderedDict[str, int] = OrderedDict()
        self.probation: OrderedDict[str, int] = OrderedDict()
        self.protected: OrderedDict[str, int] = OrderedDict()
        self.window_bytes = self.probation_bytes = self.protected_bytes = 0
        self.window_share = window_share
        self._set_window(window_share)
        self.sketch = FrequencySketch(1024)
        self.costs: dict[str, float] = {}
        self.candidates: deque[str] = deque()
        self.entries = 0
        # hill climbing over the window's share of the budget
        self._hits = self._misses = 0
        self._prev_rate = 0.0
        self._step = 0.0625
        self._until_climb = 1000
        self.rejected = 0  # candidates the sketch kept out

    def _set_window(self, share: float) -> None:
        self.window_share = min(0.8, max(0.005, share))
        self.window_max = max(1, int(self.max_bytes * self.window_share))
        self.protected_max = int((self.max_bytes - self.window_max) * 0.8)

    # --- hooks ---------------------------------------------------------------------------------------
    def insert(self, key: str, size: int, cost: float = 0.0) -> None:
        if self.reads:
            self.drain()
        self.candidates.clear()  # a new admission round: earlier winners are ordinary members now
        self.entries += 1
        if self.entries > self.sketch.width:
            self.sketch.resize(2 * self.entries)
        self.sketch.increment(key)
        self.window[key] = size
        self.window_bytes += size
        if self.cost_aware:
            self.costs[key] = max(cost, COST_FLOOR)
        # Entries the window pushes out become candidates at probation's recent end; they face
        # the admission contest only if the store has to make room.
        while self.window_bytes > self.window_max and len(self.window) > 1:
            k, s = self.window.popitem(last=False)
            self.window_bytes -= s
            self.probation[k] = s
            self.probation_bytes += s
            self.candidates.append(k)
        self._misses += 1
        self._until_climb -= 1
        if self._until_climb <= 0:
            self._climb()

    def touch(self, key: str) -> None:  # replaced per instance by ``self.reads.append``
        """A hit: recorded in the read buffer, replayed at the next write."""
        self.reads.append(key)

    def drain(self) -> None:
        """Replay the buffered hits into the sketch and the segments, oldest first."""
        reads = self.reads
        keys = list(reads)
        reads.clear()  # in place: ``touch`` is bound to this very buffer
        for key in keys:
            self._touched(key)

    def _touched(self, key: str) -> None:
        self.sketch.increment(key)
        self._hits += 1
        self._until_climb -= 1
        if self._until_climb <= 0:
            self._climb()
        if key in self.protected:
            self.protected.move_to_end(key)
        elif key in self.window:
            self.window.move_to_end(key)
        elif key in self.probation:
            size = self.probation.pop(key)
            self.probation_bytes -= size
            self.protected[key] = size
            self.protected_bytes += size
            while self.protected_bytes > self.protected_max and len(self.protected) > 1:
                k, s = self.protected.popitem(last=False)
                self.protected_bytes -= s
                self.probation[k] = s
                self.probation_bytes += s

    def miss(self, key: str) -> None:
        """A lookup found nothing: the sketch still learns the key is wanted."""
        self.sketch.increment(key)

    def remove(self, key: str) -> None:
        # a buffered read of a removed key replays as a sketch increment only (it is in no segment)
        for segment in (self.window, self.probation, self.protected):
            size = segment.pop(key, None)
            if size is not None:
                if segment is self.window:
                    self.window_bytes -= size
                elif segment is self.probation:
                    self.probation_bytes -= size
                else:
                    self.protected_bytes -= size
                self.entries -= 1
                break
        if self.cost_aware:
            self.costs.pop(key, None)

    def clear(self) -> None:
        self.reads.clear()
        self.window.clear()
        self.probation.clear()
        self.protected.clear()
        self.candidates.clear()
        self.costs.clear()
        self.window_bytes = self.probation_bytes = self.protected_bytes = self.entries = 0

    def _score(self, key: str, size: int) -> float:
        freq = self.sketch.frequency(key)
        if not self.cost_aware:
            return float(freq)
        return freq * self.costs.get(key, COST_FLOOR) / max(size, 1)

    def victim(self) -> str:
        return self.victim_for(0)

    def _value(self, key: str) -> float:
        """What keeping ``key`` is worth, summed over victims by aggregated-victims admission:
        its frequency (× its compute seconds when cost-aware)."""
        freq = self.sketch.frequency(key)
        return float(freq) if not self.cost_aware else freq * self.costs.get(key, COST_FLOOR)

    def victim_for(self, need: int) -> str:
        if self.reads:
            self.drain()
        if self.admission == "av":
            chosen = self._aggregated(need)
            if chosen is not None:
                return chosen
        while self.candidates and self.candidates[0] not in self.probation:
            self.candidates.popleft()
        if self.probation:
            victim = next(iter(self.probation))
            if self.candidates:
                candidate = self.candidates[0]
                if candidate != victim:
                    # the candidate gets in only if it beats the victim; ties keep the incumbent
                    if self._score(candidate, self.probation[candidate]) > self._score(
                        victim, self.probation[victim]
                    ):
                        return victim
                    self.rejected += 1
                    self.candidates.popleft()
                    return candidate
                self.candidates.popleft()
            return victim
        if self.protected:
            return next(iter(self.protected))
        return next(iter(self.window))

    def _aggregated(self, need: int) -> str | None:
        """Aggregated victims: the candidate against the probation entries its bytes would displace
        (oldest first, as many as its size), taken together. ``None`` when there is no contest."""
        while self.candidates and self.candidates[0] not in self.probation:
            self.candidates.popleft()
        if not self.probation or not self.candidates:
            return None
        candidate = self.candidates[0]
        room = self.probation[candidate]
        victims: list[str] = []
        freed = 0
        # in eviction order: probation, then protected, oldest first in each
        for key, size in itertools.chain(self.probation.items(), self.protected.items()):
            if key == candidate:
                continue
            victims.append(key)
            freed += size
            if freed >= room or len(victims) >= AV_MAX_VICTIMS:
                break
        if not victims:
            self.candidates.popleft()
            return candidate
        # per byte: the victims may free more than the candidate needs (one big victim for a small
        # candidate), so the candidate's worth is scaled to the bytes it would displace
        total = sum(self._value(v) for v in victims)
        if self._value(candidate) * freed / max(room, 1) > total:
            return victims[0]  # worth more than all it displaces: the next call goes on with the rest
        self.rejected += 1
        self.candidates.popleft()
        return candidate

    def _climb(self) -> None:
        """Every sample of accesses, move the window share in whichever direction raised the hit rate."""
        total = self._hits + self._misses
        self._until_climb = max(1000, 10 * self.entries)
        if total < self._until_climb:
            self._until_climb -= total
            return
        rate = self._hits / total
        if rate < self._prev_rate:
            self._step = -self._step
        self._prev_rate = rate
        self._set_window(self.window_share + self._step)
        self._step *= 0.98
        if abs(self._step) < 0.002:
            self._step = 0.0625 if self._step >= 0 else -0.0625
        self._hits = self._misses = 0
