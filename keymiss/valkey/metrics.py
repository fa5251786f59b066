"""The module front end's metrics: the engine's, the workers', the module's own counters (``INFO
keymiss`` of its server) and the server process's memory and CPU beside keymiss's own."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from keymiss.runtime.metrics import build_metrics, engine_metrics, http_server, new_registry
from keymiss.stats import SHARED_COUNTERS, SHARED_GAUGES
from keymiss.valkey import protocol

if TYPE_CHECKING:
    from keymiss.config import Settings
    from keymiss.engine.cache import Keymiss
    from keymiss.valkey.embedded import EmbeddedServer
    from keymiss.valkey.serverconf import ServerBinary
    from keymiss.valkey.worker import Worker


class ModuleFront(Protocol):
    """What the metrics read of the running module front end (``runner.ModuleFront``)."""

    km: Keymiss
    settings: Settings
    binary: ServerBinary | None
    server: EmbeddedServer | None
    worker: Worker | None
    started_at: float

    def healthy(self) -> bool: ...


#: the module's per-keyspace metrics by their names of a release ago (``keymiss_module_<name>``),
#: still served, as aliases of ``keymiss_<name>``, for one release: INFO field → old metric name
MODULE_ALIASES = {
    **{k: k for k in ("hits", "misses", "computations", "fills", "timeouts", "requeues")},
    **{k: k for k in ("discarded_fills", "superseded", "busy", "no_worker", "oversized", "dropped")},
    "errors": "failures",
    "queued": "queued",
    "in_flight": "in_flight",
}


def keyspace_metrics(info: dict[str, Any]) -> Iterator[Any]:
    """The module's per-keyspace counters and gauges (its ``INFO keymiss``) by the names the Python
    front end reports its own under (``keymiss_hits_total``, ...), and by their earlier names."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families: dict[str, Any] = {}
    aliases: dict[str, Any] = {}
    for fields, shared, kind in (
        (protocol.INFO_COUNTERS, SHARED_COUNTERS, CounterMetricFamily),
        (protocol.INFO_GAUGES, SHARED_GAUGES, GaugeMetricFamily),
    ):
        for k, text in fields.items():
            families[k] = kind(f"keymiss_{k}", shared.get(k, text), labels=["keyspace"])
            if k in MODULE_ALIASES:
                name = f"keymiss_module_{MODULE_ALIASES[k]}"
                aliases[k] = kind(name, f"{text} (keymiss_{k}'s earlier name)", labels=["keyspace"])
    for value in info.values():
        if isinstance(value, dict) and "pattern" in value:
            pattern = str(value["pattern"])
            for k, family in families.items():
                family.add_metric([pattern], float(value.get(k, 0)))
                if k in aliases:
                    aliases[k].add_metric([pattern], float(value.get(k, 0)))
    yield from families.values()
    yield from aliases.values()


class ModuleCollector:
    """The module front end: engine, workers, the module's counters and the server's memory."""

    def __init__(self, front: ModuleFront) -> None:
        self.front = front

    def _server_info(self) -> dict[str, Any]:
        import redis

        assert self.front.worker is not None
        client = redis.Redis.from_url(self.front.worker.url, socket_timeout=2, socket_connect_timeout=2)
        try:
            info: dict[str, Any] = dict(client.info(protocol.INFO_SECTION))
            for section in ("memory", "stats", "clients", "persistence", "server"):
                info.update(client.info(section))
            # the clients refused: by the server (its maxclients) and by the module (--max-clients)
            refused = int(info.get("keymiss_refused_clients", 0))
            info["rejected_connections"] = int(info.get("rejected_connections", 0)) + refused
            return info
        finally:
            client.close()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        front = self.front
        # the engine's own (compute times, batch sizes, ...); the counters both front ends share come
        # from the module, which serves the reads (keyspace_metrics, below)
        yield from engine_metrics(front.km, shared=False)
        name = str(front.binary) if front.binary is not None else "attached"
        yield from build_metrics(name, front.started_at)
        worker = front.worker
        if worker is not None:
            st = worker.stats
            for field, text in (
                ("takes", f"{protocol.CMD_TAKE} calls"),
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
        yield from keyspace_metrics(info)
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
                "Connections refused (--max-clients, or the server's maxclients)",
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

    registry = new_registry()
    registry.register(ModuleCollector(front))
    ProcessCollector(registry=registry)

    def server_pid() -> Any:
        pid = front.server.pid if front.server is not None else None
        if pid is None:
            raise OSError("no server process")
        return pid

    if front.server is not None:
        ProcessCollector(namespace="keymiss_server", pid=server_pid, registry=registry)
    return http_server(front.settings.host, port, registry, front.healthy)
