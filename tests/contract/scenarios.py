"""One function per row of the read contract, written once against the ``Frontend`` adapter.

Each scenario gets a front end (not started) and a prefix no other test uses; it registers its
keyspaces under that prefix, starts the front end and asserts the row's cells: what the reader
gets, and how many times the keyspace's function ran (``Fn.calls``). The front ends have no
virtual clock, so TTLs are real and short; everything else waits on events (``Gate``) or on a
condition (``aeventually``), each bounded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial

from ..support import Gate, aeventually
from .frontends import WRITE_OPS, Err, Frontend, Module, Versions
from .handlers import Fn, handler

Scenario = Callable[[Frontend, str], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def row(row_id: str) -> Callable[[Scenario], Scenario]:
    """Register the scenario of the table's row ``row_id``."""

    def register(fn: Scenario) -> Scenario:
        assert row_id not in SCENARIOS, row_id
        SCENARIOS[row_id] = fn
        return fn

    return register


async def elapse(seconds: float) -> None:
    """Let real time pass: a TTL, a stale window or an error_ttl runs out (no front end here has
    a clock the test can move; the waits are hundreds of milliseconds)."""
    await asyncio.sleep(seconds)


async def started(gate: Gate) -> None:
    """Until the held computation runs (a bounded wait: a computation that never starts fails)."""
    await gate.wait_started(3)


async def stored(fe: Frontend, key: str, expect: int = 1) -> None:
    """``key`` exists (or not): what the store holds, read without computing."""
    await aeventually(lambda: fe.exists(key), expect=expect, timeout=5, message=f"EXISTS {key}")


# --- the rows ------------------------------------------------------------------------------------------
@row("hit")
async def hit(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    for _ in range(3):
        assert await fe.get(key) == f"{key}#1"
    assert fn.calls[key] == 1


@row("miss")
async def miss(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    key = f"{p}:k"
    gate = fn.hold()
    readers = [asyncio.ensure_future(fe.get(key)) for _ in range(5)]
    await started(gate)
    await aeventually(lambda: fe.misses(f"{p}:*"), expect=5, timeout=5, message="5 readers wait")
    gate.open()
    assert await asyncio.gather(*readers) == [f"{key}#1"] * 5
    assert fn.calls[key] == 1
    await stored(fe, key)


@row("stale")
async def stale(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=0.2, stale=30)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    await elapse(0.3)
    gate = fn.hold()
    t0 = time.monotonic()
    assert await fe.get(key, wait=3) == f"{key}#1"  # the old value at once, while it refreshes
    assert time.monotonic() - t0 < 1.0
    await started(gate)
    assert fn.calls[key] == 2
    gate.open()
    await aeventually(lambda: fe.get(key), expect=f"{key}#2", timeout=5)
    assert fn.calls[key] == 2


@row("past-stale")
async def past_stale(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=0.15, stale=0.15)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    await elapse(0.4)
    assert await fe.get(key) == f"{key}#2"
    assert fn.calls[key] == 2


@row("early")
async def early(fe: Frontend, p: str) -> None:
    fn = Fn(delay=0.05)  # XFetch scales by how long a computation takes: it must take some time
    fe.keyspace(f"{p}:*", handler(fn), ttl=1.0, early_refresh=1000)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    await elapse(0.55)  # past half the TTL: an early refresh may be drawn (and with beta 1000, is)
    gate = fn.hold()

    async def read_until_refresh() -> bool:
        assert await fe.get(key, wait=2) == f"{key}#1"  # the stored value at once
        return fn.calls[key] == 2

    await aeventually(read_until_refresh, timeout=3, interval=0.02)
    await started(gate)
    gate.open()
    await aeventually(lambda: fe.get(key), expect=f"{key}#2", timeout=5)
    assert fn.calls[key] == 2


@row("value-ttl")
async def value_ttl(fe: Frontend, p: str) -> None:
    fn = Fn()
    short, plain = f"{p}:short", f"{p}:plain"
    fn.ttls[short] = 0.3  # the handler returns Value(..., ttl=0.3) for this key only
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    assert await fe.get(short) == f"{short}#1"  # the value itself, not a wrapper
    assert await fe.get(plain) == f"{plain}#1"
    assert await fe.get(short) == f"{short}#1"  # a hit inside its own TTL
    await stored(fe, short, expect=0)  # gone at its own TTL, well inside the keyspace's
    assert await fe.get(short) == f"{short}#2"
    assert await fe.get(plain) == f"{plain}#1"  # the keyspace's TTL holds the other
    assert (fn.calls[short], fn.calls[plain]) == (2, 1)


@row("other-version")
async def other_version(fe: Frontend, p: str) -> None:
    fn, versions = Fn(), Versions()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, version=versions)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    assert await fe.get(key) == f"{key}#1"  # a hit (a near cache holds it now)
    await fe.switched(f"{p}:*", versions, "v2")
    got = await asyncio.gather(*(fe.get(key) for _ in range(3)))
    assert got == [f"{key}#2"] * 3  # never the old version's value; computed once
    assert fn.calls[key] == 2


@row("version-stale")
async def version_stale(fe: Frontend, p: str) -> None:
    fn, versions = Fn(), Versions()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, version=versions, version_stale=30)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    await fe.switched(f"{p}:*", versions, "v2")
    gate = fn.hold()
    assert await fe.get(key, wait=3) == f"{key}#1"  # the old value at once
    await started(gate)
    gate.open()
    await aeventually(lambda: fe.get(key), expect=f"{key}#2", timeout=5)
    assert fn.calls[key] == 2


@row("client-value")
async def client_value(fe: Frontend, p: str) -> None:
    fn, versions = Fn(), Versions()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, version=versions)
    await fe.start()
    key = f"{p}:k"
    await fe.set(key, "written")
    await fe.switched(f"{p}:*", versions, "v2")
    assert await fe.get(key) == "written"
    assert fn.total == 0


@row("ttl-change")
async def ttl_change(fe: Frontend, p: str) -> None:
    fn, versions = Fn(), Versions()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, version=versions)
    await fe.start()
    changes: dict[str, Callable[[str], Awaitable[bool]]] = {
        "EXPIRE": lambda k: fe.expire(k, 100),
        "PERSIST": fe.persist,
        "GETEX": lambda k: fe.getex(k, 100),
    }
    keys = {op: f"{p}:{op.lower()}" for op in changes if op in fe.ops}
    for op, key in keys.items():
        assert await fe.get(key) == f"{key}#1"
        assert await changes[op](key), op  # the computed value's TTL changed
    await fe.switched(f"{p}:*", versions, "v2")
    got = {op: await fe.get(key) for op, key in keys.items()}
    assert got == {op: f"{key}#2" for op, key in keys.items()}  # a TTL change is not a write
    assert fn.total == 2 * len(keys)


@row("error")
async def error(fe: Frontend, p: str) -> None:
    fn = Fn()
    fn.fail = True
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, error_ttl=0.3)
    await fe.start()
    key = f"{p}:k"
    first = await fe.get(key)
    assert isinstance(first, Err) and f"no value for {key} (run 1)" in first.text, first
    assert await fe.get(key) == first  # the same line, remembered: no new run
    assert fn.calls[key] == 1
    await elapse(0.35)
    again = await fe.get(key)
    assert isinstance(again, Err) and "(run 2)" in again.text, again
    assert fn.calls[key] == 2


@row("no-template")
async def no_template(fe: Frontend, p: str) -> None:
    fn = Fn()
    pattern = f"{p}{{<tag>}}_<a>_<b>"

    async def fields(tag: str, a: str, b: str) -> str:
        return await fn(f"{tag}/{a}/{b}")

    fe.keyspace(pattern, fields, ttl=60)
    await fe.start()
    assert await fe.get(f"{p}{{t}}_1_2") == "t/1/2#1"  # a key that fits
    got = await fe.get(f"{p}{{t}}_oops")
    assert isinstance(got, Err) and pattern in got.text, got
    assert fn.total == 1


@row("not-ours")
async def not_ours(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    assert await fe.get(f"{p}-other:k") is None
    assert fn.total == 0


@row("long-key")
async def long_key(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    key = f"{p}:" + "x" * 4096  # over the 4096 bytes a keyspace key may have
    assert await fe.get(key) is None  # no keyspace's, on every front end: nothing computed
    assert fn.total == 0
    assert await fe.get(f"{p}:short") == f"{p}:short#1"  # the keyspace keeps serving


@row("full-queue")
async def full_queue(fe: Frontend, p: str) -> None:
    fn, other = Fn(), Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, concurrency=1, queue=1)
    fe.keyspace(f"{p}-free:*", handler(other), ttl=60)
    await fe.start()
    gate = fn.hold()
    waiting = [asyncio.ensure_future(fe.get(f"{p}:0"))]
    await started(gate)
    busy: Err | None = None
    for i in range(1, 5):  # more readers of other keys, until the bound refuses one
        reader = asyncio.ensure_future(fe.get(f"{p}:{i}"))

        async def decided(n: int = i + 1) -> bool:  # the reader's miss reached the bound's check
            return await fe.misses(f"{p}:*") >= n

        await aeventually(decided, timeout=5, message=f"reader {i} is counted")
        done, _ = await asyncio.wait([reader], timeout=0.1)  # a refusal comes at once
        if done:
            busy = reader.result()
            assert isinstance(busy, Err) and busy.says("busy"), busy
            assert fn.calls[f"{p}:{i}"] == 0
            break
        waiting.append(reader)
    assert busy is not None, "no reader was refused"
    assert await fe.get(f"{p}-free:k") == f"{p}-free:k#1"  # the server keeps serving
    gate.open()
    got = await asyncio.gather(*waiting)
    assert got[0] == f"{p}:0#1", got  # the one that ran
    # the queued ones computed (one whose refusal came later than the 0.1 s window may be busy too)
    assert all(
        g == f"{k}#1" or (isinstance(g, Err) and g.says("busy"))
        for k, g in zip([f"{p}:{i}" for i in range(len(got))], got, strict=True)
    ), got


@row("deadline")
async def deadline(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, timeout=0.3)
    await fe.start()
    key = f"{p}:k"
    fn.hold()  # never opened before the timeout
    got = await fe.get(key)
    assert isinstance(got, Err) and got.says("timeout", "timed out", "did not finish within"), got
    assert fn.calls[key] == 1
    fn.release()
    assert await fe.exists(key) == 0


async def _during(fe: Frontend, fn: Fn, key: str, act: Callable[[], Awaitable[object]]) -> object:
    """Read ``key`` while its computation is held, ``act`` meanwhile; the reader's reply."""
    gate = fn.hold()
    reader = asyncio.ensure_future(fe.get(key))
    await started(gate)
    await act()
    fn.gate = None
    gate.open()
    return await reader


@row("write-during")
async def write_during(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    ways: dict[str, Callable[[str], Awaitable[object]]] = {"SET": lambda k: fe.set(k, "written")}
    if "RENAME" in fe.ops:

        async def rename(k: str) -> None:
            await fe.set(f"{p}-src", "written")
            await fe.rename(f"{p}-src", k)

        ways["RENAME"] = rename
    for how in sorted(WRITE_OPS & fe.ops):
        ways[how] = partial(fe.write, how=how)
    for way, act in ways.items():
        key = f"{p}:{way.lower().replace(' ', '-')}"
        assert await _during(fe, fn, key, partial(act, key)) == f"{key}#1"
        assert await fe.get(key) == "written"  # the client's value stays stored
        assert fn.calls[key] == 1


@row("del-during")
async def del_during(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    for how in [h for h in ("DEL", "UNLINK", "GETDEL") if h in fe.ops]:
        key = f"{p}:{how.lower()}"
        got = await _during(fe, fn, key, partial(fe.delete, key, how))
        assert got == f"{key}#1", (how, got)
        assert await fe.exists(key) == 0, how  # nothing stored
        assert await fe.get(key) == f"{key}#2", how  # the next read computes again
        assert fn.calls[key] == 2, how


@row("forget")
async def forget(fe: Frontend, p: str) -> None:
    fn = Fn()

    async def by_fields(user: str, n: str) -> str:
        return await fn(f"{p}:{user}:{n}")

    by_fields.fn = fn  # type: ignore[attr-defined]
    fe.keyspace(f"{p}:<user>:<n>", by_fields, ttl=60, tags=[f"{p}-user:<user>", f"{p}-all"])
    await fe.start()
    keys = [f"{p}:1:a", f"{p}:1:b", f"{p}:12:a", f"{p}:2:a"]
    for key in keys:
        assert await fe.get(key) == f"{key}#1"
    await fe.set(f"{p}-other", "kept")
    # a tag: exactly the keys that carry it (<user> 1, not 12), which compute again when read
    assert await fe.forget(tag=f"{p}-user:1") == 2
    assert [await fe.exists(k) for k in keys] == [0, 0, 1, 1]
    assert await fe.get(f"{p}:1:a") == f"{p}:1:a#2"
    # a key being computed: its reader gets the value, which is not stored (as after DEL)
    key = f"{p}:3:a"
    assert await _during(fe, fn, key, partial(fe.forget, f"{p}:3:*")) == f"{key}#1"
    assert await fe.exists(key) == 0
    # a glob forgets the keys a keyspace owns, never the others; a fixed label, its keyspace's keys
    assert await fe.forget(f"{p}*") == 3
    assert await fe.get(f"{p}-other") == "kept"
    assert await fe.get(f"{p}:2:a") == f"{p}:2:a#2"
    assert await fe.forget(tag=f"{p}-all") == 1
    # refused: a glob no keyspace's keys can match, a tag no keyspace declares
    refused = await fe.forget(f"{p}-other*")
    assert isinstance(refused, Err) and refused.says("no keyspace's keys match"), refused
    refused = await fe.forget(tag=f"{p}-nobody")
    assert isinstance(refused, Err) and refused.says("no keyspace declares that tag"), refused
    assert await fe.get(f"{p}-other") == "kept"


@row("ttl-during")
async def ttl_during(fe: Frontend, p: str) -> None:
    fn, versions = Fn(), Versions()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60, version=versions)
    await fe.start()
    changes: dict[str, Callable[[str], Awaitable[bool]]] = {
        "EXPIRE": lambda k: fe.expire(k, 100),
        "PERSIST": fe.persist,
    }
    keys = {op: f"{p}:{op.lower()}" for op in changes}
    for key in keys.values():
        assert await fe.get(key) == f"{key}#1"
    await fe.switched(f"{p}:*", versions, "v2")
    for op, key in keys.items():
        got = await _during(fe, fn, key, partial(changes[op], key))
        assert got == f"{key}#2", (op, got)
        assert await fe.get(key) == f"{key}#2", op  # stored
        assert fn.calls[key] == 2, op


@row("expiry-during")
async def expiry_during(fe: Frontend, p: str) -> None:
    fn, versions = Fn(), Versions()
    fe.keyspace(f"{p}:*", handler(fn), ttl=0.5, version=versions)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    await fe.switched(f"{p}:*", versions, "v2")

    async def expired() -> None:  # the hidden value's TTL runs out while the recomputation waits
        await aeventually(lambda: fe.exists(key), expect=0, timeout=5, interval=0.02)

    assert await _during(fe, fn, key, expired) == f"{key}#2"
    assert await fe.get(key) == f"{key}#2"  # stored (inside its TTL), not computed again
    assert fn.calls[key] == 2


@row("write-after")
async def write_after(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    key = f"{p}:k"
    assert await fe.get(key) == f"{key}#1"
    await fe.set(key, "written")
    assert await fe.get(key) == "written"
    assert fn.calls[key] == 1


@row("flush-during")
async def flush_during(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    for how in [h for h in ("FLUSHALL", "FLUSHDB") if h in fe.ops]:
        key = f"{p}:{how.lower()}"
        got = await _during(fe, fn, key, partial(fe.flush, how))
        assert got == f"{key}#1", (how, got)
        assert await fe.exists(key) == 0, how  # nothing stored
        assert fn.calls[key] == 1, how


@row("multi")
async def multi(fe: Frontend, p: str) -> None:
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    ways = {"MULTI": fe.in_multi, "EVAL": fe.in_eval}
    for way in [w for w in ways if w in fe.ops]:
        key = f"{p}:{way.lower()}"
        assert await ways[way](key) == ([None] if way == "MULTI" else None), way
        await aeventually(partial(fn.calls.get, key, 0), expect=1, timeout=5, message=f"{way} computes")
        await stored(fe, key)
        assert await fe.get(key) == f"{key}#1"
        assert fn.calls[key] == 1


@row("mget")
async def mget(fe: Frontend, p: str) -> None:
    fn, fresh = Fn(), Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    fe.keyspace(f"{p}-s:*", handler(fresh), ttl=0.2, stale=30)
    await fe.start()
    hit, missing, old, stranger = f"{p}:hit", f"{p}:miss", f"{p}-s:old", f"{p}-none:k"
    assert await fe.get(old) == f"{old}#1"
    assert await fe.get(hit) == f"{hit}#1"
    await elapse(0.3)
    got = await fe.mget([hit, missing, old, stranger])
    assert got == [f"{hit}#1", f"{missing}#1", f"{old}#1", None]
    assert (fn.calls[hit], fn.calls[missing]) == (1, 1)
    # the stale one refreshed by the MGET itself (no other read asks for it)
    await aeventually(lambda: fresh.calls[old], expect=2, timeout=2, message="the MGET's refresh")
    await aeventually(lambda: fe.get(old), expect=f"{old}#2", timeout=5)
    assert fresh.calls[old] == 2


@row("before-worker")
async def before_worker(fe: Frontend, p: str) -> None:
    assert isinstance(fe, Module)
    assert fe.declared is not None, "the server does not take KEYSPACE and GRACE at load"
    pattern = fe.declared
    base = pattern.rstrip("*")
    # no worker comes: a no-worker error once the grace is over, never nil
    t0 = time.monotonic()
    got = await fe.get(f"{base}{p}-none", wait=3)
    assert isinstance(got, Err) and got.says("no worker"), got
    assert time.monotonic() - t0 >= 0.2  # it waited for the grace
    # a worker comes within the grace: the value
    fn = Fn()
    fe.keyspace(pattern, handler(fn), ttl=60)
    key = f"{base}{p}-later"
    reader = asyncio.ensure_future(fe.get(key, wait=5))
    await asyncio.sleep(0.05)
    await fe.start()
    assert await reader == f"{key}#1"


@row("dead-worker")
async def dead_worker(fe: Frontend, p: str) -> None:
    assert isinstance(fe, Module)
    fn = Fn()
    fe.keyspace(f"{p}:*", handler(fn), ttl=60)
    await fe.start()
    gate = fn.hold()
    reader = asyncio.ensure_future(fe.get(f"{p}:k", wait=3))
    await started(gate)
    await fe.kill_worker()
    got = await reader
    assert isinstance(got, Err) and got.says("no worker"), got
    again = await fe.get(f"{p}:new", wait=3)  # new misses too
    assert isinstance(again, Err) and again.says("no worker"), again
