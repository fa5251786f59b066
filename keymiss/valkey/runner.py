"""The module front end's run: the embedded Valkey (or ``--redis-server PATH``) with the keymiss
module, hits at the server's own speed, and workers in this process computing the misses; or, for
an app whose store is a server URL (or ``--redis URL``), workers attached to that server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from keymiss.config import Settings
from keymiss.engine import syncface
from keymiss.errors import ConfigError, ReplyError
from keymiss.runtime.exits import EXIT_ABANDONED, EXIT_SERVER_FAILED
from keymiss.runtime.loop import run_loop
from keymiss.runtime.net import is_loopback, redact_url
from keymiss.valkey import protocol
from keymiss.valkey.embedded import READY_WATCH, EmbeddedServer, ServerFailed
from keymiss.valkey.respclient import RespClient
from keymiss.valkey.serverconf import ServerBinary, module_arguments
from keymiss.valkey.topology import parse_url
from keymiss.valkey.worker import Worker

if TYPE_CHECKING:
    from keymiss.engine.cache import Keymiss

log = logging.getLogger("keymiss.server")

#: how often the run looks at the workers' refused sessions
LOGIN_WATCH = 0.25
#: how long the workers may be without their (running) server before keymiss asks the server
#: whether it still lets keymiss in
LOGIN_PROBE = 2.0
#: how often keymiss PINGs its server, on a connection of its own, for a BUSY answer
BUSY_WATCH = 1.0


async def check_module(url: str, *, wait: float = 5.0) -> None:
    """ConfigError unless the server at ``url`` answers and has the keymiss module loaded."""
    _, plain = parse_url(url)
    try:
        client = await RespClient.connect(plain, wait=wait)
    except (OSError, ConnectionError, ReplyError) as exc:
        raise ConfigError(f"cannot reach {redact_url(plain)}: {exc}") from None
    try:
        info = await client.call(["COMMAND", "INFO", protocol.CMD_TAKE.lower()])
    except (OSError, ConnectionError, ReplyError) as exc:
        raise ConfigError(f"{redact_url(plain)}: {exc}") from None
    finally:
        await client.close()
    if not info or info[0] is None:
        raise ConfigError(
            f"{redact_url(plain)} has no keymiss module: start it with "
            '--loadmodule "$(keymiss redis-module)", or MODULE LOAD it'
        )


class ModuleFront:
    """Workers (and, when embedded, their supervised server) serving one app until a signal."""

    def __init__(
        self,
        km: Keymiss,
        settings: Settings,
        *,
        binary: ServerBinary | None = None,
        url: str | None = None,
        why: str = "",
    ) -> None:
        """With ``binary``, start that server embedded; else attach workers to the server at ``url``."""
        if (binary is None) == (url is None):
            raise ValueError("a module front end embeds a binary or attaches to a url: one of them")
        self.km = km
        self.settings = settings
        self.binary = binary
        self.url = url
        self.why = why
        self.server: EmbeddedServer | None = None
        self.worker: Worker | None = None
        self.started_at = time.time()
        self._stopping = asyncio.Event()
        self._metrics: Any = None
        #: the server could not open its port at start (said already): the run ends with status 1
        self._open_failed = False

    def _embedded(self) -> EmbeddedServer:
        from keymiss.valkey.modulepath import module_path

        s = self.settings
        assert self.binary is not None
        if not is_loopback(s.host) and not s.requirepass and not s.unsafe_no_auth:
            raise ConfigError(
                f"refusing to listen on {s.host} without a password: anyone who can reach it "
                "could read and fill the cache. Set --requirepass, or pass --unsafe-no-auth if the "
                "network is trusted."
            )
        eviction = s.eviction or (self.km.eviction if isinstance(self.km.eviction, str) else None)
        module = str(module_path())
        patterns = [ks.pattern for ks in self.km.registry]  # the names REGISTER gives them
        return EmbeddedServer(
            self.binary,
            module,
            module_args=module_arguments(
                module, grace_seconds=s.worker_grace, patterns=patterns, max_clients=s.max_clients
            ),
            host=s.host,
            port=s.port,
            data_dir=s.data_dir,
            max_memory=s.max_memory or self.km.max_memory,
            eviction=eviction,
            requirepass=s.requirepass,
            admin_password=s.admin_password,
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
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(
                signal.SIGHUP, lambda: log.info("SIGHUP ignored: keymiss logs to its standard output")
            )
        if self.binary is not None:
            self.server = self._embedded()  # refused settings raise here, before anything exists
        try:
            return await self._run()
        finally:  # whatever ended the run: the metrics port is let go, the server's folder goes
            self._close_metrics()
            if self.server is not None:
                await self.server.stop()

    def _close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
            self._metrics = None

    def _prepare(self, url: str) -> None:
        """What can be refused, refused before the server starts (ConfigError: one line, exit 2):
        the keyspaces' options, the worker's settings, and the metrics port, bound now so that
        "listening" is never said by a keymiss that cannot serve its metrics."""
        s = self.settings
        for pattern, options in s.keyspaces.items():
            self.km.tune(pattern, **options)
        self.worker = Worker(
            self.km,
            url,
            max_in_flight=min(s.max_in_flight, 1024),
            default_ttl=s.default_ttl or None,
            max_value_share=s.max_value_share,
        )
        if s.metrics_port is not None:
            from keymiss.valkey.metrics import start_module_metrics

            try:
                self._metrics = start_module_metrics(self, s.metrics_port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {s.host}:{s.metrics_port}: {exc.strerror or exc}"
                ) from None

    async def _run(self) -> int:
        s = self.settings
        loop = asyncio.get_running_loop()
        url = self.server.url if self.server is not None else self.url
        assert url is not None
        self._prepare(url)
        assert self.worker is not None
        log.info("front end: %s", self.why)
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
                return 0
            try:
                starting.result()
            except ServerFailed as exc:
                log.error("cannot start the server: %s", exc)
                return EXIT_SERVER_FAILED
        else:
            await check_module(url)
        syncface.hand_over(self.km)  # an app that warmed its cache at import: this loop takes it
        self.km.configure(  # contexts live in that server
            store=url,
            error_detail=s.handler_errors,
            store_connections=s.store_connections,
            store_wait=s.store_wait_seconds,
            store_timeout=s.store_timeout_seconds,
            error_memory=s.size("error_memory"),
        )
        self.km.max_in_flight = s.max_in_flight
        tasks: dict[str, asyncio.Task[Any]] = {"worker": loop.create_task(self.worker.run())}
        if self.server is not None:
            tasks["server"] = loop.create_task(self.server.supervise(self._restarted))
        tasks["login"] = loop.create_task(self._watch_login())
        tasks["busy"] = loop.create_task(self._watch_busy(url))
        tasks["stop"] = loop.create_task(self._stopping.wait())
        status = 0
        try:
            if await self._attached(tasks) and await self._opened(tasks):
                self._announce()
                await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
            status = self._failure(tasks)
        finally:
            status = await self._shutdown(tasks, status)
        return status

    async def _watch_login(self) -> int:
        """Never run with workers the server locks out. When a worker's session is refused for its
        credentials (an operator removed or changed keymiss's ACL user; the worker counts it), or
        the workers have been without a running server for ``LOGIN_PROBE`` seconds and the server
        refuses keymiss's own login: restart the embedded server, whose configuration brings
        keymiss's user back; attached to a server keymiss did not start, end the run (status 1)."""
        assert self.worker is not None
        stats = self.worker.stats
        seen = stats.auth_refusals
        detached_since: float | None = None
        restarted: int | None = None  # the server process already stopped for this
        while True:
            await asyncio.sleep(LOGIN_WATCH)
            refused = ""
            if stats.auth_refusals > seen:
                seen = stats.auth_refusals
                refused = "a worker's session was refused for its credentials"
            elif self.server is not None and self.server.up and not stats.nodes:
                now = time.monotonic()
                detached_since = detached_since or now
                if now - detached_since >= LOGIN_PROBE:
                    detached_since = now
                    refused = await self.server.refused_login() or ""
            else:
                detached_since = None
            if not refused:
                continue
            if self.server is None:
                log.error(
                    "the server refused keymiss's own login (%s): its workers cannot serve it; stopping",
                    refused,
                )
                return EXIT_SERVER_FAILED
            pid = self.server.pid
            if pid is None or pid == restarted:
                continue  # stopped already, or being restarted
            restarted = pid
            log.error(
                "the server refused keymiss's own login (%s): restarting it, which restores "
                "keymiss's ACL user",
                refused,
            )
            self.server.restart("keymiss's own login was refused")

    async def _watch_busy(self, url: str) -> int:
        """Never run half-alive behind a script that never ends. A script or function that has
        written and then loops for good makes the server answer BUSY to everyone, and SCRIPT KILL
        cannot stop it (UNKILLABLE). When keymiss's own PING, on its private connection, has been
        answered BUSY for ``--busy-restart-seconds`` without a break: the embedded server is killed
        and started again (counted against ``--restarts``); attached to a server keymiss did not
        start, the run ends (status 1)."""
        limit = self.settings.busy_restart_seconds
        _, plain = parse_url(url)
        client: RespClient | None = None
        busy_since: float | None = None
        restarted: int | None = None  # the server process already killed for this
        while True:
            await asyncio.sleep(BUSY_WATCH)
            busy = False
            try:
                if client is None or client.closed:
                    client = await RespClient.connect(plain, wait=2)
                await client.call(["PING"], wait=2)
            except ReplyError as exc:
                busy = str(exc).startswith("BUSY")
            except (TimeoutError, OSError, ConnectionError):
                if client is not None:
                    with contextlib.suppress(Exception):
                        await client.close()
                client = None  # a dead server is supervision's business; a new connection next time
            if not busy:
                busy_since = None
                continue
            now = time.monotonic()
            busy_since = busy_since or now
            if now - busy_since < limit:
                continue
            if self.server is None:
                log.error(
                    "the server has answered BUSY for %.0fs (a script or function that never ends): "
                    "keymiss cannot restart a server it did not start; stopping",
                    now - busy_since,
                )
                return EXIT_SERVER_FAILED
            pid = self.server.pid
            if pid is None or pid == restarted:
                continue
            restarted = pid
            log.error(
                "the server has answered BUSY for %.0fs (a script or function that never ends, "
                "which SCRIPT KILL cannot stop once it wrote): restarting it",
                now - busy_since,
            )
            self.server.restart("it answered BUSY for too long", kill=True)
            busy_since = None
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()
            client = None

    async def _attached(self, tasks: dict[str, asyncio.Task[Any]]) -> bool:
        """Wait until the worker serves a server (model loaded, contexts ingested): only then is
        keymiss ready. False if something ended first."""
        assert self.worker is not None
        while not self.worker.stats.nodes:
            if any(t.done() for t in tasks.values()):
                return False
            await asyncio.sleep(0.02)
        return True

    async def _let_clients_in(self) -> bool:
        """Open the running server's TCP port once its workers have registered every keyspace: a
        client that can connect finds each keyspace served. False when that server went away first
        (its successor is let in after its restart); ServerFailed when it cannot listen."""
        assert self.server is not None
        pid = self.server.pid
        if not await self.server.registered(pid, len(self.km.registry), self._stopping):
            return False
        try:
            await self.server.open_port()
        except ServerFailed:
            if self.server.pid != pid:
                return False  # it died meanwhile
            raise
        return True

    async def _opened(self, tasks: dict[str, asyncio.Task[Any]]) -> bool:
        """At start: the port opened (``_let_clients_in``) before keymiss says it listens. False if
        something ended first, or the port cannot be opened (said; the run ends with status 1)."""
        if self.server is None:
            return True
        while not self._stopping.is_set():
            try:
                if await self._let_clients_in() or self.server.listening:
                    return True
            except ServerFailed as exc:
                log.error("%s", exc)
                self._open_failed = True
                return False
            if any(t.done() for t in tasks.values()):
                return False
            await asyncio.sleep(READY_WATCH)
        return False

    def _announce(self) -> None:
        s = self.settings
        if self.server is not None:
            log.info(
                "keymiss listening on %s:%d, server=%s, keyspaces=[%s], auth=%s, maxmemory=%d, "
                "persistence=%s",
                s.host,
                self.server.port,
                self.binary,
                self.km.registry.shown(),
                "on" if s.requirepass else "off",
                self.server.max_memory,
                f"RDB in {self.server.data_dir}" if self.server.data_dir else "off (no --data-dir)",
            )
        else:
            log.info(
                "keymiss %s, keyspaces=[%s]",
                self.why,
                self.km.registry.shown(),
            )

    def _failure(self, tasks: dict[str, asyncio.Task[Any]]) -> int:
        if self._open_failed:
            return EXIT_SERVER_FAILED
        for name in ("login", "busy"):
            task = tasks.get(name)
            if task is not None and task.done() and not task.cancelled() and task.exception() is None:
                return int(task.result())  # a server keymiss cannot restart: said already
        for name in ("server", "worker", "login", "busy"):
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
        """After a restart: contexts again (idempotent; a no-op when the data came back), then the
        port, once the workers have registered with the new server (ServerFailed, which ends the
        run, when it cannot listen)."""
        for attempt in range(5):
            try:
                await self.km.run_start_hooks()
                break
            except Exception as exc:
                log.warning("after the restart, start hooks failed (%s); try %d of 5", exc, attempt + 1)
                await asyncio.sleep(0.5 * (attempt + 1))
        if await self._let_clients_in():
            assert self.server is not None
            log.info(
                "the server listens on %s:%d again: its workers registered",
                self.settings.host,
                self.server.port,
            )

    async def _shutdown(self, tasks: dict[str, asyncio.Task[Any]], status: int) -> int:
        grace = self.settings.grace_seconds
        log.info("shutting down: workers drain (grace %.0fs), then the server stops", grace)
        self._close_metrics()
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
            log.error("keymiss stopped, abandoning %d handler call(s) stuck past their timeout", abandoned)
            return status or EXIT_ABANDONED
        log.info("keymiss stopped")
        return status

    # --- what health and metrics read ------------------------------------------------------------
    def healthy(self) -> bool:
        """Up, a worker attached, and the server answering a PING within a second now (a stopped
        or wedged server is unhealthy at once, not when a worker's TAKE times out)."""
        up = self.server.up and self.server.listening if self.server is not None else True
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


def run_module_front(
    km: Keymiss,
    settings: Settings,
    *,
    binary: ServerBinary | None = None,
    url: str | None = None,
    why: str = "",
) -> int:
    """Run the module front end until a signal; the exit status."""
    runner = ModuleFront(km, settings, binary=binary, url=url, why=why)
    return run_loop(runner.run)
