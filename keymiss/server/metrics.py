"""Prometheus metrics and a health check, read at scrape time (nothing on the hit path).

Both front ends serve ``/metrics`` and ``/healthz`` on ``--metrics-port``; any other path is 404.
The module front end adds the module's own counters (``INFO keymiss`` of its server), the
workers', and the server process's RSS and CPU beside keymiss's own.
"""

from __future__ import annotations

import itertools
import platform
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ConfigError
from ..stats import BATCH_BUCKETS, COMPUTE_BUCKETS

if TYPE_CHECKING:
    from ..engine import Keymiss
    from ..frontend import ModuleFront
    from .app import Server


def engine_metrics(km: Keymiss) -> Iterator[Any]:
    """The engine's counters per keyspace: what both front ends compute."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    counters = {
        "hits": "Reads answered from the store",
        "misses": "Reads that found no stored value",
        "computations": "Keys computed by the keyspace's function",
        "errors": "Computations that failed",
        "timeouts": "Computations that passed their timeout",
        "coalesced": "Reads that joined a computation already running",
        "evictions": "Values the memory store evicted to stay within its budget",
    }
    families = {
        name: CounterMetricFamily(f"keymiss_{name}", text, labels=["keyspace"])
        for name, text in counters.items()
    }
    in_flight = GaugeMetricFamily(
        "keymiss_in_flight", "Keys being computed, with handlers past their timeout", labels=["keyspace"]
    )
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
        in_flight.add_metric([ks.pattern], st.in_flight)
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
    yield in_flight
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


class KeymissCollector:
    """A prometheus_client collector over the Python server's engine, store and connections."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        km = self.server.km
        yield from engine_metrics(km)
        yield from build_metrics("python", self.server.started_at)
        srv = self.server
        for name, text, value in (
            ("busy_rejections", "Reads refused with -BUSY (in-flight cap)", srv.busy_rejections),
            (
                "output_disconnections",
                "Clients closed for not reading their replies",
                srv.output_disconnections,
            ),
            (
                "slow_request_disconnections",
                "Clients closed for an incomplete request",
                srv.slow_request_disconnections,
            ),
            ("rejected_connections", "Connections refused at max-clients", srv.rejected_connections),
            ("auth_failures", "Failed AUTH attempts", srv.auth_failures),
            ("error_replies", "Error replies sent", srv.error_replies),
        ):
            yield CounterMetricFamily(f"keymiss_{name}", text, value=float(value))
        info = km.store.info()
        store_bytes = GaugeMetricFamily("keymiss_store_bytes", "Bytes the store holds", labels=["store"])
        store_bytes.add_metric([info.store], float(info.used_bytes))
        yield store_bytes
        store_max = GaugeMetricFamily("keymiss_store_max_bytes", "The store's byte budget", labels=["store"])
        store_max.add_metric([info.store], float(info.max_bytes))
        yield store_max
        yield GaugeMetricFamily("keymiss_store_keys", "Keys in the store", value=float(info.keys))
        yield GaugeMetricFamily(
            "keymiss_connected_clients", "Open client connections", value=float(len(self.server.connections))
        )


def _http_server(host: str, port: int, registry: Any, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
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


def _registry() -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise ConfigError("--metrics-port needs prometheus-client: pip install 'keymiss[metrics]'") from None
    return CollectorRegistry()


def start_metrics_server(server: Server, port: int) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on the Python server's host; shutdown() stops it."""
    from prometheus_client import ProcessCollector

    registry = _registry()
    registry.register(KeymissCollector(server))
    ProcessCollector(registry=registry)
    return _http_server(server.settings.host, port, registry, lambda: server.serving)


#: INFO keymiss fields of each keyspace that only grow (counters); the others are gauges
MODULE_COUNTERS = {
    "hits": "Reads the server answered from memory",
    "misses": "Reads of a missing key",
    "computations": "Keys queued for a worker",
    "fills": "Values workers stored",
    "failures": "Keys whose computation failed",
    "timeouts": "Keys whose readers' deadline passed",
    "requeues": "Keys handed to another worker (lease passed, worker gone)",
    "discarded_fills": "Fills discarded (a client wrote the key meanwhile, or too late)",
    "superseded": "Computations a client's write superseded",
    "busy": "Reads refused with -BUSY (queue full)",
    "no_worker": "Reads refused: no worker attached",
}
MODULE_GAUGES = {"queued": "Keys waiting for a worker", "in_flight": "Keys a worker is computing"}


class ModuleCollector:
    """The module front end: engine, workers, the module's counters and the server's memory."""

    def __init__(self, front: ModuleFront) -> None:
        self.front = front

    def _server_info(self) -> dict[str, Any]:
        import redis

        assert self.front.worker is not None
        client = redis.Redis.from_url(self.front.worker.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            info: dict[str, Any] = dict(client.info("keymiss"))
            for section in ("memory", "stats", "clients", "persistence", "server"):
                info.update(client.info(section))
            return info
        finally:
            client.close()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        front = self.front
        yield from engine_metrics(front.km)
        name = str(front.front.binary) if front.front.binary is not None else "attached"
        yield from build_metrics(name, front.started_at)
        worker = front.worker
        if worker is not None:
            st = worker.stats
            for field, text in (
                ("takes", "KEYMISS.TAKE calls"),
                ("taken", "Keys taken to compute"),
                ("fills", "Values filled"),
                ("discarded", "Fills the server discarded"),
                ("failures", "Keys answered with an error, or refused by the server"),
                ("reconnects", "Lost connections to a server (each one retried)"),
            ):
                yield CounterMetricFamily(f"keymiss_worker_{field}", text, value=float(getattr(st, field)))
            yield GaugeMetricFamily(
                "keymiss_worker_servers", "Servers the worker is attached to", value=float(len(st.nodes))
            )
        if front.server is not None:
            yield CounterMetricFamily(
                "keymiss_server_restarts", "Deaths of the embedded server", value=float(front.server.deaths)
            )
        up = GaugeMetricFamily("keymiss_server_up", "1 when keymiss's server answers INFO")
        try:
            info = self._server_info()
        except Exception:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        counters = {
            k: CounterMetricFamily(f"keymiss_module_{k}", text, labels=["keyspace"])
            for k, text in MODULE_COUNTERS.items()
        }
        gauges = {
            k: GaugeMetricFamily(f"keymiss_module_{k}", text, labels=["keyspace"])
            for k, text in MODULE_GAUGES.items()
        }
        for value in info.values():
            if isinstance(value, dict) and "pattern" in value:
                pattern = str(value["pattern"])
                families: list[tuple[str, Any]] = [*counters.items(), *gauges.items()]
                for k, family in families:
                    family.add_metric([pattern], float(value.get(k, 0)))
        yield from counters.values()
        yield from gauges.values()
        for key, metric, text in (
            ("keymiss_workers", "keymiss_module_workers", "Worker connections the module counts"),
            ("keymiss_blocked_readers", "keymiss_module_blocked_readers", "Clients waiting on a computation"),
            ("used_memory", "keymiss_server_used_memory_bytes", "The server's used_memory"),
            ("maxmemory", "keymiss_server_maxmemory_bytes", "The server's maxmemory"),
            ("connected_clients", "keymiss_server_connected_clients", "The server's clients"),
            ("rdb_changes_since_last_save", "keymiss_server_unsaved_changes", "Writes not yet snapshotted"),
        ):
            if key in info:
                yield GaugeMetricFamily(metric, text, value=float(info[key]))
        for key, metric, text in (
            ("evicted_keys", "keymiss_server_evicted_keys", "Keys the server evicted under maxmemory"),
            (
                "rejected_connections",
                "keymiss_server_rejected_connections",
                "Connections refused (maxclients)",
            ),
            (
                "client_output_buffer_limit_disconnections",
                "keymiss_server_output_disconnections",
                "Clients closed for unread replies",
            ),
        ):
            if key in info:
                yield CounterMetricFamily(metric, text, value=float(info[key]))
        if "rdb_last_bgsave_status" in info:
            yield GaugeMetricFamily(
                "keymiss_server_persistence_ok",
                "1 unless the last snapshot failed (the server then refuses writes)",
                value=1.0 if info["rdb_last_bgsave_status"] == "ok" else 0.0,
            )


def start_module_metrics(front: ModuleFront, port: int) -> ThreadingHTTPServer:
    """/metrics and /healthz for the module front end (200 only with a worker attached)."""
    from prometheus_client import ProcessCollector

    registry = _registry()
    registry.register(ModuleCollector(front))
    ProcessCollector(registry=registry)

    def server_pid() -> Any:
        pid = front.server.pid if front.server is not None else None
        if pid is None:
            raise OSError("no server process")
        return pid

    if front.server is not None:
        ProcessCollector(namespace="keymiss_server", pid=server_pid, registry=registry)
    return _http_server(front.settings.host, port, registry, front.healthy)
