"""A handler's failures: logged once per window with their traceback, remembered for
``error_ttl`` (fresh each time, bounded in number), and told to clients in full or by type only;
a handler raising a base exception fails only its key."""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator

import pytest

from keymiss import ComputeTimeoutError, HandlerError, Keymiss, KeymissError


@pytest.fixture
async def km() -> AsyncIterator[Keymiss]:
    app = Keymiss(store="memory", max_memory="64MB", sweep_interval=0)
    yield app
    await app.close(grace=1)


async def test_failures_are_logged_once_per_window(km: Keymiss, caplog: pytest.LogCaptureFixture) -> None:
    @km.keyspace("fail:*")
    def fail(key: str) -> str:
        raise ValueError("model exploded")

    never = asyncio.Event()

    @km.keyspace("late:*", timeout=0.05)
    async def late(key: str) -> str:
        await never.wait()  # never set: it hangs until its timeout
        return "never"

    caplog.set_level(logging.ERROR, logger="keymiss.handler")
    for i in range(20):
        with pytest.raises(HandlerError):
            await km.get(f"fail:{i}")
    records = [r for r in caplog.records if r.name == "keymiss.handler"]
    assert len(records) == 1
    (first,) = records
    assert "fail:*" in first.getMessage() and "fail:0" in first.getMessage()
    assert first.exc_info is not None and "model exploded" in caplog.text  # with its traceback
    km.engine._lanes["fail:*"].failures.window = 0  # the window is over, for the test
    with pytest.raises(HandlerError):
        await km.get("fail:again")
    records = [r for r in caplog.records if r.name == "keymiss.handler"]
    assert len(records) == 2 and "19 similar failure(s)" in records[1].getMessage()
    with pytest.raises(ComputeTimeoutError):
        await km.get("late:1")  # timeouts are logged too, on their own keyspace's window
    assert any("did not finish" in r.getMessage() and "late:*" in r.getMessage() for r in caplog.records)


async def test_long_keys_are_truncated_in_the_log(km: Keymiss, caplog: pytest.LogCaptureFixture) -> None:
    @km.keyspace("fail:*")
    def fail(key: str) -> str:
        raise ValueError("no")

    caplog.set_level(logging.ERROR, logger="keymiss.handler")
    with pytest.raises(HandlerError):
        await km.get("fail:" + "x" * 4000)  # the longest a keyspace owns is 4096 bytes
    assert len(caplog.records[-1].getMessage()) < 1000


async def test_remembered_errors_are_raised_fresh_and_stay_small(km: Keymiss) -> None:
    calls = 0

    @km.keyspace("bad:*", error_ttl=60)
    def bad(key: str) -> str:
        nonlocal calls
        calls += 1
        raise ValueError("broken input")

    seen: list[KeymissError] = []
    depths: list[int] = []
    for _ in range(200):
        try:
            await km.get("bad:1")
        except HandlerError as exc:
            seen.append(exc)
            depths.append(len(traceback.extract_tb(exc.__traceback__)))
    assert calls == 1 and len(seen) == 200
    assert len({id(e) for e in seen}) == 200  # a new exception each time
    assert max(depths[1:]) == min(depths[1:])  # its traceback does not grow with every raise
    assert all(str(e) == str(seen[0]) and e.keyspace == "bad:*" for e in seen)


async def test_clients_see_only_the_type_when_asked(km: Keymiss) -> None:
    @km.keyspace("leak:*")
    def leak(key: str) -> str:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    @km.keyspace("quiet:*", error_detail="type")
    def quiet(key: str) -> str:
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    @km.keyspace("quietbatch:*", error_detail="type", batch_size=4, batch_wait_ms=1)
    def quiet_batch(keys: list[str]) -> list[object]:
        return [RuntimeError("password=hunter2") for _ in keys]

    with pytest.raises(HandlerError, match="RuntimeError: password=hunter2"):
        await km.get("leak:1")
    for key in ("quiet:1", "quietbatch:1"):
        with pytest.raises(HandlerError) as info:
            await km.get(key)
        assert "hunter2" not in str(info.value) and "RuntimeError" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)  # the original stays for the log


async def test_the_engine_wide_default_hides_messages() -> None:
    km = Keymiss(sweep_interval=0, error_detail="type")

    @km.keyspace("x:*")
    def x(key: str) -> str:
        raise KeyError("/etc/shadow")

    with pytest.raises(HandlerError) as info:
        await km.get("x:1")
    assert "shadow" not in str(info.value)
    await km.close()


@pytest.mark.parametrize("kind", [SystemExit, KeyboardInterrupt, asyncio.CancelledError])
@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
async def test_a_handler_raising_a_base_exception_fails_only_its_key(
    km: Keymiss, kind: type[BaseException], sync: bool
) -> None:
    if sync:

        def handler(key: str) -> str:
            raise kind("from the handler")
    else:

        async def handler(key: str) -> str:  # type: ignore[misc]
            raise kind("from the handler")

    km.add_keyspace("boom:*", handler)

    @km.keyspace("ok:*")
    def ok(key: str) -> str:
        return "fine"

    with pytest.raises(HandlerError, match=kind.__name__):
        await km.get("boom:1")
    assert await km.get("ok:1") == "fine"
    assert km.stats()["keyspaces"]["boom:*"]["errors"] == 1


async def test_type_only_errors_hide_a_handlers_own_keymiss_error(km: Keymiss) -> None:
    from keymiss import StoreError

    @km.keyspace("tkm:*", error_detail="type")
    def tkm(key: str) -> str:
        raise StoreError("db password=hunter2")

    with pytest.raises(KeymissError) as info:
        await km.get("tkm:1")
    assert "hunter2" not in str(info.value) and "StoreError" in str(info.value)


async def test_remembered_errors_of_distinct_keys_are_bounded(km: Keymiss) -> None:
    @km.keyspace("bad:*", error_ttl=0.05)
    def bad(key: str) -> str:
        raise ValueError("no")

    for i in range(3000):
        with pytest.raises(HandlerError):
            await km.get(f"bad:{i}")
    await asyncio.sleep(0.06)
    for i in range(3000, 3100):  # new failures push out the expired ones
        with pytest.raises(HandlerError):
            await km.get(f"bad:{i}")
    remembered = len(km.engine.errors)
    assert remembered < 3000 - 64 * 10, remembered
    await asyncio.sleep(0.06)
    assert km.engine.sweep() > 0 and not km.engine.errors  # the periodic sweep takes the rest
