"""The embedded Valkey of ``keymiss serve``: found, configured, started, supervised, stopped.

A real server answers the hits (at its own speed, every command a Redis client knows) and the
keymiss module queues the misses for the workers that run in keymiss's own process. keymiss owns
the child's life: it renders the configuration from its settings and hands it over on the child's
standard input (no password on disk or on a command line), forwards the server's log into its own,
restarts a server that dies (with backoff, and gives up loudly after repeated deaths rather than
run half-alive), shuts it down cleanly, and ties it to the parent so that a ``kill -9`` of keymiss
leaves no orphan server holding the port. Its private folder (the server's unix socket, and the
pid of the keymiss that made it) goes with it; one left by a keymiss killed outright is removed by
the next start.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from keymiss.errors import ReplyError, error_line
from keymiss.sizes import parse_size
from keymiss.valkey import protocol
from keymiss.valkey.respclient import RespClient
from keymiss.valkey.serverconf import (
    OWN_USER,
    SOCKET_NAME,
    ServerBinary,
    port_in_use,
    render_config,
)
from keymiss.valkey.workdir import make_workdir, remove_stale_workdirs

log = logging.getLogger("keymiss.valkey")

#: Valkey's log line: ``pid:role day month year time level message``
_LOG_LINE = re.compile(r"^\d+:[A-Za-z] \d+ \w+ \d+ [\d:.]+ ([.\-*#]) (.*)$")
_LEVELS = {"#": logging.WARNING, "*": logging.INFO, "-": logging.DEBUG, ".": logging.DEBUG}
#: expected lines said at the wrong level: the module refuses to be unloaded (at exit, harmlessly);
#: the server looks its TLS connection type up once, when the module first asks about a client
#: (``GetClientInfoById``), and warns that a binary built without TLS has none — the embedded server
#: never listens with TLS
_QUIET = re.compile(
    r"^(Legacy Redis Module .*keymiss.* found|Module keymiss OnUnload failed|Failed to unload module keymiss"
    r"|Missing implement of connection type tls$)"
)
#: how often keymiss asks its server, before opening its port, whether the workers have registered
READY_WATCH = 0.02
#: the server's refusals of a login or of a user's command
_REFUSALS = ("NOAUTH", "WRONGPASS", "NOPERM")


def _info_field(info: Any, name: str) -> str | None:
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key == name:
            return value.strip()
    return None


def served_keyspaces(info: Any) -> int:
    """How many keyspaces an ``INFO keymiss`` reply counts at least one worker for."""
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    n = 0
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.startswith(protocol.INFO_SECTION + "_keyspace_"):
            workers = protocol.parse_info_keyspace(value.strip()).get("workers", "0")
            n += workers.isdigit() and int(workers) > 0
    return n


def _tie_to_parent(parent: int) -> Callable[[], None]:
    """``preexec_fn`` of the child: the kernel sends it SIGTERM when keymiss dies, even by SIGKILL
    (Linux ``PR_SET_PDEATHSIG``), so no orphan server keeps the port and the data directory."""

    def tie() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the tie was made
            os._exit(1)

    return tie


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerFailed(Exception):
    """The embedded server could not be started, or kept dying."""


class EmbeddedServer:
    """One supervised ``valkey-server`` child with the keymiss module loaded."""

    def __init__(
        self,
        binary: ServerBinary,
        module: str,
        *,
        host: str = "127.0.0.1",
        port: int = 6380,
        data_dir: str | None = None,
        max_memory: int | str = "auto",
        eviction: str | None = None,
        requirepass: str | None = None,
        admin_password: str | None = None,
        max_clients: int = 10_000,
        max_bulk: int = 512 * 1024**2,
        query_buffer: int = 1024**3,
        output_buffer: int = 64 * 1024**2,
        output_stall_seconds: float = 60.0,
        extra: Mapping[str, Any] | None = None,
        restarts: int = 5,
        start_seconds: float = 60.0,
        module_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        self.data_dir = os.path.abspath(data_dir) if data_dir else None
        self.requirepass = requirepass
        self._own_password = secrets.token_hex(24)
        self.max_memory = parse_size(max_memory, what="max-memory")
        self.restarts = restarts
        self.start_seconds = start_seconds
        render = functools.partial(
            render_config,
            host=host,
            module=module,
            module_args=module_args,
            data_dir=self.data_dir,
            max_memory=self.max_memory,
            eviction=eviction,
            requirepass=requirepass,
            own_password=self._own_password,
            admin_password=admin_password,
            max_clients=max_clients,
            max_bulk=max_bulk,
            query_buffer=query_buffer,
            output_buffer=output_buffer,
            output_stall_seconds=output_stall_seconds,
            extra=extra or {},
            avoids_copies=binary.avoids_copies,
        )
        render(workdir="/nonexistent")  # refused settings raise here, before anything is created
        self.workdir, self._workdir_lock = make_workdir()
        #: handed to the server on its standard input at each start, kept nowhere else
        self._config_text = render(workdir=self.workdir)
        self._tidied = False
        self._restart_why = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._up_since = 0.0
        self.deaths = 0
        self.up = False
        #: whether the TCP port is open (``open_port``): each start begins with it closed
        self.listening = False
        self._recent: collections.deque[str] = collections.deque(maxlen=30)
        self._stopping = False
        self._log_task: asyncio.Task[None] | None = None

    # --- addresses -----------------------------------------------------------------------------------
    @property
    def client_host(self) -> str:
        """Where keymiss's own connections go: loopback when the server binds every address."""
        if self.host in ("0.0.0.0", "", "*"):
            return "127.0.0.1"
        if self.host in ("::", "[::]"):
            return "::1"
        return self.host

    @property
    def tcp_url(self) -> str:
        """Where clients reach the server (keymiss itself uses ``url``)."""
        host = f"[{self.client_host}]" if ":" in self.client_host else self.client_host
        auth = f":{quote(self.requirepass, safe='')}@" if self.requirepass else ""
        return f"redis://{auth}{host}:{self.port}"

    @property
    def url(self) -> str:
        """keymiss's own way in: the server's unix socket in keymiss's private directory, so the
        password is never sent to whatever else might hold the TCP port."""
        auth = f"{OWN_USER}:{self._own_password}@"
        return f"unix://{auth}{os.path.join(self.workdir, SOCKET_NAME)}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def persistent(self) -> bool:
        return self.data_dir is not None

    # --- life ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the child and wait until it answers (its data loaded); ServerFailed otherwise."""
        if self.data_dir:
            try:
                os.makedirs(self.data_dir, exist_ok=True)
            except OSError as exc:
                raise ServerFailed(f"cannot create the data directory {self.data_dir}: {exc}") from None
        holder = port_in_use(self.host, self.port)
        if holder:
            raise ServerFailed(f"port {self.port} on {self.host} is in use by another process ({holder})")
        if not self._tidied:  # once: folders left by keymiss runs killed outright
            self._tidied = True
            for path in remove_stale_workdirs(os.path.dirname(self.workdir)):
                log.info("removed %s, left by a keymiss that is no longer running", path)
        self._recent.clear()
        self._restart_why = ""
        self.listening = False
        self.proc = await asyncio.create_subprocess_exec(
            self.binary.path,
            "-",  # the configuration comes on standard input: secrets never touch the disk
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.workdir,
            # its own session: a terminal's Ctrl-C reaches keymiss, which drains its workers first
            start_new_session=True,
            preexec_fn=_tie_to_parent(os.getpid()),
        )
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(self._config_text.encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it exited at once: its last words say why (below)
        finally:
            self.proc.stdin.close()
        self._log_task = asyncio.get_running_loop().create_task(self._forward_log(self.proc))
        log.info(
            "started %s, pid %d, on %s:%d (the port opens once the workers have registered)",
            self.binary,
            self.proc.pid,
            self.host,
            self.port,
        )
        await self._wait_ready()
        self.started_at = time.time()
        self._up_since = time.monotonic()
        self.up = True

    async def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_seconds
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                if self._log_task is not None:  # its last words say why
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._log_task), 2)
                raise ServerFailed(
                    f"{self.binary.name.lower()}-server exited with status {self.proc.returncode} at start: "
                    + (" | ".join(list(self._recent)[-5:]) or "no output")
                )
            try:
                client = await RespClient.connect(self.url, wait=2)
                try:
                    await client.call(["PING"])
                    info = await client.call(["INFO", "server"])
                finally:
                    await client.close()
                pid = _info_field(info, "process_id")
                if pid != str(self.proc.pid):  # cannot happen through our own socket, but say so
                    raise ServerFailed(f"the server on {self.url!r} is process {pid}, not {self.proc.pid}")
                return
            except (OSError, ConnectionError, ReplyError) as exc:
                last = str(exc)  # refused while starting, -LOADING while it reads its data
                if last.startswith("LOADING"):  # progress: a large snapshot takes what it takes
                    deadline = time.monotonic() + self.start_seconds
            await asyncio.sleep(0.05)
        raise ServerFailed(f"the server did not answer within {self.start_seconds:.0f}s ({last})")

    async def registered(self, pid: int | None, keyspaces: int, stopping: asyncio.Event) -> bool:
        """Wait until the server process ``pid`` counts a worker for ``keyspaces`` keyspaces (its
        ``INFO keymiss``, asked on the private socket). False when that process is gone
        (supervision starts another) or ``stopping`` is set."""
        client: RespClient | None = None
        try:
            while pid is not None and self.pid == pid and not stopping.is_set():
                try:
                    if client is None or client.closed:
                        client = await RespClient.connect(self.url, wait=2)
                    if (
                        served_keyspaces(await client.call(["INFO", protocol.INFO_SECTION], wait=2))
                        >= keyspaces
                    ):
                        return True
                except (TimeoutError, OSError, ConnectionError, ReplyError):
                    if client is not None:
                        with contextlib.suppress(Exception):
                            await client.close()
                    client = None
                await asyncio.sleep(READY_WATCH)
            return False
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()

    async def open_port(self) -> None:
        """Let clients in: the server starts on its private socket alone (``port 0``), and keymiss
        opens the TCP port once its workers have registered their keyspaces, so that no client reads
        a keyspace's key before the server knows it is one. ServerFailed when the server cannot
        listen there (another process took the port since the start's check)."""
        if self.listening:
            return
        try:
            client = await RespClient.connect(self.url, wait=5)
        except (OSError, ConnectionError, ReplyError) as exc:
            raise ServerFailed(f"cannot reach the server to open its port: {exc}") from None
        try:
            await client.call(["CONFIG", "SET", "port", str(self.port)], wait=5)
        except ReplyError as exc:
            holder = port_in_use(self.host, self.port)
            raise ServerFailed(
                f"the server cannot listen on {self.host}:{self.port}: {exc}"
                + (f" (in use by another process: {holder})" if holder else "")
            ) from None
        except (OSError, ConnectionError) as exc:
            raise ServerFailed(f"the server went away while opening its port: {exc}") from None
        finally:
            await client.close()
        self.listening = True

    async def _forward_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except (ValueError, OSError):  # a line longer than the stream's limit
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            if not line.strip():
                continue
            m = _LOG_LINE.match(line)
            level, text = (_LEVELS[m.group(1)], m.group(2)) if m else (logging.INFO, line)
            if _QUIET.match(text):
                level = logging.DEBUG
            self._recent.append(text)
            log.log(level, "%s", text)

    async def supervise(self, on_restart: Callable[[], Awaitable[None]] | None = None) -> None:
        """Watch the child until ``stop()``: a death is logged and the server restarted with
        backoff; more than ``restarts`` deaths within a minute raise ServerFailed."""
        backoff = 0.5
        deaths: collections.deque[float] = collections.deque()
        while True:
            proc = self.proc
            assert proc is not None
            status = await proc.wait()
            if self._log_task is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._log_task), 2)
            self.up = False
            self.listening = False
            if self._stopping:
                return
            self.deaths += 1
            now = time.monotonic()
            if now - self._up_since > 60:  # it had been running well: back to a short wait
                backoff = 0.5
            deaths.append(now)
            while deaths and now - deaths[0] > 60:
                deaths.popleft()
            how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
            if self._restart_why:
                how = f"was stopped by keymiss ({self._restart_why})"
            if len(deaths) > self.restarts:
                raise ServerFailed(f"the server {how}, its {len(deaths)}th death within a minute: giving up")
            log.error("the server %s; restarting it in %.1fs", how, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            if self._stopping:
                return
            try:
                await self.start()
            except ServerFailed as exc:
                log.error("%s", exc)
                continue  # counted as another death by the loop (its process has exited)
            if on_restart is not None:
                await on_restart()

    def restart(self, why: str, *, kill: bool = False) -> bool:
        """Stop the running server (SIGTERM: it saves first when persistence is on) for
        ``supervise`` to start it again from keymiss's configuration, its users and settings as
        keymiss made them; the restart counts as a death. ``kill``: SIGKILL, for a server that
        cannot act on SIGTERM (wedged in a script). False when none is running."""
        proc = self.proc
        if proc is None or proc.returncode is not None or self._stopping:
            return False
        self._restart_why = why
        with contextlib.suppress(ProcessLookupError):
            proc.kill() if kill else proc.terminate()
        return True

    async def refused_login(self) -> str | None:
        """The server's refusal of keymiss's own login (NOAUTH, WRONGPASS, NOPERM), or None when it
        lets keymiss in, or does not answer (a dead server is supervision's business)."""
        try:
            client = await RespClient.connect(self.url, wait=2)
        except ReplyError as exc:
            return error_line(exc) if str(exc).startswith(_REFUSALS) else None
        except (TimeoutError, OSError, ConnectionError):
            return None
        try:
            await client.call(["PING"], wait=2)
        except ReplyError as exc:
            return error_line(exc) if str(exc).startswith(_REFUSALS) else None
        except (TimeoutError, OSError, ConnectionError):
            return None
        finally:
            await client.close()
        return None

    async def stop(self, timeout: float = 30.0) -> int | None:  # noqa: ASYNC109
        """Shut the server down cleanly: a last snapshot when persistence is on. Returns its status."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            self._cleanup()
            return None if proc is None else proc.returncode
        try:
            client = await RespClient.connect(self.url, wait=2)
            try:
                await client.call(["SHUTDOWN", "SAVE" if self.persistent else "NOSAVE"], wait=timeout)
            except (ConnectionError, OSError):
                pass  # the reply to a successful SHUTDOWN is the connection closing
            except ReplyError as exc:  # e.g. the final save failed: say so, then stop it anyway
                log.error("the server refused to shut down cleanly: %s", exc)
                proc.terminate()
            finally:
                await client.close()
        except (OSError, ConnectionError, ReplyError):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        try:
            status = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            log.error("the server did not stop within %.0fs: killing it", timeout)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            status = await proc.wait()
        if self._log_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._log_task, 2)
        self.up = False
        self.listening = False
        self._cleanup()
        return status

    def _cleanup(self) -> None:
        """Remove the private folder (the socket, the pid file; the server's files without a data
        directory), then let go of its pid file's lock. Safe to call more than once."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._workdir_lock >= 0:
            os.close(self._workdir_lock)
            self._workdir_lock = -1
