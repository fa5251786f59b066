"""Freshness and versions: what a read does with the value it found, decided in one pure function.

``decide(keyspace, item, now, draw)`` is the read contract's Python half (docs/architecture.md,
"The read contract"): every front end that reads through the engine (``Keymiss.read`` and
``read_many``, and so ``get``, ``get_many``, the Python server's GET and MGET) routes a key once,
looks it up once, and asks this function which row it is in. The function only reads its
arguments: the counting, the refreshes and the fills it calls for are the caller's, done in one
place (``Keymiss``'s settle step), so every front end counts and refreshes alike.

Also here, because they are the same rules seen from the write side: how long a value is kept for
its stale window, when a refresh that failed may run again, and whether a value found under a
cluster-wide lease is another node's refresh.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable

from keymiss.keyspace import Keyspace
from keymiss.stores import Item


class Decision(enum.Enum):
    """What a read does with what it found (one row of the read contract)."""

    #: the value, as it is
    SERVE = "serve"
    #: past its TTL, inside ``stale``: served at once while one refresh runs (RFC 5861)
    STALE = "stale"
    #: inside its TTL, but XFetch drew an early refresh: served while one refresh runs
    EARLY = "early"
    #: computed under the version just replaced, inside ``version_stale``: served, refreshed
    VERSION_STALE = "version_stale"
    #: computed under another version: hidden, a miss, and its fill replaces it
    HIDE = "hide"
    #: absent, and a keyspace owns the key: computed, stored, then answered
    FILL = "fill"
    #: absent, and no keyspace owns the key: nil
    NIL = "nil"

    @property
    def served(self) -> bool:
        """Whether the reader gets the value found (with or without a refresh behind it)."""
        return self in _SERVED

    @property
    def refreshes(self) -> bool:
        """Whether the value is served while one background refresh recomputes it."""
        return self in _REFRESHES


SERVE, STALE, EARLY, VERSION_STALE = Decision.SERVE, Decision.STALE, Decision.EARLY, Decision.VERSION_STALE
HIDE, FILL, NIL = Decision.HIDE, Decision.FILL, Decision.NIL
_REFRESHES = frozenset({STALE, EARLY, VERSION_STALE})
_SERVED = _REFRESHES | {SERVE}


def decide(
    ks: Keyspace | None,
    item: Item | None,
    now: float | Callable[[], float],
    draw: Callable[[], float] = random.random,
) -> Decision:
    """The read contract for one key: ``ks`` the keyspace that owns it (``None``: none does),
    ``item`` what the store holds (``None``: nothing), ``now`` unix seconds — or the clock itself,
    read only where a decision needs the time (a value with an expiry, in a keyspace with
    ``stale`` or ``early_refresh``), so a plain hit reads no clock — and ``draw`` a uniform random
    number in [0, 1) for XFetch.

    A client's write (no version tag) is served under every version. A version callable that
    fails serves nothing: the fill that follows reports its error to the reader."""
    if item is None:
        return NIL if ks is None else FILL
    if ks is None:
        return SERVE
    if ks.version is not None and item.version is not None:
        try:
            if not ks.serves(item.version):
                return VERSION_STALE if ks.serves_previous(item.version) else HIDE
        except Exception:
            return HIDE
    expires_at = item.expires_at
    if expires_at is None or not (ks.stale or ks.early_refresh):
        return SERVE
    if callable(now):
        now = now()
    remaining = expires_at - now - (ks.stale or 0.0)  # to the end of the TTL proper
    if ks.stale and remaining <= 0:
        return STALE
    return EARLY if xfetch(ks, remaining, draw) else SERVE


def xfetch(ks: Keyspace, remaining: float, draw: Callable[[], float] = random.random) -> bool:
    """XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): recompute early with a probability
    that grows as expiry nears, scaled by how long the keyspace takes to compute (``delta``) and
    by ``early_refresh`` (beta), so a hot key is refreshed once before it expires. Not in the
    first half of a value's life: at most two computations per TTL."""
    beta, delta = ks.early_refresh, ks.stats.mean_call_seconds
    if beta is None or delta <= 0:
        return False
    if ks.ttl is not None and remaining > ks.ttl / 2:
        return False
    return -delta * beta * math.log(1.0 - draw()) >= remaining


def needs_expiry(ks: Keyspace | None) -> bool:
    """Whether decisions on ``ks``'s values read their expiry: a copy that does not carry the
    store's own expiry (a near cache's) cannot be decided on."""
    return ks is not None and bool(ks.stale or ks.early_refresh)


def stored_ttl(ks: Keyspace, ttl: float | None) -> float | None:
    """How long a computed value is kept: its TTL, plus the stale window in which it is still
    served (as stale, while it refreshes)."""
    if ks.stale and ttl is not None:
        return ttl + ks.stale
    return ttl


def outdated(ks: Keyspace, item: Item) -> bool:
    """Whether ``item`` is a value no reader may be given now: computed under another version,
    and not the version just replaced inside ``version_stale`` (``decide``'s HIDE)."""
    return decide(ks, item, 0.0) is HIDE


def refreshed_since(seen: Item, now: Item, ks: Keyspace) -> bool:
    """Whether the value stored ``now`` is another node's refresh of the one ``seen``: computed
    under the current version where ``seen`` was not, or kept for a new lifetime (a refresh lands
    at least half a TTL after the value it replaces was written)."""
    if now.version is None or not ks.serves(now.version):
        return now.version is None and seen.version is not None  # a client's write since
    if seen.version != now.version:
        return True
    if ks.ttl is None or seen.expires_at is None or now.expires_at is None:
        return False
    return now.expires_at - seen.expires_at > ks.ttl / 4


class RefreshBackoff:
    """After a failed refresh, the key's next refresh waits: 1 s, doubling up to 60 s, so a broken
    model is not rerun on every hit of a value still served. Bounded: the oldest backoffs go first.
    ``clock`` (seconds) is monotonic unless a test moves one by hand."""

    LIMIT = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._waits: dict[str, tuple[float, float]] = {}  # key -> (next refresh allowed, wait)

    def allows(self, key: str) -> bool:
        """Whether a refresh of ``key`` may start now."""
        wait = self._waits.get(key)
        return wait is None or self.clock() >= wait[0]

    def succeeded(self, key: str) -> None:
        self._waits.pop(key, None)

    def failed(self, key: str) -> None:
        last = self._waits.get(key)
        wait = min(60.0, 2 * last[1]) if last is not None else 1.0
        self._waits[key] = (self.clock() + wait, wait)
        while len(self._waits) > self.LIMIT:
            self._waits.pop(next(iter(self._waits)))
