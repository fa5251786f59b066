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
    return parser


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
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
