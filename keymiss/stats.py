"""Counters per keyspace, read by INFO, KEYMISS STATS and the metrics endpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class KeyspaceStats:
    """What one keyspace did. Plain ints and floats: updating them is the whole cost on the hit path."""

    hits: int = 0
    misses: int = 0
    computations: int = 0  # keys computed (a batch of 8 counts 8)
    calls: int = 0  # handler invocations (a batch of 8 counts 1)
    errors: int = 0
    timeouts: int = 0
    in_flight: int = 0
    coalesced: int = 0  # callers that joined a computation already running
    compute_seconds: float = 0.0
    not_stored: int = 0  # computed values the store declined (bigger than the budget)

    @property
    def mean_compute_seconds(self) -> float:
        return self.compute_seconds / self.computations if self.computations else 0.0

    @property
    def seconds_saved(self) -> float:
        """Compute time hits avoided, estimated from the mean compute time."""
        return self.hits * self.mean_compute_seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_compute_seconds"] = self.mean_compute_seconds
        d["seconds_saved"] = self.seconds_saved
        return d
