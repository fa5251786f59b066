"""The read contract's ttl-during row on a refresh: a client's TTL change of a stale key while its
refresh runs is kept by the refreshed value (not replaced by the keyspace's TTL and stale window),
on the Python server over each store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from ..support import eventually
from .conftest import start_server, store_url


@pytest.mark.parametrize("kind", ["memory", "lmdb", "redis"])
def test_a_ttl_change_during_a_refresh_is_kept(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    srv = start_server(tmp_path, "--store", store_url(kind, tmp_path, request), front="python")
    r = redis.Redis(port=srv.port, socket_timeout=5)
    far = int(time.time() * 1000) + 900_000_000
    changes = {  # how, and the PTTL the refreshed value must read back (at most, and over)
        "expire": (lambda k: r.expire(k, 500), (500_000, 490_000)),
        "persist": (lambda k: r.persist(k), (-1, -2)),
        "pexpireat": (lambda k: r.execute_command("PEXPIREAT", k, far), (900_000_000, 890_000_000)),
        "getex": (lambda k: r.execute_command("GETEX", k, "EX", 700), (700_000, 690_000)),
        # the same inside MULTI/EXEC (on a shared Redis, one transaction there)
        "multi-expire": (lambda k: r.pipeline().expire(k, 400).execute() == [True], (400_000, 390_000)),
        "multi-persist": (lambda k: r.pipeline().persist(k).execute() == [True], (-1, -2)),
    }
    stamp = time.monotonic_ns()
    keys = {how: f"edition:{how}{stamp}" for how in changes}
    try:
        # the first computations (1, ungated, and 2..6) run freely; the refreshes (7, 8, …) wait for
        # the test, so each TTL change lands while its refresh runs
        for n in range(2, 1 + len(keys)):
            srv.release(f"edition{n}")
        firsts = {how: r.get(k) for how, k in keys.items()}
        n = len(keys)  # the refreshes are computations 5, 6, …
        for how, key in keys.items():
            # stale, by a margin: PTTL rounds to whole milliseconds, so 30,000 can still be fresh
            # by a fraction of one, and a read then is a plain hit that starts no refresh
            eventually(lambda key=key: 0 < r.pttl(key) <= 29_990)  # a read starts a refresh
            assert r.get(key) == firsts[how]
            n += 1
            srv.wait_started(f"edition{n}")
            change, (most, over) = changes[how]
            assert change(key)
            srv.release(f"edition{n}")
            eventually(
                lambda key=key, old=firsts[how]: r.get(key) != old, timeout=5, message=f"{how}'s refresh"
            )
            pttl = r.pttl(key)
            assert over < pttl <= most, (how, pttl)
    finally:
        r.close()
        srv.stop()
