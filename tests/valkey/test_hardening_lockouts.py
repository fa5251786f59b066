"""A worker the server locks out after it attached (its ACL user changed under it) says so and its
readers learn at once; and the worker's own connections are never the ones client eviction drops."""

from __future__ import annotations

import time

import pytest

from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from ..support import ReplyError, RespTestClient, resp
from .conftest import make_app, running


async def worker_user(port: int) -> str:
    assert await resp(port, "ACL", "SETUSER", "keymiss", "on", ">pw", "~*", "+@all") == "OK"
    return f"redis://keymiss:pw@127.0.0.1:{port}"


@pytest.mark.parametrize(
    "change", [["-" + protocol.CMD_FILL.lower()], ["resetkeys"]], ids=["no-fill", "resetkeys"]
)
async def test_a_worker_locked_out_of_its_keys_counts_it_and_its_readers_get_the_error_at_once(
    server: RedisProcess, change: list[str]
) -> None:
    """Taking FILL from the user once turned every miss into an error nobody counted; ``resetkeys`` made
    the FAIL that carries that error a refused key access too, so readers waited their deadline."""
    port = server.port
    async with running(make_app([], compute=0.05), await worker_user(port)) as worker:
        assert await resp(port, "GET", "slow:before") == b"value of slow:before"
        assert worker.stats.auth_refusals == 0
        assert await resp(port, "ACL", "SETUSER", "keymiss", *change) == "OK"
        t0 = time.monotonic()
        got = await resp(port, "GET", "slow:after", wait=5)
        assert time.monotonic() - t0 < 2
        assert isinstance(got, ReplyError) and "NOPERM" in str(got), got
        assert worker.stats.auth_refusals >= 1


async def test_the_workers_connections_are_not_evicted_by_client_eviction(server: RedisProcess) -> None:
    port = server.port
    async with running(make_app([], compute=0.05), f"redis://127.0.0.1:{port}"):
        assert await resp(port, "GET", "slow:1") == b"value of slow:1"  # the fill connection is open
        async with RespTestClient(port) as c:
            me = await c.call("CLIENT", "ID")
            listing = (await c.call("CLIENT", "LIST")).decode()
        others = []
        for line in listing.splitlines():
            fields = dict(f.split("=", 1) for f in line.split(" ") if "=" in f)
            if int(fields["id"]) != me:
                others.append(fields)
        assert len(others) >= 2, listing  # its take and its fill connections
        for fields in others:
            assert "e" in fields["flags"], listing


async def test_a_worker_on_a_server_without_no_evict_still_serves(server: RedisProcess) -> None:
    port = server.port
    assert await resp(port, "ACL", "SETUSER", "keymiss", "on", ">pw", "~*", "+@all", "-client") == "OK"
    async with running(make_app([], compute=0.05), f"redis://keymiss:pw@127.0.0.1:{port}") as worker:
        assert await resp(port, "GET", "slow:1") == b"value of slow:1"
        assert worker.stats.auth_refusals == 0
