"""Worth-sampled eviction and admission: frequency x sqrt(compute cost) per byte, as the module does.

Under a byte budget a cache is worth the computations its bytes save. Each entry's worth is its
frequency (a TinyLFU count-min sketch of 8-bit counters that also counts misses, halved every
``AGING`` accesses per entry, or sooner: see below) times the square root of its compute seconds,
divided by its bytes. When the store must make room, the policy samples ``SAMPLE`` resident entries
(as Redis samples for its eviction) and offers the one of least worth; if the newcomer is worth no
more than that one, the newcomer itself is evicted instead (admission). GDSF ranks the same ratio
over every entry with a heap; sampling gives nearly its choices at O(1) per eviction, and the
sketch remembers keys that were evicted or never admitted, which GDSF forgets.

The halving period is a compromise between two needs (``bench/hit_ratio.py``, docs/benchmarks.md): a
small cache wants a long memory (the entries at its margin are read a few times per period, and
halving every 10 accesses per entry, TinyLFU's period, left their counts little above those of keys
read once or twice), while favourites that stop being read must lose their counts before the new
ones can displace them (a popularity shift). So the sketch halves every ``AGING`` accesses per
entry, but at least every ``AGING_MAX`` accesses, unless that is under ``AGING_MIN`` accesses per
entry (a large cache, whose counts would then say too little). Measured: halving every 10 accesses
per entry lost compute seconds to GDSF-with-cost on every steady zipf run, every 40 lost 3 points of
hits after a shift.

The square root balances the two things a cache can maximise: with the full cost weight the
policy saved the most compute seconds but lost hits, with none the reverse (``bench/hit_ratio.py``).

Hits do no policy work on the caller's path: a hit appends its key to a bounded read buffer,
replayed into the sketch before the next decision (as ``TinyLFUPolicy`` does).
"""

from __future__ import annotations

import math
import random
from array import array
from collections import deque

from keymiss.stores.eviction import Policy
from keymiss.stores.tinylfu import READ_BUFFER, FrequencySketch

#: resident entries weighed per eviction
SAMPLE = 16
#: sketch counters per row for each resident entry (it also counts keys not resident): 8 bytes per
#: entry of 8-bit counters in all, within what ENTRY_OVERHEAD charges per entry
SKETCH_PER_ENTRY = 8
#: compute seconds assumed for entries nobody measured (values a client SET)
COST_FLOOR = 1e-3
#: accesses per resident entry before the sketch's first halving (TinyLFU's is 10); the count of
#: additions halves with the counters, as TinyLFU's, so each later one comes half as many later
AGING = 40
#: ...but a halving at least every this many accesses, so stale favourites lose their counts
AGING_MAX = 80_000
#: ...unless that is fewer than this many accesses per resident entry
AGING_MIN = 12


def aging_period(entries: int) -> int:
    """Accesses between two halvings of the sketch for ``entries`` resident entries (256 at least)."""
    n = max(entries, 256)
    return min(AGING * n, max(AGING_MAX, AGING_MIN * n))


class WorthPolicy(Policy):
    """Sampled eviction by frequency x sqrt(cost) per byte, with admission of the newcomer."""

    name = "worth"

    def __init__(self, max_bytes: int, *, seed: int = 0) -> None:
        self.max_bytes = max(1, int(max_bytes))
        self.reads: deque[str] = deque(maxlen=READ_BUFFER)
        self.touch = self.reads.append  # type: ignore[method-assign,assignment]
        self.sketch = FrequencySketch(1024, cap=255)
        self.sketch.sample = aging_period(0)
        self.keys: list[str] = []  # resident keys, in no order: sampled by index
        self.weights = array("d")  # sqrt(cost) / bytes of keys[i] (8 bytes each, no float objects)
        self.index: dict[str, int] = {}
        self.newcomer: str | None = None  # the key inserted last, not yet past its contest
        self.rng = random.Random(seed)
        self.rejected = 0

    # --- hooks ---------------------------------------------------------------------------------------
    def insert(self, key: str, size: int, cost: float = 0.0) -> None:
        if self.reads:
            self.drain()
        self.index[key] = len(self.keys)
        self.keys.append(key)
        self.weights.append(math.sqrt(max(cost, COST_FLOOR)) / max(size, 1))
        self.newcomer = key
        n = len(self.keys)
        if SKETCH_PER_ENTRY * n > self.sketch.width:
            self.sketch.resize(SKETCH_PER_ENTRY * n)
        self.sketch.sample = aging_period(n)

    def touch(self, key: str) -> None:  # replaced per instance by ``self.reads.append``
        """A hit: recorded in the read buffer, replayed before the next decision."""
        self.reads.append(key)

    def drain(self) -> None:
        """Replay the buffered hits into the sketch."""
        keys = list(self.reads)
        self.reads.clear()  # in place: ``touch`` is bound to this very buffer
        increment = self.sketch.increment
        for key in keys:
            increment(key)

    def miss(self, key: str) -> None:
        """A lookup found nothing: the sketch learns the key is wanted (the newcomer's worth)."""
        self.sketch.increment(key)

    def remove(self, key: str) -> None:
        i = self.index.pop(key, None)
        if i is None:
            return
        last = self.keys.pop()
        weight = self.weights.pop()
        if last != key:
            self.keys[i] = last
            self.weights[i] = weight
            self.index[last] = i
        if self.newcomer == key:
            self.newcomer = None

    def clear(self) -> None:
        self.reads.clear()
        self.keys.clear()
        self.index.clear()
        del self.weights[:]  # an array has no clear()
        self.newcomer = None

    def worth(self, key: str) -> float:
        """Frequency x sqrt(compute seconds) per byte."""
        return self.sketch.frequency(key) * self.weights[self.index[key]]

    def victim(self) -> str:
        return self.victim_for(0)

    def victim_for(self, need: int) -> str:
        if self.reads:
            self.drain()
        keys, rng, newcomer = self.keys, self.rng, self.newcomer
        n = len(keys)
        best = None
        best_worth = 0.0
        frequency, weights = self.sketch.frequency, self.weights
        for _ in range(min(SAMPLE, n)):
            i = rng.randrange(n)
            key = keys[i]
            if key == newcomer:
                continue
            w = frequency(key) * weights[i]
            if best is None or w < best_worth:
                best, best_worth = key, w
        if best is None:
            return newcomer if newcomer is not None else keys[0]
        if newcomer is not None and self.worth(newcomer) <= best_worth:
            self.rejected += 1  # worth no more than what it would displace: it goes, they stay
            return newcomer
        return best
