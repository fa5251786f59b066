"""``keymiss`` command line: flags → settings → run. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from keymiss.engine import syncface
from keymiss.logs import configure_logging
from keymiss.options import ERROR_DETAILS
from keymiss.stores import STORE_URLS
from keymiss.stores.policies import POLICY_NAMES
from keymiss.version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keymiss", description="Compute-on-miss cache for ML inference.")
    parser.add_argument("--version", action="version", version=f"keymiss {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text (default) or json: one object a line",
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="show a miss, a hit, a stampede and the stats")
    demo.add_argument("--store", default="memory", help=f"a store URL: {STORE_URLS}")
    demo.add_argument("--max-memory", default="64MB", help="memory store budget (e.g. 256MB, auto)")
    demo.add_argument("--compute-seconds", type=float, default=0.2, help="simulated inference time")
    serve = sub.add_parser("serve", help="serve keyspaces to any Redis client")
    # the log flags work before or after the subcommand
    serve.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument(
        "--log-format", default=argparse.SUPPRESS, choices=("text", "json"), help="text or json"
    )
    serve.add_argument("--app", help="MODULE:ATTR naming a keymiss.Keymiss (importable from here)")
    serve.add_argument(
        "--server",
        choices=("valkey", "python"),
        help="valkey: a real server with the keymiss module (the default where a binary exists); "
        "python: the pure-Python RESP server (implied by an LMDB store)",
    )
    serve.add_argument("--redis-server", help="embed this redis-server / valkey-server (7+) binary instead")
    serve.add_argument(
        "--redis", help="attach workers to this module-loaded server (redis://, redis+cluster://) instead"
    )
    serve.add_argument(
        "--data-dir", help="the embedded server's snapshots (RDB) live here; without it nothing persists"
    )
    serve.add_argument(
        "--default-ttl",
        type=float,
        help="seconds a computed value lives when its keyspace sets no TTL (default 7 days): the "
        "server evicts only values with a TTL, never the QA contexts",
    )
    serve.add_argument(
        "--restarts", type=int, help="deaths of the embedded server within a minute before giving up (5)"
    )
    serve.add_argument(
        "--busy-restart-seconds",
        type=float,
        help="restart the embedded server after it answered BUSY (a script that never ends) this long (30)",
    )
    serve.add_argument(
        "--worker-grace",
        type=float,
        help="seconds a reader of the embedded server's keyspace waits for its first worker (or "
        "for another, once its last went) before it is told there is none (default 5)",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 6380; 0 picks a free one)")
    serve.add_argument("--store", help=f"a store URL (overrides the app): {STORE_URLS}")
    serve.add_argument("--max-memory", help="memory store budget, e.g. 256MB or auto (overrides the app)")
    serve.add_argument(
        "--store-connections",
        type=int,
        help="a Redis store's commands on the wire at once (default 32); more queue for a connection",
    )
    serve.add_argument(
        "--store-wait-seconds",
        type=float,
        help="how long a command queues for a Redis store connection before it fails as busy (default 10)",
    )
    serve.add_argument(
        "--store-timeout-seconds",
        type=float,
        help="how long a command sent to a Redis store waits for its answer (default 30): then it "
        "fails as BUSY, and is not sent again (a write in it may or may not have been applied)",
    )
    serve.add_argument(
        "--eviction", help=f"memory store eviction policy: {', '.join(POLICY_NAMES)} (default worth)"
    )
    serve.add_argument(
        "--handler-errors",
        choices=ERROR_DETAILS,
        help="what clients see of a handler's exception: message (type and message, the default) or "
        "type (the type alone; the log always has the traceback)",
    )
    serve.add_argument(
        "--access-log", action="store_const", const=True, help="log every command (logger keymiss.access)"
    )
    serve.add_argument("--requirepass", help="password clients must AUTH with")
    serve.add_argument(
        "--unsafe-no-auth",
        action="store_const",
        const=True,
        help="allow a non-loopback address without a password",
    )
    serve.add_argument(
        "--max-clients",
        type=int,
        help="client connections admitted at once (default 10000); the next one is told 'max number "
        "of clients reached' and closed (on Redis 7.0, --redis-server, closed as it connects, "
        "untold; none of its commands runs). keymiss's own connections to its embedded server (workers, "
        "health checks: up to 48, over its private unix socket) are apart and never take a client's place",
    )
    serve.add_argument(
        "--admin-password",
        help="the embedded server's operator user 'admin': the one login that may reconfigure it "
        "(clients cannot)",
    )
    serve.add_argument(
        "--max-value-share",
        type=float,
        help="a computed value over this share of maxmemory is answered, not stored (default 0.1)",
    )
    serve.add_argument("--max-in-flight", type=int, help="computations at once before -BUSY")
    serve.add_argument(
        "--error-memory",
        help="bytes the failures remembered for a keyspace's error_ttl may hold (default 16MB); past "
        "it the oldest are forgotten. Messages are kept to 512 characters, long keys by their digest",
    )
    serve.add_argument(
        "--output-buffer",
        help="unread reply bytes before a client is disconnected (default 64MB; the embedded server "
        "caps it at an eighth of --max-memory)",
    )
    serve.add_argument(
        "--output-stall-seconds",
        type=float,
        help="seconds a client may go without taking any of its pending replies (bytes acknowledged "
        "at its socket) before it is disconnected (default 60)",
    )
    serve.add_argument(
        "--max-bulk",
        help="largest bulk argument accepted (default 512MB, or --query-buffer where smaller; never "
        "more than --query-buffer)",
    )
    serve.add_argument(
        "--request-seconds",
        type=float,
        help="close a client whose request is still incomplete this long after its first byte (default 30)",
    )
    serve.add_argument(
        "--query-buffer",
        help="largest request input per client, the arguments of an unfinished command included "
        "(default 1GB): past it the client is closed with an error",
    )
    serve.add_argument(
        "--max-args",
        type=int,
        help="most arguments in one command on the Python server (default 1048576, as Redis): a larger "
        "multibulk count is refused with 'invalid multibulk length'",
    )
    serve.add_argument("--grace-seconds", type=float, help="how long shutdown waits for computations")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    serve.add_argument("--config", help="a keymiss.toml file")
    serve.add_argument("--model", help="extractive-QA checkpoint directory for the bertqa keyspace")
    serve.add_argument(
        "--qa-dtype",
        help="auto (default: bf16-autocast on a GPU or a CPU with avx512_bf16/amx_bf16, else float32), "
        "float32, bf16-autocast (bfloat16 matrix products, close calls settled in float32) "
        "or bfloat16 (bfloat16 weights)",
    )
    serve.add_argument(
        "--qa-backend",
        help="auto (default: openvino for a BERT checkpoint with safetensors weights when installed, "
        "else torch), openvino or torch",
    )
    serve.add_argument("--qa-batch-size", type=int, help="questions per forward pass (default 16)")
    serve.add_argument("--qa-batch-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    serve.add_argument("--corpus", help="contexts to ingest at start (JSON lines or text, one per line)")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="ingest the built-in demo corpus even into a store of yours (lmdb:, redis://, --redis, "
        "or the one your app declares); "
        "without it only keymiss's own memory store or embedded server gets it",
    )

    sub.add_parser("redis-module", help="print the path of the Valkey / Redis module file")
    worker = sub.add_parser("worker", help="compute the misses of module-loaded Valkey / Redis servers")
    worker.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING or ERROR")
    worker.add_argument(
        "--log-format", default=argparse.SUPPRESS, choices=("text", "json"), help="text or json"
    )
    worker.add_argument("--app", help="MODULE:ATTR naming a keymiss.Keymiss (default: the bertqa keyspace)")
    worker.add_argument(
        "--redis", required=True, help="redis://[user:pass@]host:port or redis+cluster://host:port (any node)"
    )
    worker.add_argument("--batch", type=int, default=64, help="keys taken at once (default 64)")
    worker.add_argument("--max-in-flight", type=int, default=256, help="keys computing at once (default 256)")
    worker.add_argument(
        "--max-value-share",
        type=float,
        default=0.1,
        help="a value over this share of the server's maxmemory is answered, not stored (default 0.1)",
    )
    worker.add_argument(
        "--default-ttl",
        type=float,
        default=7 * 24 * 3600,
        help="seconds a value of a keyspace without a TTL is kept (default 7 days; 0: forever). With "
        "maxmemory-policy volatile-lfu the server then evicts answers, never contexts",
    )
    worker.add_argument("--model", help="extractive-QA checkpoint directory for the bertqa keyspace")
    worker.add_argument("--qa-dtype", help="auto (default), float32, bf16-autocast or bfloat16")
    worker.add_argument("--qa-backend", help="auto (default), openvino or torch")
    worker.add_argument("--qa-batch-size", type=int, help="questions per forward pass (default 16)")
    worker.add_argument("--qa-batch-wait-ms", type=float, help="how long a batch waits to fill (default 5)")
    worker.add_argument("--corpus", help="contexts to ingest into the server at start")
    worker.add_argument(
        "--demo", action="store_true", help="ingest the built-in demo corpus into the server (not by default)"
    )

    top = sub.add_parser(
        "top",
        help="a live view of a keymiss server's keyspaces (q or Ctrl-C quits)",
        description="A live view of any keymiss server (the default front end or the Python server), "
        "read from INFO every second: per keyspace hits, misses, hit ratio, computations/s, queued and "
        "in-flight keys, p50/p99 compute time, errors, stale hits and evictions. q or Ctrl-C quits.",
    )
    top.add_argument("--host", default="127.0.0.1", help="the server's address (default 127.0.0.1)")
    top.add_argument("--port", type=int, default=6380, help="its port (default 6380)")
    top.add_argument(
        "--user",
        default=os.environ.get("KEYMISS_USER"),
        help="ACL user (default $KEYMISS_USER, else default)",
    )
    top.add_argument(
        "--password",
        default=os.environ.get("KEYMISS_PASSWORD"),
        help="the password (default $KEYMISS_PASSWORD; prefer it: a flag shows in ps)",
    )
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    ingest = sub.add_parser("ingest", help="tokenise contexts once and store them for the bertqa keyspace")
    ingest.add_argument("file", help='JSON lines {"key": ..., "text": ...} or text, one paragraph per line')
    ingest.add_argument(
        "--store",
        required=True,
        help="where the contexts go: lmdb:PATH, redis://[user:pass@]HOST:PORT[/DB], rediss://… or "
        "redis+cluster://HOST:PORT (a memory store would vanish on exit)",
    )
    ingest.add_argument("--model", help="extractive-QA checkpoint (default: the MiniLM sentence reader)")
    ingest.add_argument("--keys-out", help="write every context key, one per line, to this file")
    return parser


def _ingest(args: argparse.Namespace) -> int:
    from keymiss.api import Keymiss
    from keymiss.errors import ConfigError, KeymissError

    try:
        from keymiss.qa.app import QAService, reader_factory
        from keymiss.qa.contexts import read_corpus
    except ImportError as exc:
        print(f"keymiss: ingest needs the qa extra ({exc})", file=sys.stderr)
        return 2
    if args.store.startswith("memory"):
        print("keymiss: a memory store is gone when ingest exits; use --store lmdb:PATH", file=sys.stderr)
        return 2

    keys: list[str] = []

    async def run() -> None:
        km = Keymiss(store=args.store, sweep_interval=0)
        service = QAService(reader_factory(args.model))
        try:
            pairs = list(read_corpus(args.file))
            try:
                from rich.progress import Progress

                with Progress(transient=False) as bar:
                    task = bar.add_task(f"ingest {args.file}", total=len(pairs))
                    report = await service.ingest(km, pairs, lambda n: bar.advance(task, n))
            except ImportError:
                report = await service.ingest(km, pairs)
            print(
                f"{len(pairs)} contexts: {report.added} added, {report.replaced} replaced, "
                f"{report.unchanged} unchanged; {report.forgotten_answers} cached answers forgotten"
            )
            if pairs:  # keys made from a text file's name and line numbers: say what they are
                first, last = pairs[0][0], pairs[-1][0]
                tag = first[first.find("{") : first.find("}") + 1] if "{" in first else ""
                print(f"context keys: {first}" + (f" … {last}" if len(pairs) > 1 else ""))
                print(f"ask with: GET 'bertqa{tag}_{first}_<question>'")
            keys.extend(key for key, _ in pairs)
        finally:
            await km.close()

    try:
        asyncio.run(run())
        if args.keys_out:
            with open(args.keys_out, "w", encoding="utf-8") as out:
                out.writelines(key + "\n" for key in keys)
            print(f"{len(keys)} keys written to {args.keys_out}")
    except (ConfigError, KeymissError, ValueError, OSError) as exc:
        print(f"keymiss: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo_wanted(asked: bool, settings: Any, km: Any = None) -> bool:
    """Whether the demo corpus goes into the store: asked for (``--demo``), or the store is
    keymiss's own (the in-process memory store, or the embedded server it starts). A store that is
    the user's (``--store lmdb:…``, ``redis://…``, ``--redis``, or the one the app itself declares,
    ``Keymiss(store="lmdb:…")``, a Store object included) gets only what they ingest."""
    store = settings.store if settings.store is not None else (km.store_spec if km is not None else "memory")
    return asked or (settings.redis is None and isinstance(store, str) and store.startswith("memory"))


def _graph_cache(settings: Any) -> str | None:
    """Where OpenVINO graphs built from checkpoints are kept: beside the store when it lives on disk
    (``--data-dir``, an LMDB store), else in the user's cache directory (None)."""
    import os

    if getattr(settings, "data_dir", None):
        return os.path.join(settings.data_dir, "qa-graphs")
    store = getattr(settings, "store", None) or ""
    if store.startswith("lmdb:"):
        return os.path.join(store[len("lmdb:") :], "qa-graphs")
    return None


def _with_qa(km: Any, settings: Any, demo: bool | None = None) -> Any:
    """Add the bertqa keyspace (the default app): span answers with --model, else the MiniLM
    sentence reader over the demo corpus. Without the qa extra, a plain cache with a warning."""
    from keymiss.api import Keymiss
    from keymiss.qa import build_qa_app
    from keymiss.qa.backends import NoBackendError

    try:
        return build_qa_app(
            km,
            model=settings.model,
            dtype=settings.qa_dtype,
            backend=settings.qa_backend,
            graph_cache=_graph_cache(settings),
            batch_size=settings.qa_batch_size,
            batch_wait_ms=settings.qa_batch_wait_ms,
            corpus=settings.corpus,
            demo=demo,
        )
    except NoBackendError as exc:
        if settings.model:
            raise
        logging.getLogger("keymiss").warning(
            "serving a plain cache: the built-in bertqa keyspace needs the qa extra (%s)", exc
        )
        return km or Keymiss()


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from keymiss.config import Settings, load_settings
    from keymiss.errors import ConfigError
    from keymiss.launch import serve
    from keymiss.runtime.apps import load_app

    # every serve flag is named after its setting, so flags map onto settings one to one
    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    try:
        settings = load_settings(args.config, overrides)
        km = load_app(settings.app) if settings.app else None
        if km is None or settings.model:
            km = _with_qa(km, settings, _demo_wanted(args.demo, settings, km))
        return serve(km, settings, config_file=args.config)
    except ConfigError as exc:
        print(f"keymiss: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"keymiss: cannot serve: {exc}", file=sys.stderr)
        return 1


def _redis_module() -> int:
    from keymiss.errors import ConfigError
    from keymiss.valkey.modulepath import module_path

    try:
        print(module_path())
    except ConfigError as exc:
        print(f"keymiss: {exc}", file=sys.stderr)
        return 1
    return 0


def _worker(args: argparse.Namespace) -> int:
    from keymiss.config import Settings
    from keymiss.errors import ConfigError
    from keymiss.runtime.apps import load_app
    from keymiss.runtime.loop import run_loop
    from keymiss.valkey.topology import parse_url
    from keymiss.valkey.worker import run_worker

    qa = Settings(
        model=args.model,
        qa_dtype=args.qa_dtype or Settings.qa_dtype,
        qa_backend=args.qa_backend or Settings.qa_backend,
        qa_batch_size=args.qa_batch_size or Settings.qa_batch_size,
        qa_batch_wait_ms=args.qa_batch_wait_ms
        if args.qa_batch_wait_ms is not None
        else Settings.qa_batch_wait_ms,
        corpus=args.corpus,
    )
    try:
        parse_url(args.redis)
        km = load_app(args.app) if args.app else None
        if km is None or args.model:
            km = _with_qa(km, qa, demo=args.demo)  # the servers are the user's: no demo unasked
        syncface.hand_over(km)  # an app that warmed its cache at import: the worker's loop takes it
        km.configure(store=args.redis)  # contexts are read from the servers the worker serves
        return run_loop(
            lambda: run_worker(
                km,
                args.redis,
                batch=args.batch,
                max_in_flight=args.max_in_flight,
                default_ttl=args.default_ttl or None,
                max_value_share=args.max_value_share,
            )
        )
    except ConfigError as exc:
        print(f"keymiss: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    command = args.command or "demo"
    if command == "demo":
        from keymiss.apps.demo import run_demo

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
    if command == "ingest":
        return _ingest(args)
    if command == "redis-module":
        return _redis_module()
    if command == "worker":
        return _worker(args)
    if command == "top":
        from keymiss.runtime.top import run_top

        try:
            import redis  # noqa: F401
            import rich  # noqa: F401
        except ImportError as exc:  # rich and redis-py come with the server extra
            print(
                f"keymiss top needs the server extra: pip install 'keymiss[server]' ({exc})", file=sys.stderr
            )
            return 2
        return run_top(
            args.host,
            args.port,
            password=args.password,
            user=args.user,
            interval=args.interval,
            once=args.once,
        )
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
