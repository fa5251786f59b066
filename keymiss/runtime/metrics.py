"""Prometheus metrics and a health check, read at scrape time (nothing on the hit path): the part
both front ends share. Each front end adds its own collector (``server/metrics.py``,
``valkey/metrics.py``) and serves ``/metrics`` and ``/healthz`` on ``--metrics-port``; any other
path is 404.
"""

from __future__ import annotations

import itertools
import platform
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from keymiss.errors import ConfigError
from keymiss.stats import BATCH_BUCKETS, COMPUTE_BUCKETS, SHARED_COUNTERS, SHARED_GAUGES
from keymiss.version import __version__

if TYPE_CHECKING:
    from keymiss.engine.cache import Keymiss


def engine_metrics(km: Keymiss, *, shared: bool = True) -> Iterator[Any]:
    """The engine's counters per keyspace. ``shared``: with the counters both front ends report by
    the same names (``keymiss.stats.SHARED_COUNTERS``, ``SHARED_GAUGES``); the module front end
    leaves them out and reports them from its server's counts (its engine serves no reads)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    counters = {
        **(SHARED_COUNTERS if shared else {}),
        "coalesced": "Reads that joined a computation already running",
        "evictions": "Values the memory store evicted to stay within its budget",
    }
    families = {
        name: CounterMetricFamily(f"keymiss_{name}", text, labels=["keyspace"])
        for name, text in counters.items()
    }
    gauges = {
        name: GaugeMetricFamily(f"keymiss_{name}", text, labels=["keyspace"])
        for name, text in (SHARED_GAUGES if shared else {}).items()
    }
    stuck = GaugeMetricFamily(
        "keymiss_stuck_handlers", "Handler calls past their timeout still running", labels=["keyspace"]
    )
    compute = HistogramMetricFamily(
        "keymiss_compute_seconds", "Duration of one call of a keyspace's function", labels=["keyspace"]
    )
    batches = HistogramMetricFamily(
        "keymiss_batch_keys", "Keys per call of a keyspace's function (1 when unbatched)", labels=["keyspace"]
    )
    for ks in km.registry:
        st = ks.stats
        for name, family in families.items():
            family.add_metric([ks.pattern], getattr(st, name))
        if shared:
            gauges["queued"].add_metric([ks.pattern], km.engine.queued(ks.pattern))
            gauges["in_flight"].add_metric([ks.pattern], st.in_flight)
        stuck.add_metric([ks.pattern], st.stuck)
        cumulative = list(itertools.accumulate(st.compute_histogram))
        buckets = [(repr(b), c) for b, c in zip(COMPUTE_BUCKETS, cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        compute.add_metric([ks.pattern], buckets, st.compute_seconds)
        cumulative = list(itertools.accumulate(st.batch_histogram))
        sizes = [(repr(float(b)), c) for b, c in zip(BATCH_BUCKETS, cumulative, strict=False)]
        sizes.append(("+Inf", cumulative[-1]))
        batches.add_metric([ks.pattern], sizes, float(st.computations))
    yield from families.values()
    yield from gauges.values()
    yield stuck
    yield compute
    yield batches


def build_metrics(server_name: str, started_at: float) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

    info = InfoMetricFamily("keymiss_build", "keymiss's version, its Python and its front end")
    info.add_metric([], {"version": __version__, "python": platform.python_version(), "server": server_name})
    yield info
    yield GaugeMetricFamily(
        "keymiss_uptime_seconds", "Seconds since keymiss started", value=time.time() - started_at
    )


def http_server(host: str, port: int, registry: Any, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
    """``/metrics`` (Prometheus text), ``/healthz`` (200 when serving, else 503), else 404."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, status, kind = generate_latest(registry), 200, CONTENT_TYPE_LATEST
                except Exception as exc:
                    body, status, kind = f"metrics failed: {exc}\n".encode(), 500, "text/plain"
            elif path == "/healthz":
                ok = healthy()
                body, status, kind = (b"ok\n" if ok else b"not serving\n"), 200 if ok else 503, "text/plain"
            else:
                body, status, kind = b"not found: try /metrics or /healthz\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the log

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="keymiss-metrics", daemon=True).start()
    return httpd


def new_registry() -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ConfigError("--metrics-port needs prometheus-client: pip install 'keymiss[metrics]'") from None
    return CollectorRegistry()
