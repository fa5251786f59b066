"""RESP2/RESP3 request framing, free of I/O (replies are encoded by ``reply``).

Requests are framed by Redis's own rules (``processMultibulkBuffer`` / ``processInlineBuffer`` in
``networking.c``) with Redis's own error texts, because clients and operators recognise them and
because a reply parser such as hiredis accepts request shapes Redis rejects (nested arrays, ``$-1``
arguments, RESP3 aggregates) and rejects ones Redis accepts (``*-10`` is an empty command).
"""

from __future__ import annotations

import re
from collections import deque

try:
    import hiredis
except ImportError:  # optional: the exact parser below stands alone
    hiredis = None  # type: ignore[assignment]

INT_MAX = 2**31 - 1
#: An aggregate header with 4+ digits anywhere in the pending input keeps hiredis away from it: hiredis
#: sizes aggregates up front, and freeing a reader that saw ``>2000000000`` takes the CPU for a minute.
_BIG_AGGREGATE = re.compile(rb"[*%~>|][0-9]{4}")
INLINE_MAX = 64 * 1024  # PROTO_INLINE_MAX_SIZE
UNAUTH_MAX_ARGS = 10
UNAUTH_MAX_BULK = 16384


class ProtocolError(Exception):
    """Malformed request; ``reply`` is the error line Redis sends before closing the connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.reply = f"-ERR Protocol error: {message}\r\n".encode()


def parse_int(raw: bytes) -> int | None:
    """Redis's ``string2ll``: optional ``-``, digits, no leading zeros, no spaces or ``+``."""
    if not raw or len(raw) > 20:
        return None
    digits = raw[1:] if raw[0] == 45 else raw  # '-'
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == 48):  # '0'
        return None
    value = int(raw)
    if not -(2**63) <= value < 2**63 or raw == b"-0":
        return None
    return value


_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = b"0123456789abcdefABCDEF"


def split_inline(line: bytes) -> list[bytes] | None:
    """Redis's ``sdssplitargs``; ``None`` means unbalanced quotes."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \n\r\t\v\f":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        in_dq = in_sq = False
        while True:
            if in_dq:
                if i >= n:
                    return None
                c = line[i]
                if (
                    c == 92  # backslash
                    and i + 3 < n
                    and line[i + 1] == ord("x")
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    current.append(_ESCAPES.get(line[i], line[i]))
                elif c == 34:  # closing "
                    if i + 1 < n and line[i + 1] not in b" \n\r\t\v\f":
                        return None
                    in_dq = False
                    i += 1
                    break
                else:
                    current.append(c)
            elif in_sq:
                if i >= n:
                    return None
                c = line[i]
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    current.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in b" \n\r\t\v\f":
                        return None
                    in_sq = False
                    i += 1
                    break
                else:
                    current.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \n\r\t\v\f":
                    break
                if c == 34:
                    in_dq = True
                elif c == 39:
                    in_sq = True
                else:
                    current.append(c)
            i += 1
        args.append(bytes(current))


class RequestParser:
    """Incremental request reader: ``feed`` bytes, then call ``next`` until it returns ``None``.

    State survives between feeds, so a 100 MB bulk arriving in 1-byte chunks is scanned once.
    """

    def __init__(
        self,
        *,
        max_bulk: int = 512 * 1024**2,
        max_args: int = INT_MAX,
        max_inline: int = INLINE_MAX,
        use_hiredis: bool = True,
    ) -> None:
        self.use_hiredis = use_hiredis and hiredis is not None
        self._ready: deque[list[bytes]] = deque()
        self.max_bulk = max_bulk
        self.max_args = max_args
        self.max_inline = max_inline
        self.authenticated = True
        self._buf = bytearray()
        self._pos = 0
        self._args: list[bytes] | None = None
        self._remaining = 0
        self._bulklen = -1
        self._held = 0  # bytes of the unfinished multibulk command already read into ``_args``

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received and not yet consumed (the query buffer)."""
        return len(self._buf) - self._pos

    @property
    def held(self) -> int:
        """The query buffer as memory sees it: bytes not yet consumed, plus those of an unfinished
        command already read into arguments (a ``*1048576`` request trickled in 64 KB arguments
        holds them all, though none is pending)."""
        return len(self._buf) - self._pos + self._held

    @property
    def partial(self) -> bool:
        """A request has started and is not finished: bytes are pending, or arguments are held."""
        return self._args is not None or self._pos < len(self._buf)

    def reset(self) -> None:
        """Drop everything buffered and held (the connection is being closed)."""
        self._buf = bytearray()
        self._pos = 0
        self._args = None
        self._held = 0
        self._ready.clear()

    @property
    def in_command(self) -> bool:
        """True while a multibulk command has been started but not finished."""
        return self._args is not None

    def _hiredis_batch(self) -> list[list[bytes]]:
        """Every complete, canonical, well-formed command at the cursor, parsed by hiredis.

        hiredis is a reply parser: it accepts request shapes Redis rejects (nested arrays, ``$-1``,
        ``+simple`` strings, RESP3 types) and rejects ``*-10``, which Redis skips. So a command is
        taken only if it is a non-empty flat list of bytes *and* its bytes are laid out canonically
        (every element marker at its canonical offset is ``$``) — then Redis would have read exactly
        the same command from exactly those bytes (hiredis already refuses signs, spaces and leading
        zeros in lengths). At the first command that fails this, or on any hiredis error, the cursor
        stops and the exact parser takes over from there with Redis's own rules and messages.
        """
        buf = self._buf
        pos = self._pos
        reader = hiredis.Reader()
        reader.feed(buf, pos)  # type: ignore[arg-type]  # any buffer works
        out: list[list[bytes]] = []
        max_args = self.max_args
        max_bulk = self.max_bulk
        while True:
            try:
                cmd = reader.gets()
            except hiredis.ProtocolError:
                break
            if type(cmd) is not list or not cmd or len(cmd) > max_args:
                break
            p = pos + 3 + len(str(len(cmd)))
            for arg in cmd:
                if type(arg) is not bytes or buf[p] != 36 or len(arg) > max_bulk:
                    p = -1
                    break
                size = len(arg)
                p += 5 + size + (1 if size < 10 else 2 if size < 100 else len(str(size)))
            if p < 0:
                break
            out.append(cmd)
            pos = p
        self._pos = pos
        return out

    def _fast(self) -> list[bytes] | None:
        """One complete, well-formed multibulk command at the cursor, or ``None``.

        The common case parsed with few checks and no state; anything unusual (incomplete, odd
        spacing, limits, errors) returns ``None`` so the exact path below decides, from the same
        position, with Redis's rules and messages.
        """
        buf = self._buf
        size = len(buf)
        cr = buf.find(b"\r\n", self._pos, self._pos + 13)
        if cr < 0:
            return None
        raw = buf[self._pos + 1 : cr]
        if not raw.isdigit() or raw[0] == 48:
            return None
        count = int(raw)
        if count > 4096 or count > self.max_args:
            return None
        p = cr + 2
        max_bulk = self.max_bulk
        args = []
        for _ in range(count):
            if p >= size or buf[p] != 36:
                return None
            cr = buf.find(b"\r\n", p, p + 13)
            if cr < 0:
                return None
            raw = buf[p + 1 : cr]
            if not raw.isdigit() or (raw[0] == 48 and len(raw) > 1):
                return None
            n = int(raw)
            end = cr + 2 + n
            if n > max_bulk or end + 2 > size:
                return None
            args.append(bytes(buf[cr + 2 : end]))
            p = end + 2
        self._pos = p
        return args

    def next(self) -> list[bytes] | None:
        """The next complete command, or ``None`` if more bytes are needed."""
        if self._ready:
            return self._ready.popleft()
        buf = self._buf
        if self._args is None and self._pos < len(buf) and buf[self._pos] == 42 and self.authenticated:
            # hiredis pays off on pipelines; one small command is cheaper to read in Python
            if (
                self.use_hiredis
                and 256 <= len(buf) - self._pos <= 65536
                and _BIG_AGGREGATE.search(buf, self._pos) is None
            ):
                batch = self._hiredis_batch()
                if batch:
                    self._ready.extend(batch[1:])
                    return batch[0]
            else:
                cmd = self._fast()
                if cmd is not None:
                    return cmd
        while True:
            if self._args is None:
                if self._pos >= len(buf):
                    return None
                if buf[self._pos] != 42:  # '*'
                    cmd = self._inline()
                    if cmd is None:
                        return None
                    if cmd:
                        return cmd
                    continue  # empty line
                cr = buf.find(b"\r", self._pos)
                if cr < 0:
                    if len(buf) - self._pos > INLINE_MAX:
                        raise ProtocolError("too big mbulk count string")
                    return None
                if cr + 1 >= len(buf):
                    return None  # wait for the '\n'
                count = parse_int(bytes(buf[self._pos + 1 : cr]))
                if count is None or count > INT_MAX:
                    raise ProtocolError("invalid multibulk length")
                if not self.authenticated and count > UNAUTH_MAX_ARGS:
                    raise ProtocolError("unauthenticated multibulk length")
                if count > self.max_args:
                    raise ProtocolError("invalid multibulk length")
                header = cr + 2 - self._pos
                self._pos = cr + 2
                if count <= 0:
                    continue  # Redis ignores empty and negative multibulk counts
                self._held = header
                self._args = []
                self._remaining = count
                self._bulklen = -1
            args = self._args
            while self._remaining:
                if self._bulklen < 0:
                    if self._pos >= len(buf):
                        return None
                    if buf[self._pos] != 36:  # '$'
                        raise ProtocolError(f"expected '$', got '{chr(buf[self._pos])}'")
                    cr = buf.find(b"\r", self._pos)
                    if cr < 0:
                        if len(buf) - self._pos > INLINE_MAX:
                            raise ProtocolError("too big bulk count string")
                        return None
                    if cr + 1 >= len(buf):
                        return None
                    size = parse_int(bytes(buf[self._pos + 1 : cr]))
                    if size is None or size < 0 or size > self.max_bulk:
                        raise ProtocolError("invalid bulk length")
                    if not self.authenticated and size > UNAUTH_MAX_BULK:
                        raise ProtocolError("unauthenticated bulk length")
                    self._held += cr + 2 - self._pos
                    self._pos = cr + 2
                    self._bulklen = size
                end = self._pos + self._bulklen
                if end + 2 > len(buf):
                    return None
                args.append(bytes(buf[self._pos : end]))
                self._held += self._bulklen + 2
                self._pos = end + 2  # like Redis, the two bytes after the bulk are not checked
                self._bulklen = -1
                self._remaining -= 1
            self._args = None
            self._held = 0
            return args

    def _inline(self) -> list[bytes] | None:
        buf = self._buf
        nl = buf.find(b"\n", self._pos)
        if nl < 0:
            if len(buf) - self._pos > self.max_inline:
                raise ProtocolError("too big inline request")
            return None
        end = nl - 1 if nl > self._pos and buf[nl - 1] == 13 else nl
        line = bytes(buf[self._pos : end])
        if end - self._pos > self.max_inline:
            raise ProtocolError("too big inline request")
        self._pos = nl + 1
        args = split_inline(line)
        if args is None:
            raise ProtocolError("unbalanced quotes in request")
        return args
