"""Prometheus metrics, read from the engine's counters at scrape time (nothing on the hit path)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..stats import COMPUTE_BUCKETS

if TYPE_CHECKING:
    from .app import Server


class KeymissCollector:
    """A prometheus_client collector over one server's engine and store."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        km = self.server.km
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
        yield from families.values()
        yield in_flight
        yield stuck
        yield compute
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


def start_metrics_server(server: Server, port: int) -> Any:
    """Serve /metrics on the server's host; returns the HTTP server so shutdown can stop it."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise ConfigError("--metrics-port needs prometheus-client: pip install 'keymiss[metrics]'") from None
    registry = CollectorRegistry()
    registry.register(KeymissCollector(server))
    return start_http_server(port, addr=server.settings.host, registry=registry)
