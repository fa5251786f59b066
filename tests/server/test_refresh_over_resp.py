"""Freshness over RESP, on both front ends: early refresh keeps readers from waiting, a stale value
is served at once while it refreshes, and a version switch hides every value of the old version."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from ..support import eventually
from .conftest import FRONTS, keyspace_info, start_server


@pytest.mark.parametrize("front", FRONTS)
def test_early_refresh_over_resp_keeps_readers_from_waiting(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port)
    try:
        r.get("fresh:1")  # the one miss
        slowest, seen = 0.0, set()
        end = time.monotonic() + 4.0
        while time.monotonic() < end:
            t0 = time.monotonic()
            seen.add(r.get("fresh:1"))
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.003)  # a reader's pace, on the real clock XFetch works by
        ks = keyspace_info(r, "fresh:*")
        # no reader waited on a computation: every read after the first was a hit (a wall-clock
        # bound would flake on a loaded machine; a reader that waited is counted as a miss)
        assert int(ks["misses"]) == 1, ks
        assert slowest < 1.0, slowest
        assert len(seen) >= 3  # refreshed values were served
        assert int(ks["computations"]) <= 2 * (4.0 / 0.6) + 2, ks
    finally:
        r.close()
        srv.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_a_stale_value_is_served_at_once_over_resp_while_it_refreshes(tmp_path: Path, front: str) -> None:
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port)
    try:
        first = r.get("edition:1")
        eventually(lambda: 0 < r.pttl("edition:1") <= 30_000)  # past its TTL: in the stale window
        took = []
        for _ in range(5):  # all inside the refresh; the best of five rules out a scheduler hiccup
            t0 = time.monotonic()
            assert r.get("edition:1") == first  # the stale value, at once
            took.append(time.monotonic() - t0)
        srv.wait_started("edition2")  # the refresh those reads began is running, held till now
        srv.release("edition2")
        assert min(took) < 0.05 and max(took) < 1.0, took
        eventually(lambda: r.get("edition:1") != first, timeout=5)  # the refresh lands
        assert r.get("edition:1") != first
    finally:
        r.close()
        srv.stop()


@pytest.mark.parametrize("front", FRONTS)
def test_a_version_switch_hides_old_values_over_resp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: str
) -> None:
    version_file = tmp_path / "version"
    version_file.write_text("v1")
    monkeypatch.setenv("KEYMISS_TEST_VERSION_FILE", str(version_file))
    srv = start_server(tmp_path, front=front)
    r = redis.Redis(port=srv.port)
    try:
        assert r.get("model:1") == b"model:1 under v1"
        version_file.write_text("v2")  # the application switches models
        switched(r, "v2")
        assert r.get("model:1") == b"model:1 under v2"  # never the v1 value, not even once
        assert r.mget(["model:1", "model:2"]) == [b"model:1 under v2", b"model:2 under v2"]
        r.set("model:3", b"a client's own")
        version_file.write_text("v3")
        switched(r, "v3")
        assert r.get("model:3") == b"a client's own"  # a client's write is every version's
        assert keyspace_info(r, "model:*")["version"] == "v3"
        assert int(keyspace_info(r, "model:*")["version_misses"]) >= 1
    finally:
        r.close()
        srv.stop()


def switched(r: redis.Redis, version: str, wait: float = 3.0) -> None:
    """Until the serving front end knows the new version (the worker polls it every 50 ms)."""
    eventually(
        lambda: str(keyspace_info(r, "model:*").get("version")) == version,
        timeout=wait,
        message=f"the switch to {version}",
    )
