"""Edges of the synchronous face: calls racing ``close`` get an error, never a hang; a failed
start hook is retried; several loops awaiting a cached function first share one home loop; a
forked child (gunicorn --preload) starts a loop of its own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from keymiss import Keymiss, KeymissError, StoreError

from ..redis_servers import RedisProcess

pytestmark = pytest.mark.timeout(60)


def test_calls_racing_close_end_with_an_error_never_a_hang() -> None:
    for _ in range(5):
        _close_race()


def _close_race() -> None:
    km = Keymiss()

    @km.cached("sq:{n}", ttl=60)
    def square(n: int) -> int:
        return n * n

    square(1)
    stop = threading.Event()
    errors: list[BaseException] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                square(1)
            except Exception as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    km.sync.close()
    stop.set()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert all(isinstance(e, StoreError) for e in errors), errors
    with pytest.raises(StoreError, match="closed"):
        square(1)


def test_a_call_computing_when_close_gives_up_gets_a_keymiss_error() -> None:
    km = Keymiss()
    entered, release = threading.Event(), threading.Event()

    @km.cached("slow:{n}", ttl=60)
    def slow(n: int) -> int:
        entered.set()
        release.wait(10)
        return n

    out: list[BaseException | int] = []

    def caller() -> None:
        try:
            out.append(slow(1))
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=caller, daemon=True)
    t.start()
    assert entered.wait(10)
    km.sync.close(grace=0.05)
    release.set()
    t.join(10)
    assert not t.is_alive()
    assert isinstance(out[0], StoreError) and "closed" in str(out[0]), out


def test_close_on_keymiss_own_loop_is_refused() -> None:
    km = Keymiss()

    @km.cached("sq:{n}")
    def square(n: int) -> int:
        return n * n

    async def main() -> None:
        assert await square.acall(2) == 4
        with pytest.raises(KeymissError, match="event loop keymiss runs on"):
            km.sync.close()
        assert await square.acall(3) == 9  # still serving
        await km.close()

    asyncio.run(main())


def test_a_start_hook_that_failed_is_run_again_by_the_next_call() -> None:
    km = Keymiss()
    attempts: list[int] = []

    async def hook(_: Keymiss) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("not up yet")

    km.on_start(hook)

    @km.cached("sq:{n}")
    def square(n: int) -> int:
        return n * n

    with pytest.raises(ConnectionError):
        square(3)
    assert square(3) == 9
    assert len(attempts) == 2
    km.sync.close()


def test_loops_awaiting_a_cached_function_first_share_one_home() -> None:
    for _ in range(5):
        _first_awaits_from_loops()


def _first_awaits_from_loops() -> None:
    km = Keymiss()
    calls: list[int] = []
    loops = 6
    started = threading.Barrier(loops)
    finished = threading.Barrier(loops)

    @km.cached("asq:{n}", ttl=60)
    async def asq(n: int) -> int:
        calls.append(n)
        await asyncio.sleep(0.01)
        return n * n

    results: list[object] = []

    async def one() -> None:
        started.wait(10)
        try:
            results.append(await asq(3))
        except Exception as exc:
            results.append(exc)
        await asyncio.get_running_loop().run_in_executor(None, finished.wait, 10)

    threads = [threading.Thread(target=asyncio.run, args=(one(),), daemon=True) for _ in range(loops)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [9] * loops
    assert calls == [3]


_FORK_CHILD = """
import os, sys
from keymiss import Keymiss, StoreError
for spec in sys.argv[1:]:
    km = Keymiss(spec)
    @km.cached("sq:{n}", ttl=60)
    def square(n: int) -> int:
        return n * n
    assert square(2) == 4
    pid = os.fork()
    if pid == 0:
        try:
            print("child", square(3), km.sync.get("sq:2"), flush=True)
        except StoreError as exc:
            print("child refused:", exc, flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    print("parent", square(4), flush=True)
    km.sync.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_computes_on_a_loop_of_its_own(tmp_path: Path, redis_standalone: RedisProcess) -> None:
    url = f"redis://127.0.0.1:{redis_standalone.port}/0"
    specs = ["memory", url, f"lmdb:{tmp_path}/db"]
    done = subprocess.run(
        [sys.executable, "-c", _FORK_CHILD, *specs], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "child 9 4",  # memory: the parent's copy, computed on the child's own loop
        "parent 16",
        "child 9 4",  # Redis: connections of the child's own
        "parent 16",
        "child refused: this process was forked after keymiss opened its store "
        f"(lmdb:{tmp_path}/db), which a child cannot share or reopen safely: start keymiss in each "
        "child (gunicorn: no --preload, or open it in a post_fork hook), or use a memory or Redis store",
        "parent 16",
    ], done.stderr
