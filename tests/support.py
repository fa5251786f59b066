"""The test toolkit: wait for a condition instead of sleeping, and talk RESP to a server.

- ``eventually`` / ``aeventually``: poll a predicate until it holds, bounded in tries and time;
  on timeout an ``AssertionError`` says what the predicate last returned.
- ``RespTestClient`` (async) and ``resp`` (one command on a fresh connection): parsed replies, on
  the project's own RESP client and parser. An error reply is always a ``ReplyError`` *value*,
  never raised, so ``isinstance(reply, ReplyError)`` is how a test checks for one.
- ``RawClient`` (sync): exact bytes in, exact bytes out; each reply is cut at its own framing
  (``respclient.frame``), never by waiting for the socket to go quiet.
- ``Gate``: a handler tells its test it started, then waits until the test lets it finish.
- ``front_started``: which front end a ``keymiss serve`` log says started.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar, overload

from keymiss.errors import ReplyError
from keymiss.valkey.respclient import Incomplete, RespClient, encode, frame, parse

__all__ = [
    "Gate",
    "RawClient",
    "ReplyError",
    "RespTestClient",
    "aeventually",
    "encode_command",
    "eventually",
    "front_started",
    "parse_reply",
    "resp",
]

T = TypeVar("T")
HOST = "127.0.0.1"


# --- waiting ---------------------------------------------------------------------------------------
def _tries(timeout: float, interval: float) -> int:
    return max(1, int(timeout / max(interval, 1e-6)) + 2)


#: ``expect``'s default: the predicate's value is enough when it is true
TRUTHY: Any = object()


def _holds(value: Any, expect: Any) -> bool:
    return bool(value) if expect is TRUTHY else bool(value == expect)


def _timed_out(
    what: str, timeout: float, tries: int, last: Any, error: BaseException | None, expect: Any
) -> AssertionError:
    got = f"raised {error!r}" if error is not None else f"last returned {last!r}"
    if expect is not TRUTHY:
        got += f", expected {expect!r}"
    return AssertionError(f"{what} did not hold within {timeout:g}s ({tries} tries): {got}")


def _name(predicate: Callable[..., Any], message: str | None) -> str:
    return message or getattr(predicate, "__qualname__", None) or repr(predicate)


def eventually(
    predicate: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    ignore: tuple[type[BaseException], ...] = (),
    expect: Any = TRUTHY,
    message: str | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something true (or equal to
    ``expect``, where given), and return that; after ``timeout`` seconds (or as many tries as fit
    in them) raise ``AssertionError`` with its last value. Exceptions of the ``ignore`` types
    count as "not yet"."""
    deadline = time.monotonic() + timeout
    tries = _tries(timeout, interval)
    last: Any = None
    error: BaseException | None = None
    for attempt in range(1, tries + 1):
        try:
            last, error = predicate(), None
        except ignore as exc:
            last, error = None, exc
        if error is None and _holds(last, expect):
            return last  # type: ignore[no-any-return]
        if attempt == tries or time.monotonic() >= deadline:
            raise _timed_out(_name(predicate, message), timeout, attempt, last, error, expect)
        time.sleep(interval)
    raise AssertionError("unreachable")  # pragma: no cover


@overload
async def aeventually(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
    expect: Any = ...,
    message: str | None = ...,
) -> T: ...


@overload
async def aeventually(
    predicate: Callable[[], T],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    interval: float = ...,
    ignore: tuple[type[BaseException], ...] = ...,
    expect: Any = ...,
    message: str | None = ...,
) -> T: ...


async def aeventually(
    predicate: Callable[[], Any],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline for the whole poll, not one await
    interval: float = 0.01,
    ignore: tuple[type[BaseException], ...] = (),
    expect: Any = TRUTHY,
    message: str | None = None,
) -> Any:
    """``eventually`` for a test's event loop: ``predicate`` may be sync or async (a coroutine
    function, or a lambda returning an awaitable: ``lambda: info(port)`` with ``expect=3``), and
    the loop keeps running between tries."""
    deadline = time.monotonic() + timeout
    tries = _tries(timeout, interval)
    last: Any = None
    error: BaseException | None = None
    for attempt in range(1, tries + 1):
        try:
            got = predicate()
            if inspect.isawaitable(got):
                got = await asyncio.wait_for(got, max(deadline - time.monotonic(), interval))
            last, error = got, None
        except TimeoutError as exc:  # an async predicate that outlived the deadline
            last, error = None, exc
        except ignore as exc:
            last, error = None, exc
        if error is None and _holds(last, expect):
            return last
        if attempt == tries or time.monotonic() >= deadline:
            raise _timed_out(_name(predicate, message), timeout, attempt, last, error, expect)
        await asyncio.sleep(interval)
    raise AssertionError("unreachable")  # pragma: no cover


class Gate:
    """A computation's rendezvous with its test, in the test's event loop: the handler calls
    ``await gate.hold(key)``, which records ``key`` and sets ``started``, then waits until the test
    calls ``open()``. The test waits for ``started`` instead of sleeping while it computes."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.released = asyncio.Event()
        self.keys: list[Any] = []

    async def hold(self, key: Any = None) -> None:
        self.keys.append(key)
        self.started.set()
        await self.released.wait()

    async def wait_started(self, wait: float = 10.0) -> None:
        await asyncio.wait_for(self.started.wait(), wait)

    def open(self) -> None:
        self.released.set()


# --- RESP --------------------------------------------------------------------------------------------
def encode_command(*args: Any) -> bytes:
    """One command as a RESP array of bulk strings (ints and strs become their UTF-8 text)."""
    return encode(args)


def parse_reply(data: bytes) -> Any:
    """The one reply ``data`` holds, parsed (RESP2 or RESP3; errors as ``ReplyError`` values)."""
    value, end = parse(data, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} bytes after the reply: {data[end:]!r}")
    return value


class RespTestClient:
    """An async connection for tests: ``async with RespTestClient(port) as c: await c.call("GET", "k")``.

    ``call`` gives the parsed reply, an error reply as a ``ReplyError`` value; ``call_many`` sends
    a pipeline in one write. Calls may overlap (many tasks on one client): replies match in order.
    """

    def __init__(self, port: int, host: str = HOST, *, timeout: float = 10.0, password: str | None = None):
        self.port = port
        self.host = host
        self.timeout = timeout
        self.password = password
        self._client: RespClient | None = None

    async def connect(self) -> RespTestClient:
        auth = f":{password}@" if (password := self.password) is not None else ""
        self._client = await RespClient.connect(f"redis://{auth}{self.host}:{self.port}", wait=self.timeout)
        return self

    async def __aenter__(self) -> RespTestClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> RespClient:
        if self._client is None:
            raise RuntimeError("not connected")
        return self._client

    async def call(self, *args: Any, wait: float | None = None) -> Any:
        """One command's parsed reply (an error reply as a ``ReplyError`` value)."""
        (reply,) = await self.client.call_many([args], wait=self.timeout if wait is None else wait)
        return reply

    async def call_many(self, commands: Sequence[Sequence[Any]], *, wait: float | None = None) -> list[Any]:
        """The replies of ``commands``, sent in one write."""
        return await self.client.call_many(commands, wait=self.timeout if wait is None else wait)

    @property
    def closed(self) -> bool:
        return self._client is None or self._client.closed

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


async def resp(port: int, *args: Any, wait: float = 10.0, host: str = HOST) -> Any:
    """One command on a fresh connection, its reply parsed (an error reply as a ``ReplyError``
    value). A fresh connection per call is what many tests mean: each reader its own client."""
    async with RespTestClient(port, host, timeout=wait) as c:
        return await c.call(*args)


class RawClient:
    """A blocking socket for tests that compare exact bytes.

    ``send_raw`` writes bytes as given (inline commands, malformed input, pieces of a command),
    ``send`` one encoded command; ``reply_bytes`` returns exactly one complete reply's bytes, cut
    where its RESP framing says it ends, and ``replies_bytes(n)`` the next ``n``. ``reply`` and
    ``call`` parse. ``wait_closed`` tells whether the server closed the connection.
    """

    def __init__(self, port: int, host: str = HOST, *, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = bytearray()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, *args: Any) -> None:
        self.sock.sendall(encode(args))

    def _recv(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete reply within {self.timeout:g}s; have {bytes(self._buf)!r}")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed; have {bytes(self._buf)!r}")
        self._buf += data

    def reply_bytes(self, timeout: float | None = None) -> bytes:
        """The next complete reply, its exact bytes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self._buf:
                try:
                    end = frame(self._buf, 0)
                except Incomplete:
                    pass
                else:
                    out = bytes(self._buf[:end])
                    del self._buf[:end]
                    return out
            self._recv(deadline)

    def replies_bytes(self, n: int, timeout: float | None = None) -> list[bytes]:
        """The next ``n`` complete replies, each its exact bytes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return [self.reply_bytes(max(deadline - time.monotonic(), 0.001)) for _ in range(n)]

    def reply(self, timeout: float | None = None) -> Any:
        """The next reply, parsed (an error reply as a ``ReplyError`` value)."""
        return parse_reply(self.reply_bytes(timeout))

    def call(self, *args: Any, timeout: float | None = None) -> Any:
        self.send(*args)
        return self.reply(timeout)

    def pending(self) -> bytes:
        """Bytes received but not yet handed out (part of a reply, or nothing)."""
        return bytes(self._buf)

    def wait_closed(self, timeout: float = 2.0) -> bool:
        """Whether the server closes the connection within ``timeout`` (a reset counts), any
        bytes still coming kept in ``pending()``."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._recv(deadline)
        except ConnectionError:  # closed, or reset (ConnectionResetError is one)
            return True
        except TimeoutError:
            return False


# --- which front end started -------------------------------------------------------------------------
_LISTENING = re.compile(r"keymiss listening on \S+, (store|server)=")


def front_started(log: str) -> str | None:
    """Which front end a ``keymiss serve`` log says is listening: ``"valkey"`` (the module front
    end: a server with keymiss's module, workers in keymiss's process), ``"python"`` (the Python
    RESP server), or ``None`` before either said so."""
    m = _LISTENING.search(log)
    if m is None:
        return None
    return "valkey" if m.group(1) == "server" else "python"
