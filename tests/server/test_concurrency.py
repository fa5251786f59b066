"""Many clients at once on a real ``keymiss serve``: one computation for a key however many ask,
hits served while a model runs, replies in order, a cap on computations, a graceful shutdown.

Computations that must still be running at some moment are gated (``gate:<name>``,
``block:<name>``): the test waits until one started and releases it when it has seen what it came
for.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from ..support import eventually
from .conftest import ServerProcess, both_fronts, keyspace_info, start_server


def test_200_concurrent_clients_one_computation(server: ServerProcess) -> None:
    key = f"slow:{time.monotonic_ns()}"

    async def main() -> list[bytes | None]:
        clients = [aioredis.Redis(port=server.port, protocol=2) for _ in range(200)]
        try:
            await asyncio.gather(*(c.ping() for c in clients))
            return list(await asyncio.gather(*(c.get(key) for c in clients)))
        finally:
            await asyncio.gather(*(c.aclose() for c in clients))

    r = redis.Redis(port=server.port)
    before = keyspace_info(r, "slow:*")["computations"]
    values = asyncio.run(main())
    assert values == [f"slow result for {key}".encode()] * 200
    assert keyspace_info(r, "slow:*")["computations"] == before + 1
    r.close()


def test_hits_stay_fast_while_a_model_runs(server: ServerProcess) -> None:
    r = redis.Redis(port=server.port)
    r.set("hot", "v")
    slow_client = redis.Redis(port=server.port)
    name = f"model{time.monotonic_ns()}"
    t = threading.Thread(target=slow_client.get, args=(f"block:{name}",))
    t.start()
    try:
        server.wait_started(name)  # the model runs in its thread until released
        t0 = time.perf_counter()
        for _ in range(200):
            assert r.get("hot") == b"v"
        elapsed = time.perf_counter() - t0
        still_running = t.is_alive()
    finally:
        server.release(name)
    t.join(5)
    assert still_running, "the model should still be running during the hits"
    assert elapsed < 0.8  # a blocked loop would take as long as the model runs
    r.close()
    slow_client.close()


def test_pipelined_replies_keep_order_around_a_miss(server: ServerProcess) -> None:
    r = redis.Redis(port=server.port)
    key = f"slow:p{time.monotonic_ns()}"
    with r.pipeline(transaction=False) as p:
        p.set("pipe:a", "1").get(key).get("pipe:a").ping().echo("end")
        out = p.execute()
    assert out == [True, f"slow result for {key}".encode(), b"1", True, b"end"]
    r.close()


@pytest.mark.reliability
def test_busy_when_in_flight_cap_is_reached(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-in-flight", "2")
    try:

        async def main() -> list[object]:
            clients = [aioredis.Redis(port=srv.port) for _ in range(4)]
            try:
                gets = [asyncio.ensure_future(c.get(f"gate:busy{i}")) for i, c in enumerate(clients)]
                done: set[asyncio.Future[object]] = set()
                while len(done) < 2:  # two computations run, held; the other two are refused
                    done, _ = await asyncio.wait(gets, timeout=10, return_when=asyncio.FIRST_COMPLETED)
                for i in range(4):
                    srv.release(f"busy{i}")
                return list(await asyncio.gather(*gets, return_exceptions=True))
            finally:
                await asyncio.gather(*(c.aclose() for c in clients))

        results = asyncio.run(main())
        busy = [r for r in results if isinstance(r, redis.ResponseError)]
        assert len(busy) == 2
        assert all(str(b).startswith("BUSY too many computations in flight") for b in busy)
        r = redis.Redis(port=srv.port)
        assert r.get("gate:busy3") is not None  # retrying later works
        assert r.info("keymiss")["keymiss_busy_rejections"] == 2
        r.close()
    finally:
        srv.stop()


@both_fronts
def test_graceful_shutdown_finishes_running_computation(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port, socket_timeout=10)
    result: list[bytes | None] = []
    t = threading.Thread(target=lambda: result.append(r.get("gate:shutdown")))
    t.start()
    srv.wait_started("shutdown")
    srv.proc.send_signal(signal.SIGTERM)
    eventually(lambda: "shutting down" in srv.log)  # it drains, the computation still running
    srv.release("shutdown")
    assert srv.stop(signal.SIGTERM) == 0
    t.join(10)
    assert result == [b"gated result for gate:shutdown"]
    assert "keymiss stopped" in srv.log
