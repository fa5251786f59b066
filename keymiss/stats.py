"""Counters per keyspace, read by INFO, KEYMISS STATS and the metrics endpoint, and the words both
servers report them by: the Python server's ``INFO keymiss`` and the module's, the Python front
end's ``/metrics`` and the module front end's, name a counter both count the same way, in the
same unit."""

from __future__ import annotations

import bisect
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any

#: Upper bounds (seconds) of the compute-time histogram: from a cached embedding to a slow model.
COMPUTE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Upper bounds of the keys-per-call histogram: whether batching gathers what a model wants.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

#: ``INFO keymiss``: the section's name on both servers, as Valkey shows a module's section (``#
#: keymiss``); each keyspace's line is ``keymiss_keyspace_<n>``
INFO_SECTION = "keymiss"
#: the per-keyspace line of ``INFO keymiss`` (``keymiss_keyspace_<n>``)
INFO_KEYSPACE_LINE = INFO_SECTION + "_keyspace_"

#: Per-keyspace counters both servers keep, by the name both report them under (``INFO keymiss``
#: and, as ``keymiss_<name>_total``, ``/metrics``), with what they count.
SHARED_COUNTERS = {
    "hits": "Reads answered from a stored value",
    "misses": "Reads of a key with no stored value (or one of another version)",
    "computations": "Keys the keyspace's function computed to a value",
    "errors": "Keys whose computation failed",
    "timeouts": "Keys whose computation passed its deadline",
    "superseded": "Computed values not stored: a client wrote the key meanwhile",
    "stale_hits": "Hits served past the TTL, inside the stale window, while a refresh ran",
    "early_refreshes": "Refreshes a hit started before the TTL ran out",
    "refresh_failures": "Background refreshes that failed (the old value kept being served)",
    "version_misses": "Stored values not served: computed under another version",
    "version_stale_hits": "Hits on the version just replaced, inside version_stale, while a refresh ran",
}
#: Per-keyspace gauges both servers keep (``keymiss_<name>`` in ``/metrics``).
SHARED_GAUGES = {
    "queued": "Keys waiting for a computation slot",
    "in_flight": "Keys being computed",
}
#: Every per-keyspace field both servers' ``INFO keymiss`` show, in the same unit:
#: ``mean_compute_seconds``, ``p50_compute_seconds`` and ``p99_compute_seconds`` mean the same on
#: both: the handler seconds each key computed cost (a batch's call divided among its keys), over
#: every key since the server started, the mean exact, the quantiles estimated from the
#: ``COMPUTE_BUCKETS`` histogram. The module learns them from the worker's FILL (``COST``); neither
#: counts the wait for a concurrency slot or a worker.
SHARED_KEYSPACE_FIELDS = (
    "pattern",
    *SHARED_COUNTERS,
    *SHARED_GAUGES,
    "mean_compute_seconds",
    "p50_compute_seconds",
    "p99_compute_seconds",
)


def info_name(text: str) -> str:
    """A name (a keyspace's pattern, a version's label) as a value inside an INFO ``k=v,k=v`` line:
    ``%``, ``,``, ``=``, space, and every control character below it or DEL, percent-encoded
    (``a,b=c`` is ``a%2Cb%3Dc``), the rest as it is. Both front ends write it so (the module in C,
    ``info.c``), and :func:`from_info_name` gives the name back exactly."""
    return "".join(f"%{ord(c):02X}" if c in "%,=" or ord(c) <= 0x20 or ord(c) == 0x7F else c for c in text)


def from_info_name(text: str) -> str:
    """The name :func:`info_name` encoded."""
    return urllib.parse.unquote(text, errors="surrogateescape")


def printable(text: str) -> str:
    """``text`` safe for a terminal or a log line: control characters (C0, DEL, C1) and lone
    surrogates written as ``\\xNN`` / ``\\uNNNN``, so a name cannot move the cursor, restyle the
    screen or hide itself; everything else as it is."""
    out = []
    for c in text:
        o = ord(c)
        if o < 0x20 or 0x7F <= o < 0xA0:
            out.append(f"\\x{o:02x}")
        elif 0xD800 <= o < 0xE000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(c)
    return "".join(out)


def histogram_quantile(q: float, counts: list[int], bounds: tuple[float, ...] = COMPUTE_BUCKETS) -> float:
    """The ``q`` quantile (0..1) of what a histogram counted: ``counts`` per bucket of ``bounds``
    (upper bounds, one overflow slot last), interpolated linearly inside the bucket the rank falls
    in, as Prometheus's ``histogram_quantile`` does; past the last bound, the last bound. Both
    servers estimate ``p50_compute_seconds`` and ``p99_compute_seconds`` this way over the same
    bounds (the module in C, ``info.c``), so the two front ends report the same number for the
    same compute times. 0.0 before anything was counted."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = q * total
    below = 0
    for i, n in enumerate(counts):
        if n and below + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = bounds[i - 1] if i else 0.0
            return float(lower + (bounds[i] - lower) * (rank - below) / n)
        below += n
    return float(bounds[-1])


@dataclass
class KeyspaceStats:
    """What one keyspace did. Plain ints and floats: updating them is the whole cost on the hit path."""

    hits: int = 0
    misses: int = 0
    computations: int = 0  # keys computed (a batch of 8 counts 8)
    calls: int = 0  # handler invocations (a batch of 8 counts 1)
    errors: int = 0
    timeouts: int = 0
    in_flight: int = 0  # keys being computed, including those whose handler is past its timeout
    stuck: int = 0  # handler calls past their timeout whose thread has not returned
    coalesced: int = 0  # callers that joined a computation already running
    compute_seconds: float = 0.0
    not_stored: int = 0  # computed values the store declined (too big, or not admitted)
    superseded: int = 0  # computed values not stored because a client wrote the key meanwhile
    evictions: int = 0  # values of this keyspace the memory store evicted
    early_refreshes: int = 0  # recomputations a hit started before the TTL ran out (XFetch)
    stale_hits: int = 0  # hits served past the TTL, inside the stale window, while a refresh ran
    refresh_failures: int = 0  # background refreshes that failed (the old value kept being served)
    version_misses: int = 0  # stored values not served: computed under another version
    #: hits on a value of the version just replaced, inside version_stale, while a refresh ran
    version_stale_hits: int = 0
    #: handler calls per COMPUTE_BUCKETS bound, plus one overflow slot (not cumulative)
    compute_histogram: list[int] = field(default_factory=lambda: [0] * (len(COMPUTE_BUCKETS) + 1))
    #: keys computed per COMPUTE_BUCKETS bound of the handler seconds each cost (a batch of 8 in
    #: 0.8 s counts 8 at 0.1 s): what the p50/p99 compute times are read from, per key as the
    #: module's are (from FILL's COST, the same share)
    key_compute_histogram: list[int] = field(default_factory=lambda: [0] * (len(COMPUTE_BUCKETS) + 1))
    #: handler calls per BATCH_BUCKETS bound of their key count, plus one overflow slot
    batch_histogram: list[int] = field(default_factory=lambda: [0] * (len(BATCH_BUCKETS) + 1))

    def observe(self, seconds: float, keys: int = 1) -> None:
        """Record one handler call that computed ``keys`` keys in ``seconds``."""
        self.compute_histogram[bisect.bisect_left(COMPUTE_BUCKETS, seconds)] += 1
        if keys:  # each key's share of the call, as Computed.cost and the module's COST say
            self.key_compute_histogram[bisect.bisect_left(COMPUTE_BUCKETS, seconds / keys)] += keys
        self.batch_histogram[bisect.bisect_left(BATCH_BUCKETS, keys)] += 1
        self.compute_seconds += seconds
        self.calls += 1
        self.computations += keys

    @property
    def mean_compute_seconds(self) -> float:
        return self.compute_seconds / self.computations if self.computations else 0.0

    @property
    def p50_compute_seconds(self) -> float:
        """Half the keys computed took at most this long (estimated from the histogram)."""
        return histogram_quantile(0.5, self.key_compute_histogram)

    @property
    def p99_compute_seconds(self) -> float:
        """99 % of the keys computed took at most this long (estimated from the histogram)."""
        return histogram_quantile(0.99, self.key_compute_histogram)

    @property
    def mean_call_seconds(self) -> float:
        """Mean seconds of one handler call (a batch is one call)."""
        return self.compute_seconds / self.calls if self.calls else 0.0

    @property
    def seconds_saved(self) -> float:
        """Compute time hits avoided, estimated from the mean compute time."""
        return self.hits * self.mean_compute_seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["compute_histogram"]
        del d["batch_histogram"]
        del d["key_compute_histogram"]
        d["mean_compute_seconds"] = self.mean_compute_seconds
        d["p50_compute_seconds"] = self.p50_compute_seconds
        d["p99_compute_seconds"] = self.p99_compute_seconds
        d["seconds_saved"] = self.seconds_saved
        return d
