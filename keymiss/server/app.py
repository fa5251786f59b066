"""Listen, serve, shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from typing import Any

from keymiss.config import Settings
from keymiss.engine import syncface
from keymiss.engine.cache import Keymiss
from keymiss.errors import ConfigError
from keymiss.runtime.exits import EXIT_ABANDONED
from keymiss.runtime.loop import EXECUTOR_WAIT, run_loop
from keymiss.runtime.net import is_loopback
from keymiss.server.client import Watches
from keymiss.server.connection import Connection
from keymiss.server.passthrough import Relay

log = logging.getLogger("keymiss.server")


class Server:
    """A RESP front end over one ``Keymiss`` engine."""

    def __init__(self, km: Keymiss, settings: Settings, *, config_file: str | None = None) -> None:
        settings.validate()
        if not is_loopback(settings.host) and not settings.requirepass and not settings.unsafe_no_auth:
            raise ConfigError(
                f"refusing to listen on {settings.host} without a password: anyone who can reach it "
                "could read and fill the cache. Set --requirepass, or pass --unsafe-no-auth if the "
                "network is trusted."
            )
        self.km = km
        self.settings = settings
        self.config_file = config_file
        syncface.hand_over(km, settings.grace_seconds)  # an app that warmed its cache at import
        km.configure(
            store=settings.store,
            max_memory=settings.max_memory,
            eviction=settings.eviction,
            error_detail=settings.handler_errors,
            store_connections=settings.store_connections,
            store_wait=settings.store_wait_seconds,
            store_timeout=settings.store_timeout_seconds,
            error_memory=settings.size("error_memory"),
        )
        km.max_in_flight = settings.max_in_flight
        for pattern, options in settings.keyspaces.items():
            km.tune(pattern, **options)
        self.connections: dict[int, Connection] = {}
        self.ids = itertools.count(1)
        self.started_at = time.time()
        self.port = settings.port
        self.loop_name = "asyncio"
        self.total_connections = 0
        self.total_commands = 0
        self.rejected_connections = 0
        self.error_replies = 0
        self.busy_rejections = 0
        self.output_disconnections = 0
        self.slow_request_disconnections = 0
        self.auth_failures = 0
        self.abandoned_handlers = 0
        self.access_log = settings.access_log
        self._server: asyncio.Server | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._metrics: Any = None
        self.relay: Relay | None = None  # the pass-through, made on first use (shared stores only)
        self.watches = Watches()
        self.exclusive: Connection | None = None  # the client whose EXEC holds every other one
        self.paused: set[Connection] = set()  # clients held meanwhile
        self.background: set[asyncio.Future[Any]] = set()  # computations started inside EXEC

    def release(self) -> None:
        """An EXEC that held every other client is done: they go on, in arrival order."""
        self.exclusive = None
        paused, self.paused = self.paused, set()
        for c in sorted(paused, key=lambda x: x.id):
            if self.exclusive is not None:  # a resumed client's EXEC holds them again: keep waiting
                self.paused.add(c)
            elif not c.closed and not c.waiting:
                c.resume_processing()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.loop_name = type(loop).__module__.split(".")[0]
        await self.km.start()
        self._server = await loop.create_server(
            lambda: Connection(self), self.settings.host, self.settings.port, reuse_address=True, backlog=511
        )
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        self._watchdog = loop.create_task(self._watch())
        if self.settings.metrics_port is not None:
            from keymiss.server.metrics import start_metrics_server

            self._metrics = start_metrics_server(self, self.settings.metrics_port)
            log.info(
                "Prometheus metrics on http://%s:%d/metrics (and /healthz)",
                self.settings.host,
                self._metrics.server_port,
            )
        log.info(
            "keymiss listening on %s:%d, store=%s, keyspaces=[%s], auth=%s, loop=%s",
            self.settings.host,
            self.port,
            self.km.store.url,
            self.km.registry.shown(),
            "on" if self.settings.requirepass else "off",
            self.loop_name,
        )

    async def _watch(self) -> None:
        """Disconnect clients whose replies have gone unread for too long."""
        stall = self.settings.output_stall_seconds
        slow = self.settings.request_seconds
        while True:
            await asyncio.sleep(min(1.0, stall / 4, slow / 8))  # a limit is kept within an eighth
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.write_paused and conn.reading_replies(now):
                    continue
                if conn.write_paused and now - conn.write_paused_since > stall:
                    log.warning("closing client %s: replies unread for %.0fs", conn.addr, stall)
                    self.output_disconnections += 1
                    conn.abort()
                elif conn.partial_since and now - conn.partial_since > slow:
                    log.warning("closing client %s: request incomplete after %.0fs", conn.addr, slow)
                    self.slow_request_disconnections += 1
                    conn.abort()

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def serving(self) -> bool:
        """Listening and not shutting down: what ``/healthz`` reports."""
        return self._server is not None and self._server.is_serving() and not self._stopping.is_set()

    async def serve_forever(self) -> None:
        """Serve until SIGINT/SIGTERM (or ``request_stop``), then shut down gracefully."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                loop.add_signal_handler(sig, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: log.info("SIGHUP ignored: keymiss logs to its standard output")
            )
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let running computations finish (up to the grace period), close the store.

        Always ends: handlers still stuck after the grace period are abandoned (their threads are
        daemons) and counted in ``abandoned_handlers``, which the exit status reports."""
        grace = self.settings.grace_seconds
        log.info("shutting down: %d computation(s) in flight, grace %.0fs", self.km.engine.in_flight, grace)
        if self._server is not None:
            self._server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._metrics is not None:
            self._metrics.shutdown()
        deadline = time.monotonic() + grace
        await self.km.drain(grace)
        # let waiting connections write the replies those computations produced
        while any(c.waiting for c in self.connections.values()) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for conn in list(self.connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        await asyncio.sleep(0)
        await self.km.close(grace=max(0.0, deadline - time.monotonic()))
        self.abandoned_handlers = self.km.abandoned_handlers
        if self.abandoned_handlers:
            log.error(
                "keymiss stopped, abandoning %d handler call(s) stuck past their timeout",
                self.abandoned_handlers,
            )
        else:
            log.info("keymiss stopped")


def run(km: Keymiss, settings: Settings, *, config_file: str | None = None) -> int:
    """Run a server until a signal stops it. Returns the exit status: 0, or ``EXIT_ABANDONED``
    when work stuck past its timeout was left behind."""
    server = Server(km, settings, config_file=config_file)

    async def main() -> int:
        await server.serve_forever()
        return EXIT_ABANDONED if server.abandoned_handlers else 0

    return run_loop(main, executor_wait=EXECUTOR_WAIT)
