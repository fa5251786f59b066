"""The module on a 3-master cluster with replicas: redis-cli -c, cluster clients, a failover."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from keymiss.valkey.modulepath import module_path

from ..redis_servers import HAVE_REDIS, RedisCluster3, RedisProcess
from ..support import aeventually
from .conftest import binary, make_app, running


@pytest.fixture(params=["redis", "valkey"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisCluster3]:
    if not HAVE_REDIS:
        pytest.skip("redis-cli is not installed")
    c = RedisCluster3(
        tmp_path / "cluster", "--loadmodule", str(module_path()), binary=binary(request.param), replicas=1
    )
    yield c
    c.stop()


def owner(cluster: RedisCluster3, key: str) -> RedisProcess:
    """The master node serving ``key``'s slot now."""
    for node in cluster.nodes:
        if node.proc is None or node.proc.poll() is not None:
            continue
        out = subprocess.run(
            ["redis-cli", "-p", str(node.port), "CLUSTER", "KEYSLOT", key],
            capture_output=True,
            text=True,
            timeout=5,
        )
        slot = int(out.stdout.strip())
        nodes = subprocess.run(
            ["redis-cli", "-p", str(node.port), "CLUSTER", "NODES"], capture_output=True, text=True, timeout=5
        ).stdout
        for line in nodes.splitlines():
            f = line.split()
            if "master" not in f[2] or "fail" in f[2]:
                continue
            for r in f[8:]:
                lo, _, hi = r.partition("-")
                if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                    port = int(f[1].split("@")[0].rsplit(":", 1)[1])
                    return next(n for n in cluster.nodes if n.port == port)
    raise AssertionError(f"no master for {key}")


async def warm(rc: object, key: str, n: int = 200) -> None:
    """Open ``n`` connections to ``key``'s node a few at a time: redis-py's asyncio cluster client
    mishandles a burst of commands that all open connections at once ("handler is closed")."""
    await rc.initialize()  # type: ignore[attr-defined]
    gate = asyncio.Semaphore(8)

    async def hold() -> None:
        async with gate:
            await rc.execute_command("EVAL", "return 1", 1, key)  # type: ignore[attr-defined]

    await asyncio.gather(*(hold() for _ in range(n)))


async def cli(port: int, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", "-c", "-p", str(port), *args, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    return out.decode().strip()


async def test_cluster_gets_compute_once_per_key_across_a_failover(cluster: RedisCluster3) -> None:
    from redis.asyncio.cluster import RedisCluster

    calls: list[str] = []
    seed = cluster.nodes[0]
    key = next(f"slow:{{t{i}}}" for i in range(100) if owner(cluster, f"slow:{{t{i}}}") is not seed)
    async with running(make_app(calls, compute=0.3), cluster.url, refresh_seconds=0.5) as worker:
        await aeventually(lambda: len(worker.stats.nodes), expect=3)
        assert len(worker.stats.nodes) == 3  # every master, no replica
        assert await cli(seed.port, "GET", key) == f"value of {key}"  # redirected, computed, answered
        assert calls == [key]

        rc = RedisCluster(host="127.0.0.1", port=seed.port, max_connections=512)
        try:
            hot = key + ":hot"
            await warm(rc, hot)
            got = await asyncio.gather(*(rc.get(hot) for _ in range(200)))
            assert got == [f"value of {hot}".encode()] * 200
            assert calls.count(hot) == 1

            # fail over the master of the key's slot: its replica takes over, the worker follows
            victim = owner(cluster, key)
            victim.signal(signal.SIGKILL)
            victim.proc.wait(10)  # type: ignore[union-attr]
            await aeventually(
                lambda: owner(cluster, key) is not victim,
                timeout=30,
                interval=0.2,
                ignore=(AssertionError, subprocess.SubprocessError),  # no master for it, for now
                message="a failover",
            )
            new = owner(cluster, key)
            await aeventually(
                lambda: f"redis://127.0.0.1:{new.port}" in worker.stats.nodes,
                timeout=15,
                message="the worker attaches to the new master",
            )
            after = key + ":after"
            assert await cli(new.port, "GET", after) == f"value of {after}"
            assert await cli(new.port, "GET", key) == f"value of {key}"  # replicated before the failover
            after2 = key + ":after2"
            rc2 = RedisCluster(host="127.0.0.1", port=new.port, max_connections=512)
            try:
                await warm(rc2, after2)
                got = await asyncio.gather(*(rc2.get(after2) for _ in range(200)))
            finally:
                await rc2.aclose()
            assert got == [f"value of {after2}".encode()] * 200
            assert calls.count(after2) == 1 and calls.count(after) == 1 and calls.count(key) == 1
        finally:
            await rc.aclose()


@pytest.mark.parametrize("cluster", ["valkey"], indirect=True)
async def test_forget_by_tag_on_every_master_of_a_cluster(cluster: RedisCluster3) -> None:
    """Each master forgets its own keys: FORGET goes to every primary, and the counts add up."""
    from redis.asyncio.cluster import RedisCluster

    from keymiss.valkey import protocol

    from .test_forget import tag_app

    keys = [f"feed:{user}:{page}" for user in (1, 2, 3) for page in range(12)]
    async with running(tag_app([]), cluster.url) as worker:
        await aeventually(lambda: len(worker.stats.nodes), expect=3)
        rc = RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
        try:
            for key in keys:
                assert await rc.get(key) is not None
            assert len({owner(cluster, k).port for k in keys}) > 1  # spread over masters
            counts = await rc.execute_command(
                protocol.CMD_FORGET, protocol.OPT_TAG, "user:2", target_nodes=RedisCluster.PRIMARIES
            )
            assert sum(counts.values()) == 12, counts
            assert [await rc.exists(k) for k in keys] == [1] * 12 + [0] * 12 + [1] * 12
        finally:
            await rc.aclose()
