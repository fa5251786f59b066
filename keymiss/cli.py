"""``keymiss`` command line: flags → settings → run. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keymiss", description="Compute-on-miss cache for ML inference.")
    parser.add_argument("--version", action="version", version=f"keymiss {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="show a miss, a hit, a stampede and the stats")
    demo.add_argument("--store", default="memory", help="memory or lmdb:PATH")
    demo.add_argument("--max-memory", default="64MB", help="memory store budget (e.g. 256MB, auto)")
    demo.add_argument("--compute-seconds", type=float, default=0.2, help="simulated inference time")
    serve = sub.add_parser("serve", help="serve keyspaces to any Redis client")
    serve.add_argument("--app", help="MODULE:ATTR naming a keymiss.Keymiss (importable from here)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 6380; 0 picks a free one)")
    serve.add_argument("--store", help="memory or lmdb:PATH (overrides the app)")
    serve.add_argument("--max-memory", help="memory store budget, e.g. 256MB or auto (overrides the app)")
    serve.add_argument("--eviction", help="memory store eviction policy (lru, fifo)")
    serve.add_argument("--requirepass", help="password clients must AUTH with")
    serve.add_argument(
        "--unsafe-no-auth",
        action="store_const",
        const=True,
        help="allow a non-loopback address without a password",
    )
    serve.add_argument("--max-clients", type=int)
    serve.add_argument("--max-in-flight", type=int, help="computations at once before -BUSY")
    serve.add_argument("--output-buffer", help="unread reply bytes before a client is disconnected")
    serve.add_argument(
        "--output-stall-seconds",
        type=float,
        help="seconds a client may leave replies unread before it is disconnected",
    )
    serve.add_argument("--max-bulk", help="largest bulk argument accepted (default 512MB)")
    serve.add_argument("--query-buffer", help="largest unprocessed input per client (default 1GB)")
    serve.add_argument("--grace-seconds", type=float, help="how long shutdown waits for computations")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    serve.add_argument("--config", help="a keymiss.toml file")
    return parser


def _serve(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .errors import ConfigError
    from .server import load_app, run

    names = (
        "app",
        "host",
        "port",
        "store",
        "max_memory",
        "eviction",
        "requirepass",
        "unsafe_no_auth",
        "max_clients",
        "max_in_flight",
        "output_buffer",
        "grace_seconds",
        "metrics_port",
    )
    try:
        settings = load_settings(args.config, {n: getattr(args, n) for n in names})
        km = load_app(settings.app)
        run(km, settings, config_file=args.config)
    except ConfigError as exc:
        print(f"keymiss: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"keymiss: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    command = args.command or "demo"
    if command == "demo":
        from .demo import run_demo

        asyncio.run(
            run_demo(
                store=getattr(args, "store", "memory"),
                max_memory=getattr(args, "max_memory", "64MB"),
                compute_seconds=getattr(args, "compute_seconds", 0.2),
            )
        )
        return 0
    if command == "serve":
        return _serve(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
