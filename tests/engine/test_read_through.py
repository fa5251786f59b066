"""The read-through engine: a miss computes and stores, a hit does not; templates, codecs, errors
remembered or not, the store's failures, Redis-like key commands and the engine's configuration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from keymiss import (
    CodecError,
    HandlerError,
    KeyMismatchError,
    Keymiss,
    KeymissError,
    MemoryStore,
    StoreError,
)
from keymiss.stores import Write

from ..conftest import FakeClock


async def test_miss_computes_then_hit_does_not(km: Keymiss) -> None:
    calls: list[str] = []

    @km.keyspace("double:*")
    def double(key: str) -> str:
        calls.append(key)
        return str(2 * int(key.split(":")[1]))

    assert await km.get("double:21") == "42"
    assert await km.get("double:21") == "42"
    assert calls == ["double:21"]
    ks = km.stats()["keyspaces"]["double:*"]
    assert (ks["hits"], ks["misses"], ks["computations"]) == (1, 1, 1)


async def test_stored_bytes_are_what_a_redis_client_sees(km: Keymiss) -> None:
    @km.keyspace("doc:*")
    async def doc(key: str) -> dict[str, object]:
        return {"key": key, "n": 1}

    assert await km.get("doc:1") == {"key": "doc:1", "n": 1}
    item = km.store.get_now("doc:1")
    assert item is not None and item.value == b'{"key":"doc:1","n":1}'


async def test_unregistered_key_is_a_plain_miss(km: Keymiss) -> None:
    @km.keyspace("double:*")
    def double(key: str) -> str:
        raise AssertionError("must not run")

    assert await km.get("nothing:here") is None
    await km.set("nothing:here", "set by a client")
    assert await km.get("nothing:here") == "set by a client"


async def test_template_fields_reach_handler(km: Keymiss) -> None:
    seen: list[tuple[str, str, str]] = []

    @km.keyspace("bertqa{<tag>}_<context>_<question>", ttl=3600)
    async def qa(tag: str, context: str, question: str) -> str:
        seen.append((tag, context, question))
        return "answer"

    key = "bertqa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral_transmission among adults"
    assert await km.get(key) == "answer"
    assert seen == [("8YG", "PMC302072.xml:{8YG}:10", "Who performs viral_transmission among adults")]
    assert 3590 <= await km.ttl(key) <= 3600


async def test_template_mismatch_runs_nothing(km: Keymiss) -> None:
    ran = []

    @km.keyspace("bertqa{<tag>}_<context>_<question>")
    def qa(tag: str, context: str, question: str) -> str:
        ran.append(1)
        return ""

    with pytest.raises(KeyMismatchError, match="does not fit keyspace template"):
        await km.get("bertqa{8YG}_missing-question")
    assert ran == []
    assert await km.exists("bertqa{8YG}_missing-question") == 0


@pytest.mark.reliability
async def test_store_failure_is_reported_and_engine_keeps_serving(km: Keymiss) -> None:
    class FailingStore(MemoryStore):
        fail = True

        async def set_many(self, writes: Sequence[Write]) -> list[bool]:
            if self.fail:
                raise StoreError("No space left on device")
            return await super().set_many(writes)

    store = FailingStore(1024**2)
    app = Keymiss(store=store)

    @app.keyspace("k:*")
    async def k(key: str) -> str:
        return "v"

    with pytest.raises(StoreError, match="No space left"):
        await app.get("k:1")
    store.fail = False
    assert await app.get("k:1") == "v"
    await app.close()


async def test_error_ttl_caches_failures_briefly(km: Keymiss) -> None:
    calls = 0

    @km.keyspace("bad:*", error_ttl=60)
    def bad(key: str) -> str:
        nonlocal calls
        calls += 1
        raise RuntimeError("bad input")

    for _ in range(3):
        with pytest.raises(HandlerError):
            await km.get("bad:1")
    assert calls == 1


@pytest.mark.reliability
async def test_unencodable_result_is_an_error_not_a_crash(km: Keymiss) -> None:
    @km.keyspace("obj:*")
    def obj(key: str) -> object:
        return object()

    with pytest.raises(CodecError, match="obj:\\*"):
        await km.get("obj:1")
    assert km.stats()["in_flight"] == 0


async def test_numpy_values_round_trip(km: Keymiss) -> None:
    @km.keyspace("emb:*")
    def emb(key: str) -> np.ndarray:
        return np.arange(6, dtype="float32").reshape(2, 3)

    first = await km.get("emb:1")
    second = await km.get("emb:1")
    assert first.dtype == np.float32 and np.array_equal(first, second)


async def test_undecodable_stored_value_is_recomputed(km: Keymiss) -> None:
    @km.keyspace("j:*", codec="json")
    def j(key: str) -> dict[str, int]:
        return {"ok": 1}

    await km.store.set("j:1", b"\x80\x04garbage", codec=2)
    assert await km.get("j:1") == {"ok": 1}
    assert km.decode_failures == 1
    item = km.store.get_now("j:1")
    assert item is not None and item.value == b'{"ok":1}'


async def test_value_bigger_than_budget_is_returned_not_stored() -> None:
    app = Keymiss(store="memory", max_memory=10_000)

    @app.keyspace("big:*")
    def big(key: str) -> bytes:
        return b"x" * 50_000

    assert await app.get("big:1") == b"x" * 50_000
    assert app.store.get_now("big:1") is None
    assert app.stats()["keyspaces"]["big:*"]["not_stored"] == 1
    await app.close()


async def test_ttl_expiry_through_engine(clock: FakeClock) -> None:
    app = Keymiss(store=MemoryStore(1024**2, clock=clock))
    calls = 0

    @app.keyspace("t:*", ttl=5)
    def t(key: str) -> str:
        nonlocal calls
        calls += 1
        return str(calls)

    assert await app.get("t:1") == "1"
    clock.advance(4)
    assert await app.get("t:1") == "1"
    clock.advance(2)
    assert await app.get("t:1") == "2"
    await app.close()


# --- key commands and configuration ------------------------------------------------------------
async def test_redis_like_key_commands(km: Keymiss) -> None:
    assert await km.set("a", "1")
    assert not await km.set("a", "2", nx=True)
    assert not await km.set("b", "2", xx=True)
    assert await km.exists("a", "a", "b") == 2
    assert await km.ttl("a") == -1
    assert await km.ttl("b") == -2
    assert await km.expire("a", 100)
    assert 99 <= await km.ttl("a") <= 100
    assert await km.persist("a")
    assert not await km.persist("a")
    assert await km.delete("a", "b") == 1
    with pytest.raises(KeymissError, match="invalid expire"):
        await km.set("a", "1", ttl=0)


async def test_forget_drops_a_keyspace(km: Keymiss) -> None:
    @km.keyspace("f:*")
    def f(key: str) -> str:
        return "v"

    await km.get_many([f"f:{i}" for i in range(10)])
    await km.set("keep", "me")
    assert await km.forget("f:*") == 10
    assert await km.exists("keep") == 1
    assert km.store.get_now("f:3") is None


async def test_configure_overrides_store_before_open(tmp_path: Path) -> None:
    app = Keymiss(store="memory", max_memory="1MB")
    app.configure(store=f"lmdb:{tmp_path}/db")
    assert app.store.url == f"lmdb:{tmp_path}/db"
    with pytest.raises(KeymissError, match="already open"):
        app.configure(store="memory")
    await app.close()


async def test_lmdb_backed_engine_survives_reopen(tmp_path: Path) -> None:
    url = f"lmdb:{tmp_path}/cache"
    app = Keymiss(store=url)
    calls = 0

    @app.keyspace("d:*")
    def d(key: str) -> str:
        nonlocal calls
        calls += 1
        return "computed"

    assert await app.get("d:1") == "computed"
    await app.close()
    again = Keymiss(store=url)
    again.add_keyspace("d:*", d)
    assert await again.get("d:1") == "computed"
    assert calls == 1
    await again.close()


async def test_an_exception_whose_message_cannot_be_read_still_gives_a_clear_error(km: Keymiss) -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    @km.keyspace("odd:*")
    def odd(key: str) -> str:
        raise Unprintable()

    with pytest.raises(HandlerError, match=r"handler failed: Unprintable: \(its message could not be read\)"):
        await km.get("odd:1")
