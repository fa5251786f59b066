"""Eviction policies by name: one table, the only place that knows every policy class."""

from __future__ import annotations

from collections.abc import Callable

from keymiss.errors import ConfigError
from keymiss.stores.eviction import FIFOPolicy, LRUPolicy, Policy
from keymiss.stores.tinylfu import TinyLFUPolicy
from keymiss.stores.worth import WorthPolicy

#: name -> a policy for a byte budget. "worth" is the default (frequency x sqrt(cost) per byte,
#: sampled, as the module's admission); "tinylfu" the earlier default; "tinylfu-iv" (one victim at
#: a time, the admission before that) is kept for comparison
POLICIES: dict[str, Callable[[int], Policy]] = {
    "tinylfu": TinyLFUPolicy,
    "tinylfu-cost": lambda max_bytes: TinyLFUPolicy(max_bytes, cost_aware=True),
    "tinylfu-iv": lambda max_bytes: TinyLFUPolicy(max_bytes, admission="iv"),
    "worth": WorthPolicy,
    "lru": lambda _max_bytes: LRUPolicy(),
    "fifo": lambda _max_bytes: FIFOPolicy(),
}
POLICY_NAMES = tuple(POLICIES)
ALIASES = {"w-tinylfu": "tinylfu"}


def make_policy(name: str | Policy, max_bytes: int) -> Policy:
    """A policy instance from its name (``"tinylfu"``) or an instance supplied by the user."""
    if isinstance(name, Policy):
        return name
    key = name.lower()
    factory = POLICIES.get(ALIASES.get(key, key))
    if factory is None:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    return factory(max_bytes)
