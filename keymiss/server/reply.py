"""RESP2/RESP3 reply encoding, free of I/O.

Split from ``resp``, which reads requests: the two sides share nothing, and every command module builds
replies while only the connection runs the parser. Call sites read ``reply.bulk(...)``, ``reply.OK``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from keymiss.stores.base import NULL_ARRAY, StatusReply

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NULL2 = b"$-1\r\n"
NULL3 = b"_\r\n"
NULL_ARRAY2 = b"*-1\r\n"
EMPTY_ARRAY = b"*0\r\n"


def simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def error(message: str) -> bytes:
    """An error line; the message's first word is the error code (``ERR``, ``BUSY``, ``NOAUTH``)."""
    clean = message.replace("\r", " ").replace("\n", " ")
    return b"-" + clean.encode("utf-8", "replace") + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def null(proto: int) -> bytes:
    return NULL3 if proto == 3 else NULL2


def array(items: Iterable[bytes], count: int | None = None) -> bytes:
    """An array of already-encoded replies."""
    parts = list(items)
    return b"*%d\r\n" % (len(parts) if count is None else count) + b"".join(parts)


def verbatim(text: str, proto: int) -> bytes:
    """RESP3 verbatim text (as INFO and CLIENT INFO send it), a bulk string on RESP2."""
    data = text.encode()
    if proto == 3:
        return b"=%d\r\ntxt:%b\r\n" % (len(data) + 4, data)
    return bulk(data)


class Status(str):
    """A string sent as a status reply (``+readonly``), as Redis sends command and argument flags:
    redis-cli asserts on that type when it builds its hints from COMMAND DOCS."""

    __slots__ = ()


def encode(value: Any, proto: int) -> bytes:
    """A Python value as a reply: dicts become maps (flat arrays on RESP2), floats doubles."""
    if value is None:
        return null(proto)
    if isinstance(value, Status):
        return simple(value)
    if value is NULL_ARRAY:
        return NULL3 if proto == 3 else NULL_ARRAY2
    if isinstance(value, StatusReply):
        return b"+%b\r\n" % value
    if isinstance(value, Exception):  # an error inside an array (EXEC's replies)
        return error(str(value))
    if isinstance(value, bool):
        if proto == 3:
            return b"#t\r\n" if value else b"#f\r\n"
        return integer(int(value))
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, float):
        if proto == 3:
            return b",%b\r\n" % repr(value).encode()
        return bulk(repr(value).encode())
    if isinstance(value, bytes):
        return bulk(value)
    if isinstance(value, str):
        return bulk(value.encode("utf-8", "surrogateescape"))
    if isinstance(value, Mapping):
        body = b"".join(encode(k, proto) + encode(v, proto) for k, v in value.items())
        if proto == 3:
            return b"%%%d\r\n" % len(value) + body
        return b"*%d\r\n" % (2 * len(value)) + body
    if isinstance(value, list | tuple | set | frozenset):
        return b"*%d\r\n" % len(value) + b"".join(encode(v, proto) for v in value)
    return bulk(str(value).encode())
