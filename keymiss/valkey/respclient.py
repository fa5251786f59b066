"""A small pipelining RESP client for the worker's hot path (TAKE, FILL, FAIL), and the RESP reply
parser (``parse``) and framer (``frame``) the test tools share.

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


class Incomplete(Exception):
    """The buffer does not hold a whole reply yet: read more and try again from the same position."""


class Push(list[Any]):
    """A RESP3 push message (``>``): out-of-band data such as a pub/sub message, not a reply."""


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Any, int]:
    """One reply from ``buf[pos:]``: ``(value, position after it)``; ``Incomplete`` if it is not
    all here yet.

    RESP2: ``+`` str, ``-`` ``ReplyError`` (a value, not raised), ``:`` int, ``$`` bytes or None,
    ``*`` list or None. RESP3 besides: ``_`` None, ``#`` bool, ``,`` float, ``(`` int, ``!``
    ``ReplyError``, ``=`` bytes (the text after its ``txt:`` format), ``%`` dict (list keys as
    tuples), ``~`` set (a list if an item is unhashable), ``>`` ``Push``, ``|`` attributes, which
    are read and dropped: the value is the reply that follows them.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise Incomplete
    kind, line = buf[pos], bytes(buf[pos + 1 : end])
    pos = end + 2
    # RESP2 first, in the order the worker meets them: its replies are all of these
    if kind == 43:  # +
        return line.decode("utf-8", "replace"), pos
    if kind == 45:  # -
        return ReplyError(line.decode("utf-8", "replace")), pos
    if kind == 58:  # :
        return int(line), pos
    if kind == 36:  # $
        n = int(line)
        if n < 0:
            return None, pos
        if n > MAX_REPLY:
            raise ConnectionError(f"reply of {n} bytes")
        if len(buf) < pos + n + 2:
            raise Incomplete
        return bytes(buf[pos : pos + n]), pos + n + 2
    if kind == 42:  # *
        n = int(line)
        if n < 0:
            return None, pos
        items = []
        for _ in range(n):
            item, pos = parse(buf, pos)
            items.append(item)
        return items, pos
    return _parse_resp3(buf, kind, line, pos)


def _parse_resp3(buf: bytes | bytearray, code: int, line: bytes, pos: int) -> tuple[Any, int]:
    kind = bytes((code,))
    if kind == b"_":
        return None, pos
    if kind == b"#":
        if line not in (b"t", b"f"):
            raise ConnectionError(f"not a RESP3 boolean: {line!r}")
        return line == b"t", pos
    if kind == b",":
        return float(line), pos
    if kind == b"(":
        return int(line), pos
    if kind in (b"!", b"="):
        n = int(line)
        if n < 0 or n > MAX_REPLY:
            raise ConnectionError(f"reply of {n} bytes")
        if len(buf) < pos + n + 2:
            raise Incomplete
        data = bytes(buf[pos : pos + n])
        pos += n + 2
        if kind == b"!":
            return ReplyError(data.decode("utf-8", "replace")), pos
        return data[4:] if data[3:4] == b":" else data, pos
    if kind in (b"~", b">"):
        items = []
        for _ in range(int(line)):
            item, pos = parse(buf, pos)
            items.append(item)
        if kind == b">":
            return Push(items), pos
        try:
            return set(items), pos
        except TypeError:
            return items, pos
    if kind in (b"%", b"|"):
        out: dict[Any, Any] = {}
        for _ in range(int(line)):
            key, pos = parse(buf, pos)
            value, pos = parse(buf, pos)
            out[tuple(key) if isinstance(key, list) else key] = value
        if kind == b"|":
            return parse(buf, pos)
        return out, pos
    raise ConnectionError(f"not a RESP reply: {kind + line!r}")


_LINE = frozenset(b"+-:_#,(")
_BLOB = frozenset(b"$!=")
_AGGREGATE = frozenset(b"*~>")
_PAIRS = frozenset(b"%|")


def frame(buf: bytes | bytearray, pos: int = 0) -> int:
    """Where the reply that starts at ``buf[pos]`` ends (the position after it), read from its
    framing alone, nothing decoded; ``Incomplete`` if it is not all here yet. Knows the types
    ``parse`` knows; an attribute (``|``) frames together with the reply it annotates."""
    need = 1
    size = len(buf)
    while need:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise Incomplete
        kind = buf[pos]
        need -= 1
        if kind in _LINE:
            pos = end + 2
            continue
        if kind not in _BLOB and kind not in _AGGREGATE and kind not in _PAIRS:
            raise ConnectionError(f"not a RESP reply: {bytes(buf[pos:end])!r}")
        try:
            n = int(buf[pos + 1 : end])
        except ValueError:
            raise ConnectionError(f"bad length: {bytes(buf[pos:end])!r}") from None
        pos = end + 2
        if kind in _BLOB:
            if n < 0:
                continue
            if n > MAX_REPLY:
                raise ConnectionError(f"reply of {n} bytes")
            if size < pos + n + 2:
                raise Incomplete
            pos += n + 2
        elif kind in _AGGREGATE:
            need += max(n, 0)
        else:
            need += 2 * max(n, 0) + (kind == ord("|"))
    return pos


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
                        reply, pos2 = parse(buf, pos)
                    except Incomplete:
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
