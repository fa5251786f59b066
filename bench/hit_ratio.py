"""Hit ratio under a byte budget: keymiss's policies and its default front end against LRU, GDSF
(with and without cost), SIEVE, S3-FIFO, cachetools' LFUCache, the per-byte oracle and Belady.

Traces (generated, seeded; ``--seed`` draws held-out ones; 300k requests each unless ``--requests``):
  zipf-0.8 / zipf-0.9 / zipf-1.0  Zipf popularity over 100k keys, log-normal value sizes, two
                                 compute-cost classes (20 % of keys cost 10× more: a large model)
  zipf+scan                      zipf-0.9 with a burst of one-off keys every 20k requests (the
                                 unique-question flood)
  shift                          zipf-0.9 whose popular keys change halfway through (a new model
                                 version, a news cycle): the policy must forget the old favourites
  loop                           a cycle over keys slightly more than the budget holds (LRU's worst)

``tinylfu`` is the in-process default (W-TinyLFU, size-aware admission); ``frontend`` is the default
front end: a real module-loaded Valkey under ``maxmemory`` (the same share of its own bytes per
key), replayed through GET and the worker's TAKE / FILL (``bench/frontend_replay.py``);
``frontend-old`` the same with another build of the module (``--old-module``, e.g. main's).
``static-best`` is the per-byte oracle: it holds, from the first request, the keys with the most
requests per byte. Belady evicts the entry used farthest in the future. Byte hit ratio weighs each
hit by the bytes it served; seconds saved add each hit's compute cost.

Run: ``python bench/hit_ratio.py`` (a few minutes); ``--quick`` is a seconds-long smoke test.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.util
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import frontend_replay, policy_sims
from bench.resp_hits import free_port
from keymiss.stores.base import Write
from keymiss.stores.memory import ENTRY_OVERHEAD, MemoryStore

KEYS = 100_000
SIM_POLICIES = (
    "lru",
    "sieve",
    "s3fifo",
    "lfucache",
    "gdsf",
    "gdsf-cost",
    "tinylfu-iv",
    "tinylfu",
    "tinylfu-cost",
    "worth",
    "static-best",
    "belady",
)
#: GDSF simulated under the front end's own accounting (value + key + the server's bytes per key,
#: the same share of that): the baselines the front-end columns are compared with
SERVER_SIMS = ("gdsf-srv", "gdsf-cost-srv")
POLICIES = (*SIM_POLICIES, "frontend", "frontend-old", *SERVER_SIMS)
TRACES = ("zipf-0.8", "zipf-0.9", "zipf-1.0", "zipf+scan", "shift", "loop")
BUDGETS = (0.01, 0.05, 0.2)  # share of the bytes of all keys the trace can ask for
#: set by main: the server binary and module builds the front-end rows replay through
FRONTEND: dict[str, str | None] = {"binary": None, "frontend": None, "frontend-old": None}
SEED = 7

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
        _TRACES[trace] = make_trace(trace, n, SEED)
    keys, sizes, costs = _TRACES[trace]
    if trace == "loop":
        share = 0.9  # the cycle never fits: LRU's worst case
    budget = int(total_bytes(keys, sizes) * share)
    weight = (sizes + len("k0000000") + ENTRY_OVERHEAD).tolist()
    t0 = time.perf_counter()
    if policy in SERVER_SIMS or policy.startswith("frontend"):
        # the server's own bytes per key (its per-key overhead, not Python's), the same share
        server_weight = sizes + len("k0000000") + frontend_replay.KEY_OVERHEAD
        server_budget = int(server_weight[np.unique(keys)].sum() * share)
    if policy in SERVER_SIMS:
        hits, saved, hit_bytes = policy_sims.run_gdsf(
            keys, sizes, costs, server_weight.tolist(), server_budget, cost=policy == "gdsf-cost-srv"
        )
    elif policy.startswith("frontend"):
        binary, module = FRONTEND["binary"], FRONTEND[policy]
        assert binary is not None and module is not None
        hits, saved, _counters = frontend_replay.replay(
            binary, module, free_port(), keys, sizes, costs, server_budget, send_cost=policy == "frontend"
        )
        hit_bytes = 0
    elif policy in ("gdsf", "gdsf-cost"):
        hits, saved, hit_bytes = policy_sims.run_gdsf(
            keys, sizes, costs, weight, budget, cost=policy == "gdsf-cost"
        )
    elif policy == "sieve":
        hits, saved, hit_bytes = policy_sims.run_sieve(keys, sizes, costs, weight, budget)
    elif policy == "s3fifo":
        hits, saved, hit_bytes = policy_sims.run_s3fifo(keys, sizes, costs, weight, budget)
    elif policy == "belady":
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
    global SEED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--seed", type=int, default=SEED, help="another seed draws held-out traces")
    parser.add_argument("--quick", action="store_true", help="a smoke test: small traces, 5 %% budget")
    parser.add_argument("--server", default=None, help="valkey-server or redis-server for the front end")
    parser.add_argument("--old-module", default=None, help="another module build: the frontend-old rows")
    parser.add_argument("--no-frontend", action="store_true")
    parser.add_argument("--traces", default=",".join(TRACES), help="comma-separated subset")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated shares")
    parser.add_argument("--policies", default=None, help="comma-separated subset (gdsf, gdsf-cost kept)")
    parser.add_argument(
        "--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs", "hit_ratio.png")
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    SEED = args.seed
    traces = tuple(t for t in args.traces.split(",") if t)
    budgets = tuple(float(b) for b in args.budgets.split(",") if b)
    if args.quick:  # a smoke test: every policy and the front end once, on a small trace
        args.requests = min(args.requests, 10_000)
        traces, budgets, args.plot = ("zipf+scan",), (0.05,), ""
    binary = args.server or frontend_replay.default_server()
    FRONTEND["binary"] = binary
    if not args.no_frontend and binary is not None:
        FRONTEND["frontend"] = frontend_replay.default_module()
        if frontend_replay.exists(args.old_module):
            FRONTEND["frontend-old"] = args.old_module
    chosen = set(args.policies.split(",")) | {"gdsf", "gdsf-cost"} if args.policies else set(POLICIES)
    policies = [p for p in POLICIES if p in chosen and (not p.startswith("frontend") or FRONTEND.get(p))]
    if any(p.startswith("frontend") for p in policies):
        policies += [p for p in SERVER_SIMS if p not in policies]
    else:
        policies = [p for p in policies if p not in SERVER_SIMS]
    if "lfucache" in policies and importlib.util.find_spec("cachetools") is None:
        print("lfucache left out: cachetools is not installed (pip install -e '.[bench]')", file=sys.stderr)
        policies.remove("lfucache")
    tasks = []
    for trace in traces:
        for share in budgets if trace != "loop" else (0.9,):
            for policy in policies:
                tasks.append((trace, share, policy, args.requests))
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        results = pool.map(one, tasks, chunksize=1)
    elapsed = time.perf_counter() - t0
    table: dict[tuple[str, float], dict[str, tuple[float, float, float]]] = {}
    for trace, share, policy, ratio, saved, byte_ratio, _secs in results:
        table.setdefault((trace if trace != "loop" else "loop", share), {})[policy] = (
            ratio,
            saved,
            byte_ratio,
        )
    print_tables(table, policies, args.requests, args.seed, elapsed, binary)
    if args.plot:
        plot(table, policies, args.plot)
    return 0


def print_tables(
    table: dict[tuple[str, float], dict[str, tuple[float, float, float]]],
    policies: list[str],
    requests: int,
    seed: int,
    elapsed: float,
    binary: str | None,
) -> None:
    """Hit ratio, byte hit ratio and seconds saved per trace and budget; then the acceptance's
    differences: each default against GDSF (hits) and GDSF-with-cost (seconds saved)."""
    server = (
        f", front end: {os.path.basename(binary)} {frontend_replay.server_version(binary)}" if binary else ""
    )
    print(
        f"# Hit ratio under a byte budget ({requests:,} requests per trace, seed {seed}, "
        f"{elapsed:.0f} s{server})\n"
    )
    for title, idx, fmt in (
        ("Hit ratio, %", 0, "{:.1f}"),
        ("Byte hit ratio, %", 2, "{:.1f}"),
        ("Compute seconds saved by hits (5 ms / 50 ms classes)", 1, "{:,.0f}"),
    ):
        shown = [p for p in policies if not (idx == 2 and p.startswith("frontend"))]
        print(f"{title}:\n")
        print("| trace | budget | " + " | ".join(shown) + " |")
        print("| --- | ---: |" + " ---: |" * len(shown))
        for (trace, share), row in table.items():
            scale = 100 if idx != 1 else 1
            cells = " | ".join(fmt.format(scale * row[p][idx]) for p in shown)
            print(f"| {trace} | {share:.0%} | {cells} |")
        print()
    defaults = [p for p in ("tinylfu", "worth", "frontend", "frontend-old") if p in policies]
    if not defaults:
        return

    # each default against GDSF under its own accounting: the front end's under the server's bytes
    def base(p: str, cost: bool) -> str:
        name = "gdsf-cost" if cost else "gdsf"
        return f"{name}-srv" if p.startswith("frontend") and f"{name}-srv" in policies else name

    print(
        "Against GDSF: hit-ratio points above `gdsf`, seconds saved above `gdsf-cost` (the front end "
        "against both simulated under the server's bytes per key: `-srv`):\n"
    )
    print(
        "| trace | budget | "
        + " | ".join(f"{p} − {base(p, False)} (pts)" for p in defaults)
        + " | "
        + " | ".join(f"{p} − {base(p, True)} (s)" for p in defaults)
        + " |"
    )
    print("| --- | ---: |" + " ---: |" * (2 * len(defaults)))
    for (trace, share), row in table.items():
        pts = " | ".join(f"{100 * (row[p][0] - row[base(p, False)][0]):+.1f}" for p in defaults)
        secs = " | ".join(f"{row[p][1] - row[base(p, True)][1]:+,.0f}" for p in defaults)
        print(f"| {trace} | {share:.0%} | {pts} | {secs} |")


def plot(
    table: dict[tuple[str, float], dict[str, tuple[float, float, float]]], policies: list[str], path: str
) -> None:
    """Hit ratio against budget, one line per policy, one panel per trace (not the loop)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)", file=sys.stderr)
        return
    traces = sorted({t for t, _ in table if t != "loop"}, key=TRACES.index)
    budgets = sorted({s for t, s in table if t != "loop"})
    fig, axes = plt.subplots(1, len(traces), figsize=(4 * len(traces), 3.6), sharey=True, squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        for policy in policies:
            ys = [100 * table[(trace, s)][policy][0] for s in budgets]
            dashed = policy in ("belady", "static-best")
            ax.plot(
                [100 * s for s in budgets], ys, marker="o", linestyle="--" if dashed else "-", label=policy
            )
        ax.set_xscale("log")
        ax.set_title(trace)
        ax.set_xlabel("budget, % of all value bytes")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("hit ratio, %")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nplot: {os.path.relpath(path)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
