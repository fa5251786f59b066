"""The Python server's metrics: the engine's, its store's and its connections' (``/metrics``)."""

from __future__ import annotations

from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from keymiss.runtime.metrics import build_metrics, engine_metrics, http_server, new_registry

if TYPE_CHECKING:
    from keymiss.server.client import Host


class KeymissCollector:
    """A prometheus_client collector over the Python server's engine, store and connections."""

    def __init__(self, server: Host) -> None:
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
        # the module front end's names for the server's own figures, so one dashboard reads both
        for gauge, text, value in (
            ("used_memory_bytes", "Bytes the server's data take (the store's)", info.used_bytes),
            ("maxmemory_bytes", "The server's byte budget (the store's)", info.max_bytes),
            ("connected_clients", "The server's clients", len(self.server.connections)),
        ):
            yield GaugeMetricFamily(f"keymiss_server_{gauge}", text, value=float(value))
        for counter, text, value in (
            ("evicted_keys", "Keys the server evicted under its budget", info.evictions),
            ("rejected_connections", "Connections refused at max-clients", srv.rejected_connections),
        ):
            yield CounterMetricFamily(f"keymiss_server_{counter}", text, value=float(value))


def start_metrics_server(server: Host, port: int) -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on the Python server's host; shutdown() stops it."""
    from prometheus_client import ProcessCollector

    registry = new_registry()
    registry.register(KeymissCollector(server))
    ProcessCollector(registry=registry)
    return http_server(server.settings.host, port, registry, lambda: server.serving)
