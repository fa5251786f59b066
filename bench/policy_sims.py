"""Reference policies for ``bench/hit_ratio.py``, simulated on the same byte budget as keymiss's.

Each takes the trace (key ids per request, size and compute cost per key id) and a budget of bytes
(``weight``: value + key + the per-entry overhead every policy is charged alike) and returns (hits,
compute seconds saved, bytes served by hits).

- GDSF (Cherkasova 1998): priority = L + frequency x cost / size, evict the lowest, L := its
  priority. ``cost=False`` is GDSF with cost 1 (frequency per byte); ``cost=True`` weighs compute
  seconds, the policy that maximises seconds saved per byte.
- SIEVE (Zhang et al., NSDI '24): one FIFO with a visited bit and a hand that spares visited entries.
- S3-FIFO (Yang et al., SOSP '23): a small FIFO (10 % of the bytes), a main FIFO and a ghost FIFO of
  keys; a key read while in the small queue moves to main, one seen in the ghost goes straight there.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

import numpy as np

Result = tuple[int, float, int]


def run_gdsf(
    keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, weight: list[int], budget: int, *, cost: bool
) -> Result:
    clist = costs.tolist()
    slist = sizes.tolist()
    inflation = 0.0
    freq: dict[int, int] = {}
    prio: dict[int, float] = {}
    heap: list[tuple[float, int]] = []
    used = hits = hit_bytes = 0
    saved = 0.0
    for k in keys.tolist():
        c = clist[k] if cost else 1.0
        if k in prio:
            hits += 1
            saved += clist[k]
            hit_bytes += slist[k]
            freq[k] += 1
            p = inflation + freq[k] * c / weight[k]
            prio[k] = p
            heapq.heappush(heap, (p, k))
            continue
        if weight[k] > budget:
            continue
        freq[k] = 1
        p = inflation + c / weight[k]
        prio[k] = p
        heapq.heappush(heap, (p, k))
        used += weight[k]
        while used > budget:
            p, v = heapq.heappop(heap)
            if prio.get(v) != p:
                continue  # a stale row: v was read since
            inflation = p
            del prio[v], freq[v]
            used -= weight[v]
        if len(heap) > 4 * len(prio) + 1024:
            heap = [(p, v) for v, p in prio.items()]
            heapq.heapify(heap)
    return hits, saved, hit_bytes


def run_sieve(
    keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, weight: list[int], budget: int
) -> Result:
    clist = costs.tolist()
    slist = sizes.tolist()
    newer: dict[int, int | None] = {}  # toward the head (newest)
    older: dict[int, int | None] = {}
    visited: dict[int, bool] = {}
    head: int | None = None
    tail: int | None = None
    hand: int | None = None
    used = hits = hit_bytes = 0
    saved = 0.0
    for k in keys.tolist():
        if k in visited:
            visited[k] = True
            hits += 1
            saved += clist[k]
            hit_bytes += slist[k]
            continue
        if weight[k] > budget:
            continue
        while used + weight[k] > budget and tail is not None:
            node = hand if hand is not None else tail
            while visited[node]:
                visited[node] = False
                nxt = newer[node]
                node = nxt if nxt is not None else tail
            hand = newer[node]
            o, n = older[node], newer[node]
            if o is not None:
                newer[o] = n
            else:
                tail = n
            if n is not None:
                older[n] = o
            else:
                head = o
            del visited[node], newer[node], older[node]
            used -= weight[node]
        visited[k] = False
        older[k] = head
        newer[k] = None
        if head is not None:
            newer[head] = k
        head = k
        if tail is None:
            tail = k
        used += weight[k]
    return hits, saved, hit_bytes


def run_s3fifo(
    keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, weight: list[int], budget: int
) -> Result:
    clist = costs.tolist()
    slist = sizes.tolist()
    small: OrderedDict[int, None] = OrderedDict()
    main: OrderedDict[int, None] = OrderedDict()
    ghost: OrderedDict[int, None] = OrderedDict()
    freq: dict[int, int] = {}
    small_max = budget // 10
    small_bytes = main_bytes = 0
    hits = hit_bytes = 0
    saved = 0.0
    ghost_max = 1
    for k in keys.tolist():
        if k in freq:
            freq[k] = min(3, freq[k] + 1)
            hits += 1
            saved += clist[k]
            hit_bytes += slist[k]
            continue
        if weight[k] > budget:
            continue
        while small_bytes + main_bytes + weight[k] > budget:
            if small_bytes > small_max or not main:
                v, _ = small.popitem(last=False)
                small_bytes -= weight[v]
                if freq[v] > 0:
                    main[v] = None
                    main_bytes += weight[v]
                    freq[v] = 0
                else:
                    del freq[v]
                    ghost[v] = None
                    while len(ghost) > ghost_max:
                        ghost.popitem(last=False)
            else:
                v, _ = main.popitem(last=False)
                if freq[v] > 0:
                    freq[v] -= 1
                    main[v] = None
                else:
                    main_bytes -= weight[v]
                    del freq[v]
        freq[k] = 0
        if ghost.pop(k, 0) is None:
            main[k] = None
            main_bytes += weight[k]
        else:
            small[k] = None
            small_bytes += weight[k]
        ghost_max = max(1, len(main))
    return hits, saved, hit_bytes
