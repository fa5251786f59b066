"""Which front end serves ``keymiss serve``, and the module front end's run.

The default is a real server: the embedded Valkey (or ``--redis-server PATH``) with the keymiss
module, hits at the server's own speed, and workers in this process computing the misses. An app
whose store is a server URL (or ``--redis URL``) gets workers attached to that server instead.
The pure-Python RESP server remains for the LMDB store, for ``--server python``, and for machines
with no server binary (said in the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Settings
from .embedded import EmbeddedServer, ServerBinary, ServerFailed, find_binary
from .errors import ConfigError, ReplyError
from .respclient import RespClient
from .server.app import is_loopback
from .stores import Store
from .worker import Worker, parse_url

if TYPE_CHECKING:
    from .engine import Keymiss

log = logging.getLogger("keymiss.server")

#: exit status when the server could not be started or kept dying
EXIT_SERVER_FAILED = 1


@dataclass(frozen=True)
class FrontEnd:
    """``kind`` is "python", "embedded" or "attach"; ``why`` is said in the log."""

    kind: str
    why: str
    binary: ServerBinary | None = None
    url: str | None = None


def choose_front_end(km: Keymiss, settings: Settings) -> FrontEnd:
    """The front end for this app and these settings (ConfigError for contradictions)."""
    spec = settings.store if settings.store is not None else km.store_spec
    url = settings.redis
    if (
        url is None
        and isinstance(spec, str)
        and spec.split(":", 1)[0].lower()
        in (
            "redis",
            "rediss",
            "redis+cluster",
            "rediss+cluster",
        )
    ):
        url = spec
    if isinstance(spec, str):
        _check_store_url(spec, settings)
    if settings.server == "python":
        if settings.redis:
            raise ConfigError("--redis attaches workers to a server; the Python server takes --store URL")
        return FrontEnd("python", "--server python")
    lmdb = isinstance(spec, str) and spec.lower().startswith("lmdb")
    if lmdb or (isinstance(spec, Store) and not spec.url.startswith("memory")):
        if settings.server == "valkey":
            raise ConfigError("the LMDB store is served by the Python server: use --server python")
        return FrontEnd("python", "the LMDB store is served by the Python server")
    if url is not None:
        if settings.redis_server:
            raise ConfigError("--redis attaches to a running server; --redis-server starts one: pick one")
        parse_url(url)
        return FrontEnd("attach", f"workers attached to {url.split('@')[-1]}", url=url)
    binary, origin = find_binary(settings.redis_server)
    if binary is None:
        if settings.server == "valkey":
            raise ConfigError(f"no server binary to embed: {origin}; pass --redis-server PATH")
        return FrontEnd("python", f"no server binary to embed ({origin})")
    return FrontEnd("embedded", f"{binary} from {origin}", binary=binary)


def _check_store_url(spec: str, settings: Settings) -> None:
    """A malformed store URL is one clear error whatever the front end (nothing connects here)."""
    from .stores import open_store

    if spec.lower().startswith("lmdb"):
        if spec.split(":", 1)[-1].split("?", 1)[0] in ("", "lmdb"):
            raise ConfigError(f"store {spec!r}: lmdb needs a directory (lmdb:PATH)")
        return  # opening it would create the directory: the Python server does that
    open_store(spec, max_memory=settings.max_memory or "64MB", eviction="lru")


async def check_module(url: str, *, wait: float = 5.0) -> None:
    """ConfigError unless the server at ``url`` answers and has the keymiss module loaded."""
    _, plain = parse_url(url)
    try:
        client = await RespClient.connect(plain, wait=wait)
    except (OSError, ConnectionError, ReplyError) as exc:
        raise ConfigError(f"cannot reach {_safe(plain)}: {exc}") from None
    try:
        info = await client.call(["COMMAND", "INFO", "keymiss.take"])
    except (OSError, ConnectionError, ReplyError) as exc:
        raise ConfigError(f"{_safe(plain)}: {exc}") from None
    finally:
        await client.close()
    if not info or info[0] is None:
        raise ConfigError(
            f"{_safe(plain)} has no keymiss module: start it with "
            '--loadmodule "$(keymiss redis-module)", or MODULE LOAD it'
        )


def _safe(url: str) -> str:
    from .worker import _safe as hide

    return hide(url)


class ModuleFront:
    """Workers (and, when embedded, their supervised server) serving one app until a signal."""

    def __init__(self, km: Keymiss, settings: Settings, front: FrontEnd) -> None:
        self.km = km
        self.settings = settings
        self.front = front
        self.server: EmbeddedServer | None = None
        self.worker: Worker | None = None
        self.started_at = time.time()
        self._stopping = asyncio.Event()
        self._metrics: Any = None

    def _embedded(self) -> EmbeddedServer:
        from .redis_module import module_path

        s = self.settings
        assert self.front.binary is not None
        if not is_loopback(s.host) and not s.requirepass and not s.unsafe_no_auth:
            raise ConfigError(
                f"refusing to listen on {s.host} without a password: anyone who can reach it "
                "could read and fill the cache. Set --requirepass, or pass --unsafe-no-auth if the "
                "network is trusted."
            )
        eviction = s.eviction or (self.km.eviction if isinstance(self.km.eviction, str) else None)
        return EmbeddedServer(
            self.front.binary,
            str(module_path()),
            host=s.host,
            port=s.port,
            data_dir=s.data_dir,
            max_memory=s.max_memory or self.km.max_memory,
            eviction=eviction,
            requirepass=s.requirepass,
            max_clients=s.max_clients,
            max_bulk=s.size("max_bulk"),
            query_buffer=s.size("query_buffer"),
            output_buffer=s.size("output_buffer"),
            output_stall_seconds=s.output_stall_seconds,
            extra=s.valkey,
            restarts=s.restarts,
        )

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: log.info("SIGHUP ignored: keymiss logs to its standard output")
            )
        if self.front.kind == "embedded":
            self.server = self._embedded()
            url = self.server.url
        else:
            assert self.front.url is not None
            url = self.front.url
        try:  # what the module would refuse is refused before any server starts
            for pattern, options in s.keyspaces.items():
                self.km.tune(pattern, **options)
            self.worker = Worker(
                self.km, url, max_in_flight=min(s.max_in_flight, 1024), default_ttl=s.default_ttl or None
            )
        except ConfigError:
            if self.server is not None:
                await self.server.stop()  # removes its directory
            raise
        if self.server is not None:
            # a SIGTERM while the server loads a large snapshot stops it, instead of waiting
            starting = loop.create_task(self.server.start())
            stop = loop.create_task(self._stopping.wait())
            await asyncio.wait((starting, stop), return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if not starting.done():
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError, ServerFailed):
                    await starting
                log.info("stopped while the server was starting")
                await self.server.stop()
                return 0
            try:
                starting.result()
            except ServerFailed as exc:
                log.error("cannot start the server: %s", exc)
                await self.server.stop()
                return EXIT_SERVER_FAILED
        else:
            await check_module(url)
        self.km.configure(store=url, error_detail=s.handler_errors)  # contexts live in that server
        self.km.max_in_flight = s.max_in_flight
        tasks: dict[str, asyncio.Task[Any]] = {"worker": loop.create_task(self.worker.run())}
        if self.server is not None:
            tasks["server"] = loop.create_task(self.server.supervise(self._restarted))
        tasks["stop"] = loop.create_task(self._stopping.wait())
        status = 0
        try:
            if await self._attached(tasks):
                self._announce()
                if s.metrics_port is not None:
                    from .server.metrics import start_module_metrics

                    self._metrics = start_module_metrics(self, s.metrics_port)
                await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            status = self._failure(tasks)
        finally:
            status = await self._shutdown(tasks, status)
        return status

    async def _attached(self, tasks: dict[str, asyncio.Task[Any]]) -> bool:
        """Wait until the worker serves a server (model loaded, contexts ingested): only then is
        keymiss ready. False if something ended first."""
        assert self.worker is not None
        while not self.worker.stats.nodes:
            if any(t.done() for t in tasks.values()):
                return False
            await asyncio.sleep(0.02)
        return True

    def _announce(self) -> None:
        s = self.settings
        if self.server is not None:
            log.info(
                "keymiss listening on %s:%d, server=%s, keyspaces=[%s], auth=%s, maxmemory=%d, "
                "persistence=%s",
                s.host,
                self.server.port,
                self.front.binary,
                ", ".join(ks.pattern for ks in self.km.registry),
                "on" if s.requirepass else "off",
                self.server.max_memory,
                f"RDB in {self.server.data_dir}" if self.server.data_dir else "off (no --data-dir)",
            )
        else:
            log.info(
                "keymiss %s, keyspaces=[%s]", self.front.why, ", ".join(ks.pattern for ks in self.km.registry)
            )

    def _failure(self, tasks: dict[str, asyncio.Task[Any]]) -> int:
        for name in ("server", "worker"):
            task = tasks.get(name)
            if task is None or not task.done() or task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, ServerFailed):
                log.error("%s", exc)
                return EXIT_SERVER_FAILED
            if exc is not None:
                log.error("the %s stopped: %r", name, exc, exc_info=exc)
                return EXIT_SERVER_FAILED
            if name == "worker" and not self._stopping.is_set():
                log.error("the worker stopped on its own")
                return EXIT_SERVER_FAILED
        return 0

    async def _restarted(self) -> None:
        """After a restart: contexts again (idempotent; a no-op when the data came back)."""
        for attempt in range(5):
            try:
                await self.km.run_start_hooks()
                return
            except Exception as exc:
                log.warning("after the restart, start hooks failed (%s); try %d of 5", exc, attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))

    async def _shutdown(self, tasks: dict[str, asyncio.Task[Any]], status: int) -> int:
        grace = self.settings.grace_seconds
        log.info("shutting down: workers drain (grace %.0fs), then the server stops", grace)
        if self._metrics is not None:
            self._metrics.shutdown()
        if self.worker is not None:
            self.worker.stop()
        worker = tasks.get("worker")
        if worker is not None and not worker.done():
            try:
                await asyncio.wait_for(asyncio.shield(worker), grace + 1)
            except TimeoutError:
                log.warning("workers still busy after %.0fs: leaving their keys to the server", grace)
                worker.cancel()
            except Exception:
                pass
        with contextlib.suppress(Exception):
            await self.km.close(grace=1.0)
        if self.server is not None:
            code = await self.server.stop()
            tasks["server"].cancel()
            log.info("server stopped (status %s)", code)
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        abandoned = self.km.abandoned_handlers
        if abandoned:
            from .server.app import EXIT_ABANDONED

            log.error("keymiss stopped, abandoning %d handler call(s) stuck past their timeout", abandoned)
            return status or EXIT_ABANDONED
        log.info("keymiss stopped")
        return status

    # --- what health and metrics read ------------------------------------------------------------
    def healthy(self) -> bool:
        """Up, a worker attached, and the server answering a PING within a second now (a stopped
        or wedged server is unhealthy at once, not when a worker's TAKE times out)."""
        up = self.server.up if self.server is not None else True
        if not (up and self.worker is not None and self.worker.stats.nodes):
            return False
        import redis

        client = redis.Redis.from_url(self.worker.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()


def run_module_front(km: Keymiss, settings: Settings, front: FrontEnd) -> int:
    """Run the module front end until a signal; the exit status."""
    runner = ModuleFront(km, settings, front)
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(runner.run())
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        asyncio.set_event_loop(None)
        loop.close()
