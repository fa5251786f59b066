"""W-TinyLFU: the frequency sketch, admission decisions, scan resistance, cost awareness, budget."""

from __future__ import annotations

import random

import pytest

from keymiss import Keymiss
from keymiss.stores.memory import ENTRY_OVERHEAD, MemoryStore
from keymiss.stores.tinylfu import FrequencySketch, TinyLFUPolicy


def test_sketch_counts_and_caps_at_15() -> None:
    s = FrequencySketch(1024)
    for _ in range(7):
        s.increment("hot")
    s.increment("warm")
    assert s.frequency("hot") == 7
    assert s.frequency("warm") == 1
    assert s.frequency("never") == 0
    for _ in range(40):
        s.increment("hot")
    assert s.frequency("hot") == 15  # 4-bit counters


def test_sketch_halves_after_its_sample() -> None:
    s = FrequencySketch(64)
    for _ in range(12):
        s.increment("k")
    before = s.frequency("k")
    s.reset()
    assert s.frequency("k") == before // 2


def test_sketch_ages_automatically() -> None:
    s = FrequencySketch(1024)
    s.sample = 20  # halve after 20 additions (normally 10x the width)
    for _ in range(10):
        s.increment("old")
    for _ in range(10):
        s.increment("new")
    assert s.frequency("old") == 5 and s.frequency("new") == 5
    assert s.additions == 10


def test_sketch_error_is_bounded() -> None:
    """Count-min never undercounts; with 4 rows over 4096 slots, overcounting stays small."""
    s = FrequencySketch(4096)
    rng = random.Random(3)
    truth: dict[str, int] = {}
    for _ in range(3000):
        k = f"k{int(rng.paretovariate(1.2)) % 2000}"
        truth[k] = truth.get(k, 0) + 1
        s.increment(k)
    over = [s.frequency(k) - min(v, 15) for k, v in truth.items()]
    assert min(over) >= 0
    assert sum(1 for o in over if o > 1) / len(over) < 0.05


def test_sketch_is_a_few_bytes_per_entry() -> None:
    s = FrequencySketch(100_000)
    assert len(s.table) <= 4 * 2 * 100_000  # 4 one-byte counters per slot, width < 2x entries


def _contest(candidate_freq: int, victim_freq: int) -> str:
    """Probation holds an older entry "v" and a candidate "c" just pushed out of the window."""
    p = TinyLFUPolicy(10_000)
    p.probation.update(v=100, c=100)
    p.probation_bytes = 200
    p.candidates.append("c")
    for _ in range(candidate_freq):
        p.sketch.increment("c")
    for _ in range(victim_freq):
        p.sketch.increment("v")
    return p.victim()


def test_admission_contest() -> None:
    assert _contest(candidate_freq=1, victim_freq=5) == "c"  # a one-off is turned away
    assert _contest(candidate_freq=9, victim_freq=5) == "v"  # a frequent newcomer gets in
    assert _contest(candidate_freq=5, victim_freq=5) == "c"  # ties keep the incumbent


def test_newcomers_always_enter_the_window() -> None:
    p = TinyLFUPolicy(100_000)
    p.insert("new", 10)
    assert "new" in p.window and not p.candidates


@pytest.mark.reliability
async def test_scan_of_one_off_keys_does_not_flush_hot_entries() -> None:
    size = 100
    budget = 100 * (size + ENTRY_OVERHEAD + 8)

    async def run(policy: str) -> float:
        store = MemoryStore(budget, eviction=policy)
        hot = [f"hot{i:03d}" for i in range(50)]
        for _ in range(20):
            for k in hot:
                if store.get_now(k) is None:
                    await store.set(k, b"x" * size)
        for i in range(2000):  # a flood of unique questions
            k = f"scan{i:05d}"
            if store.get_now(k) is None:
                await store.set(k, b"x" * size)
        return sum(store.get_now(k) is not None for k in hot) / len(hot)

    assert await run("lru") == 0.0
    assert await run("tinylfu") >= 0.9


async def test_cost_aware_keeps_expensive_entries() -> None:
    size = 100
    budget = 60 * (size + ENTRY_OVERHEAD + 8)
    store = MemoryStore(budget, eviction="tinylfu-cost")
    from keymiss.stores import Write

    for _round in range(6):
        for i in range(40):
            for kind, cost in (("cheap", 0.001), ("dear", 1.0)):
                k = f"{kind}{i:02d}"
                if store.get_now(k) is None:
                    await store.set_many([Write(k, b"x" * size, cost=cost)])
    dear = sum(store.get_now(f"dear{i:02d}") is not None for i in range(40))
    cheap = sum(store.get_now(f"cheap{i:02d}") is not None for i in range(40))
    assert dear > cheap


async def test_budget_never_exceeded_with_random_sizes() -> None:
    budget = 1024**2
    for policy in ("tinylfu", "tinylfu-cost"):
        store = MemoryStore(budget, eviction=policy)
        rng = random.Random(5)
        for _ in range(5000):
            k = f"k{int(rng.paretovariate(1.1)) % 3000}"
            if store.get_now(k) is None:
                await store.set(k, b"x" * int(rng.lognormvariate(7, 1.2) % 200_000))
            assert store.used_bytes <= budget
        recount = sum(len(k) + len(v.value) + ENTRY_OVERHEAD for k, v in store._data.items())
        assert recount == store.used_bytes
        p = store.policy
        assert isinstance(p, TinyLFUPolicy)
        assert p.window_bytes + p.probation_bytes + p.protected_bytes == store.used_bytes
        assert len(p.window) + len(p.probation) + len(p.protected) == len(store._data)


async def test_engine_counts_evictions_per_keyspace() -> None:
    km = Keymiss(store="memory", max_memory=20 * (ENTRY_OVERHEAD + 200), eviction="lru", sweep_interval=0)

    @km.keyspace("e:*")
    def e(key: str) -> str:
        return "v" * 100

    for i in range(60):
        await km.get(f"e:{i}")
    stats = km.stats()["keyspaces"]["e:*"]
    assert stats["evictions"] > 0
    assert km.stats()["store"]["eviction_policy"] == "lru"
    await km.close()


def test_sketch_growth_keeps_what_it_knew() -> None:
    """Widening the table tiles each row, so every key reads the same cells' values as before."""
    s = FrequencySketch(64)
    truth = {f"k{i}": 1 + i % 15 for i in range(20)}  # sparse: 20 keys over 64 slots per row
    for k, n in truth.items():
        for _ in range(n):
            s.increment(k)
    before = {k: s.frequency(k) for k in truth}
    exact = [k for k in truth if before[k] == truth[k]]  # keys no collision inflated
    assert len(exact) >= 15
    additions = s.additions

    s.resize(4096)
    assert s.width == 4096 and len(s.table) == 4 * 4096
    after = {k: s.frequency(k) for k in truth}
    assert all(after[k] >= before[k] for k in truth)  # count-min never loses a count
    assert after == before  # in fact the very same estimates
    assert all(after[k] == truth[k] for k in exact)
    assert s.additions == additions  # aging bookkeeping carries over...
    assert s.sample == 10 * 4096  # ...and the sample scales with the width

    s.increment("k0")  # the grown sketch keeps counting from there
    assert s.frequency("k0") == min(before["k0"] + 1, 15)

    table = bytes(s.table)
    s.resize(100)  # growth only: a smaller size changes nothing
    assert s.width == 4096 and bytes(s.table) == table


async def test_hot_keys_survive_a_flood_while_the_cache_is_still_growing() -> None:
    """A fresh store's sketch grows from 1024 slots as entries arrive; it must not forget the hot set."""

    async def hot_left(policy: str) -> int:
        store = MemoryStore(4 * 1024**2, eviction=policy)  # about 6,500 entries of this size
        value = b"v" * 300
        hot = [f"hot:{i:03d}" for i in range(100)]
        for k in hot:
            await store.set(k, value)
        for _ in range(50):
            for k in hot:
                assert store.get_now(k) is not None
        for i in range(30_000):  # one-off keys, each read once
            k = f"once:{i:05d}"
            await store.set(k, value)
            store.get_now(k)
        return sum(store.get_now(k) is not None for k in hot)

    assert await hot_left("lru") <= 10
    assert await hot_left("tinylfu") >= 90


def test_hits_are_buffered_and_replayed_at_the_next_write() -> None:
    store = MemoryStore(10_000_000, eviction="tinylfu")
    policy = store.policy
    assert isinstance(policy, TinyLFUPolicy)
    store.set_now("hot", b"v")
    for _ in range(5):
        assert store.get_now("hot") is not None
    assert policy.sketch.frequency("hot") == 1  # the hits wait in the read buffer
    store.set_now("other", b"v")  # a write replays them first
    assert policy.sketch.frequency("hot") == 6 and not policy.reads


def test_a_full_read_buffer_drops_samples_never_hits_or_expiry() -> None:
    now = [1000.0]
    store = MemoryStore(10_000_000, eviction="tinylfu", clock=lambda: now[0])
    policy = store.policy
    assert isinstance(policy, TinyLFUPolicy)
    store.set_now("k", b"v", ttl=5)
    for _ in range(5000):  # far more hits than the buffer holds, and no write
        assert store.get_now("k") is not None
    assert len(policy.reads) == 1024  # bounded: the oldest reads were forgotten
    now[0] += 6
    assert store.get_now("k") is None  # the TTL holds whatever the buffer did
    store.set_now("w", b"v")
    assert not policy.reads and policy.sketch.frequency("k") == 15


def test_aggregated_victims_keep_many_small_entries_over_one_big_one() -> None:
    """A big candidate used a bit more than each small entry, but far less than the 45 of them its
    bytes would displace: aggregated victims keep the small ones; one-victim-at-a-time lets it in."""
    kept = {}
    for admission in ("av", "iv"):
        policy = TinyLFUPolicy(100_000, admission=admission)
        store = MemoryStore(100_000, eviction=policy)
        small = [f"s{i}" for i in range(200)]
        for k in small:
            store.set_now(k, b"x" * 100)
        for _ in range(2):
            for k in small:
                store.get_now(k)
        for _ in range(4):
            store.get_now("big")  # misses: the sketch learns it is wanted (more than each small key)
        store.set_now("big", b"x" * 20_000)  # enters the window, as every newcomer does
        store.set_now("next", b"x" * 100)  # pushes it out of the window: the admission contest
        kept[admission] = "big" in policy.probation or "big" in policy.protected
    assert kept == {"av": False, "iv": True}, kept


def test_a_period_that_fell_halves_the_counts_once_not_at_every_addition() -> None:
    """The worth policy sets the period from the entries held: after a clear it falls far below
    the additions counted. The next addition halves the counts once; the ones after it do not."""
    s = FrequencySketch(64, cap=255)
    for _ in range(40):
        s.increment("favourite")
    s.sample = 100_000
    s.additions = 99_999  # a long period, nearly over
    s.sample = 100  # ... and then far fewer entries
    s.increment("a")  # the period is over: one halving
    assert s.frequency("favourite") == 20
    for key in ("b", "c", "d", "e"):
        s.increment(key)
    assert s.frequency("favourite") == 20  # halved once, not at each of these
