"""Expiry times at the edge of a long long, on the Python server over each store: as Redis 7.0 where
the store holds the time (a shared Redis: PEXPIREAT itself); keymiss's own stores accept a later
time than they hold exactly and keep the latest they do (never one past a long long, nor an error)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from .conftest import start_server, store_url

HUGE = 2**63 - 1


@pytest.mark.parametrize("kind", ["memory", "lmdb", "redis"])
def test_pexpireat_at_the_edge_of_a_long_long(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    srv = start_server(tmp_path, "--store", store_url(kind, tmp_path, request), front="python")
    r = redis.Redis(port=srv.port, socket_timeout=5)
    key = f"edge:{kind}:{tmp_path.name}"
    try:
        r.set(key, "v")
        if kind == "redis":  # Redis holds any time: exactly as Redis answers
            assert r.execute_command("PEXPIREAT", key, HUGE) == 1
            assert r.execute_command("PEXPIRETIME", key) == HUGE
            assert r.get(key) == b"v"
        else:  # accepted as Redis accepts it (its own tests expect 1), kept as the latest time
            # the store holds exactly (the year 73 000 or so), never read back past a long long
            assert r.execute_command("PEXPIREAT", key, HUGE) == 1
            assert r.execute_command("PEXPIRETIME", key) == 2**51
            assert r.execute_command("SET", key, "v", "PXAT", HUGE) is True
            assert 0 < r.execute_command("PEXPIRETIME", key) <= HUGE
            assert r.get(key) == b"v"
            with pytest.raises(redis.ResponseError, match=r"^invalid expire time in 'pexpire' command$"):
                r.execute_command("PEXPIRE", key, HUGE)  # now + HUGE overflows: refused as Redis does
        far = 2**50 + 1  # a far time the store holds: read back exactly
        assert r.execute_command("PEXPIREAT", key, far) == 1
        assert r.execute_command("PEXPIRETIME", key) == far
        assert r.ping()
    finally:
        r.close()
        srv.stop()
