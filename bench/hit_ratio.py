"""Hit ratio under a RAM budget: W-TinyLFU (size-only and cost-aware) against LRU, cachetools'
LFUCache and Belady's optimum, replayed on the same traces.

Traces (generated, seeded; 1M requests each unless ``--requests``):
  zipf-0.8 / zipf-0.9 / zipf-1.0  Zipf popularity over 100k keys, log-normal value sizes, two
                                 compute-cost classes (20 % of keys cost 10× more: a large model)
  zipf+scan                      zipf-0.9 with a burst of one-off keys every 20k requests (the
                                 unique-question flood)
  shift                          zipf-0.9 whose popular keys change halfway through (a new model
                                 version, a news cycle): the policy must forget the old favourites
  loop                           a cycle over keys slightly more than the budget holds (LRU's worst)

``tinylfu`` is the default: W-TinyLFU with size-aware, aggregated-victims admission; ``tinylfu-iv``
compares a candidate with one victim at a time (the earlier default). Byte hit ratio weighs each
hit by the bytes it served.

Policies run through keymiss's real ``MemoryStore`` (same byte accounting for all); ``LFUCache``
gets the same sizes through ``getsizeof``; Belady evicts the entry used farthest in the future
(and never admits one that is not used again), computed offline on the same trace.

Prints hit ratio and compute seconds saved per trace, budget and policy; draws hit ratio against
budget, one line per policy and Belady, to ``docs/hit_ratio.png``.
Run: ``python bench/hit_ratio.py`` (``--requests 200000`` for a quick run).
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import os
import sys
import time

import numpy as np

from keymiss.stores.base import Write
from keymiss.stores.memory import ENTRY_OVERHEAD, MemoryStore

KEYS = 100_000
POLICIES = ("lru", "lfucache", "tinylfu-iv", "tinylfu", "tinylfu-cost", "static-best", "belady")
TRACES = ("zipf-0.8", "zipf-0.9", "zipf-1.0", "zipf+scan", "shift", "loop")
BUDGETS = (0.01, 0.05, 0.2)  # share of the bytes of all keys the trace can ask for

_TRACES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def make_trace(name: str, n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key ids per request, size per key id, cost per key id)."""
    rng = np.random.default_rng(seed)
    n_keys = KEYS
    if name == "loop":
        n_keys = 20_000
        keys = np.arange(n) % n_keys
    else:
        alpha = 0.9 if name in ("zipf+scan", "shift") else float(name.split("-")[1])
        weights = 1.0 / np.arange(1, KEYS + 1) ** alpha
        cdf = np.cumsum(weights / weights.sum())
        ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), KEYS - 1)
        keys = rng.permutation(KEYS)[ranks]
        if name == "shift":  # the second half ranks the keys anew
            half = n // 2
            keys[half:] = rng.permutation(KEYS)[ranks[half:]]
        if name == "zipf+scan":
            scan_ids = []
            next_id = KEYS
            out = []
            for start in range(0, n, 20_000):
                out.append(keys[start : start + 15_000])
                burst = np.arange(next_id, next_id + 5_000)
                next_id += 5_000
                out.append(burst)
                scan_ids.append(burst)
            keys = np.concatenate(out)[:n]
            n_keys = next_id
    sizes = np.clip(rng.lognormal(7.0, 1.0, n_keys), 64, 64 * 1024).astype(np.int64) // 64 * 64 + 64
    costs = np.where(rng.random(n_keys) < 0.2, 0.050, 0.005)  # seconds: a large and a small model
    return keys.astype(np.int64), sizes, costs


def total_bytes(keys: np.ndarray, sizes: np.ndarray) -> int:
    uniq = np.unique(keys)
    return int((sizes[uniq] + ENTRY_OVERHEAD + 8).sum())


def run_store(
    policy: str, keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, budget: int
) -> tuple[int, float, int]:
    store = MemoryStore(budget, eviction=policy)
    values: dict[int, bytes] = {}
    hits = hit_bytes = 0
    saved = 0.0
    get = store.get_now
    put = store._set
    names = [f"k{k:07d}" for k in range(len(sizes))]
    for k in keys.tolist():
        name = names[k]
        if get(name) is not None:
            hits += 1
            saved += costs[k]
            hit_bytes += sizes[k]
            continue
        size = int(sizes[k])
        value = values.get(size)
        if value is None:
            value = values[size] = b"x" * size
        put([Write(name, value, 0, None, float(costs[k]))], False, False, False)
    return hits, saved, int(hit_bytes)


def run_lfucache(
    keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, budget: int
) -> tuple[int, float, int]:
    import cachetools

    names = [f"k{k:07d}" for k in range(len(sizes))]
    weight = {names[i]: int(sizes[i]) + len(names[i]) + ENTRY_OVERHEAD for i in range(len(sizes))}
    cache: cachetools.LFUCache[str, int] = cachetools.LFUCache(maxsize=budget, getsizeof=lambda v: v)
    hits = hit_bytes = 0
    saved = 0.0
    for k in keys.tolist():
        name = names[k]
        if name in cache:
            cache[name]
            hits += 1
            saved += costs[k]
            hit_bytes += sizes[k]
            continue
        w = weight[name]
        if w <= budget:
            cache[name] = w
    return hits, saved, int(hit_bytes)


def run_belady(keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, budget: int) -> tuple[int, float, int]:
    n = len(keys)
    never = n + 1
    nxt = np.full(n, never, dtype=np.int64)
    last: dict[int, int] = {}
    klist = keys.tolist()
    for i in range(n - 1, -1, -1):
        k = klist[i]
        nxt[i] = last.get(k, never)
        last[k] = i
    nxt_list = nxt.tolist()
    weight = (sizes + len("k0000000") + ENTRY_OVERHEAD).tolist()
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []
    used = 0
    hits = hit_bytes = 0
    saved = 0.0
    for i, k in enumerate(klist):
        nu = nxt_list[i]
        if k in cached:
            hits += 1
            saved += costs[k]
            hit_bytes += sizes[k]
            if nu == never:
                del cached[k]
                used -= weight[k]
            else:
                cached[k] = nu
                heapq.heappush(heap, (-nu, k))
            continue
        if nu == never or weight[k] > budget:
            continue
        cached[k] = nu
        used += weight[k]
        heapq.heappush(heap, (-nu, k))
        while used > budget:
            neg, victim = heapq.heappop(heap)
            if cached.get(victim) == -neg:
                del cached[victim]
                used -= weight[victim]
    return hits, saved, int(hit_bytes)


def run_static_best(
    keys: np.ndarray, sizes: np.ndarray, costs: np.ndarray, budget: int
) -> tuple[int, float, int]:
    """The best any policy without foresight of *when* keys recur can do on an i.i.d. trace: hold
    the keys with the most requests per byte from the start (first requests still miss)."""
    ids, counts = np.unique(keys, return_counts=True)
    weight = sizes[ids] + len("k0000000") + ENTRY_OVERHEAD
    order = np.argsort(-(counts / weight), kind="stable")
    chosen = order[np.cumsum(weight[order]) <= budget]
    hits = int((counts[chosen] - 1).sum())
    saved = float(((counts[chosen] - 1) * costs[ids[chosen]]).sum())
    hit_bytes = int(((counts[chosen] - 1) * sizes[ids[chosen]]).sum())
    return hits, saved, hit_bytes


def one(task: tuple[str, float, str, int]) -> tuple[str, float, str, float, float, float, float]:
    trace, share, policy, n = task
    if trace not in _TRACES:
        _TRACES[trace] = make_trace(trace, n)
    keys, sizes, costs = _TRACES[trace]
    budget = int(total_bytes(keys, sizes) * share)
    if trace == "loop":
        budget = int(total_bytes(keys, sizes) * 0.9)  # the cycle never fits: LRU's worst case
    t0 = time.perf_counter()
    if policy == "belady":
        hits, saved, hit_bytes = run_belady(keys, sizes, costs, budget)
    elif policy == "static-best":
        hits, saved, hit_bytes = run_static_best(keys, sizes, costs, budget)
    elif policy == "lfucache":
        hits, saved, hit_bytes = run_lfucache(keys, sizes, costs, budget)
    else:
        hits, saved, hit_bytes = run_store(policy, keys, sizes, costs, budget)
    requested = int(sizes[keys].sum())
    return trace, share, policy, hits / len(keys), saved, hit_bytes / requested, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument(
        "--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs", "hit_ratio.png")
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    tasks = []
    for trace in TRACES:
        for share in BUDGETS if trace != "loop" else (0.9,):
            for policy in POLICIES:
                tasks.append((trace, share, policy, args.requests))
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        results = pool.map(one, tasks, chunksize=1)
    elapsed = time.perf_counter() - t0
    table: dict[tuple[str, float], dict[str, tuple[float, float, float]]] = {}
    for trace, share, policy, ratio, saved, byte_ratio, _secs in results:
        table.setdefault((trace, share), {})[policy] = (ratio, saved, byte_ratio)

    print(f"# Hit ratio under a byte budget ({args.requests:,} requests per trace, {elapsed:.0f} s)\n")
    print("Hit ratio in %; then byte hit ratio in %; then compute seconds saved by hits (5 ms / 50 ms).\n")
    header = " | ".join(POLICIES)
    print(f"| trace | budget | {header} | tinylfu − lru | tinylfu − tinylfu-iv | static-best − tinylfu |")
    print("| --- | ---: |" + " ---: |" * (len(POLICIES) + 3))
    for (trace, share), row in table.items():
        cells = " | ".join(f"{100 * row[p][0]:.1f}" for p in POLICIES)
        gain = 100 * (row["tinylfu"][0] - row["lru"][0])
        av_gain = 100 * (row["tinylfu"][0] - row["tinylfu-iv"][0])
        static_gap = 100 * (row["static-best"][0] - row["tinylfu"][0])
        print(f"| {trace} | {share:.0%} | {cells} | {gain:+.1f} | {av_gain:+.1f} | {static_gap:+.1f} |")
    print("\n| trace | budget | " + " | ".join(f"{p} bytes" for p in POLICIES) + " |")
    print("| --- | ---: |" + " ---: |" * len(POLICIES))
    for (trace, share), row in table.items():
        cells = " | ".join(f"{100 * row[p][2]:.1f}" for p in POLICIES)
        print(f"| {trace} | {share:.0%} | {cells} |")
    print("\n| trace | budget | " + " | ".join(f"{p} s saved" for p in POLICIES) + " | cost − size-only |")
    print("| --- | ---: |" + " ---: |" * (len(POLICIES) + 1))
    for (trace, share), row in table.items():
        cells = " | ".join(f"{row[p][1]:,.0f}" for p in POLICIES)
        print(f"| {trace} | {share:.0%} | {cells} | {row['tinylfu-cost'][1] - row['tinylfu'][1]:+,.0f} |")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)", file=sys.stderr)
        return 0
    zipf_traces = [t for t in TRACES if t != "loop"]
    fig, axes = plt.subplots(1, len(zipf_traces), figsize=(4 * len(zipf_traces), 3.6), sharey=True)
    for ax, trace in zip(axes, zipf_traces, strict=True):
        for policy in POLICIES:
            xs = [100 * s for s in BUDGETS]
            ys = [100 * table[(trace, s)][policy][0] for s in BUDGETS]
            dashed = policy in ("belady", "static-best")
            ax.plot(xs, ys, marker="o", linestyle="--" if dashed else "-", label=policy)
        ax.set_xscale("log")
        ax.set_title(trace)
        ax.set_xlabel("budget, % of all value bytes")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hit ratio, %")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {os.path.relpath(args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
