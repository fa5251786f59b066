"""A small pipelining RESP2 client for the worker's hot path (TAKE, FILL, FAIL).

redis-py spends about 190 µs of Python per command on this kind of machine, more than a whole
miss should cost; the worker sends three commands per miss. Here callers write their commands and
wait on one future per reply, matched in order by a single reader task, so concurrent batches share
a connection without a lock and a batch of fills is one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from keymiss.errors import ConfigError, ReplyError

Command = Sequence[bytes | str | int]

#: the most bytes one reply may take (a TAKE of 10k long keys is far below)
MAX_REPLY = 512 * 1024 * 1024


def encode(args: Command) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode("utf-8", "surrogateescape")
        out.append(b"$%d\r\n" % len(b))
        out.append(b)
        out.append(b"\r\n")
    return b"".join(out)


class _Incomplete(Exception):
    pass


def _parse(buf: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One reply from ``buf[pos:]``: (value, next position); ``_Incomplete`` if it is not all here."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    pos = end + 2
    if kind == b"+":
        return line.decode("utf-8", "replace"), pos
    if kind == b"-":
        return ReplyError(line.decode("utf-8", "replace")), pos
    if kind == b":":
        return int(line), pos
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, pos
        if n > MAX_REPLY:
            raise ConnectionError(f"reply of {n} bytes")
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return bytes(buf[pos : pos + n]), pos + n + 2
    if kind == b"*":
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    raise ConnectionError(f"not a RESP2 reply: {bytes(buf[pos - len(line) - 3 : pos])!r}")


class RespClient:
    """One connection; ``call`` and ``call_many`` may be awaited by many tasks at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._closed: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, url: str, *, wait: float = 5.0) -> RespClient:
        """Open ``redis://[user:password@]host:port`` (``rediss://`` for TLS, ``unix://[:password@]
        /path`` for a unix socket) and authenticate."""
        parts = urlsplit(url)
        if parts.scheme == "unix" and parts.path:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(parts.path), wait)
        else:
            if parts.scheme not in ("redis", "rediss") or not parts.hostname:
                raise ConfigError(f"bad server URL {url!r}")
            context = ssl.create_default_context() if parts.scheme == "rediss" else None
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(parts.hostname, parts.port or 6379, ssl=context), wait
            )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            import socket

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = cls(reader, writer, wait)
        try:
            if parts.password is not None:
                auth: list[str] = ["AUTH"]
                if parts.username:
                    auth.append(unquote(parts.username))
                auth.append(unquote(parts.password))
                await client.call(auth)
        except BaseException:
            await client.close()
            raise
        return client

    async def call(self, args: Command, *, wait: float | None = None) -> Any:
        """One command's reply; an error reply raises ``ReplyError``."""
        (reply,) = await self.call_many([args], wait=wait)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    async def call_many(self, commands: Sequence[Command], *, wait: float | None = None) -> list[Any]:
        """The replies of ``commands``, sent in one write; error replies come back as ``ReplyError``."""
        if self._closed is not None:
            raise ConnectionError(f"connection closed: {self._closed}")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._pending.extend(futures)
        self._writer.write(b"".join(encode(c) for c in commands))
        wait = self._timeout if wait is None else wait
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), wait))
        except TimeoutError:
            # replies can no longer be matched to their callers: this connection is done
            self._fail(ConnectionError("timed out waiting for a reply"))
            raise ConnectionError("timed out waiting for a reply") from None

    async def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    raise ConnectionError("connection closed by the server")
                buf += data
                pos = 0
                while pos < len(buf):
                    try:
                        reply, pos2 = _parse(buf, pos)
                    except _Incomplete:
                        break
                    pos = pos2
                    if not self._pending:
                        raise ConnectionError("a reply nobody asked for")
                    fut = self._pending.popleft()
                    if not fut.done():
                        fut.set_result(reply)
                del buf[:pos]
                if len(buf) > MAX_REPLY:
                    raise ConnectionError("reply too large")
        except (OSError, ConnectionError, ValueError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(ConnectionError("connection closed"))
            raise

    def _fail(self, exc: BaseException) -> None:
        if self._closed is None:
            self._closed = exc
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError(str(exc)))
        self._writer.close()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def close(self) -> None:
        self._fail(ConnectionError("closed by the client"))
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.wait_closed()
