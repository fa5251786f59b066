"""Network facts both front ends check before they listen or log an address."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys
from urllib.parse import urlsplit

#: Linux's SIOCOUTQ (== TIOCOUTQ): bytes in a TCP socket's send queue the peer has not acknowledged.
SIOCOUTQ = 0x5411


def is_loopback(host: str) -> bool:
    """True if every address ``host`` resolves to is a loopback address: only then may a server
    listen without a password."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def redact_url(url: str) -> str:
    """``url`` with its password masked, so that a log line never carries a secret."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(parts.password, "***")
    return url


def unacknowledged(fd: int) -> int | None:
    """Bytes written to socket ``fd`` that the peer has not acknowledged yet, or ``None`` where the
    kernel does not say (not Linux, or not a socket any more).

    What a stall timer must watch: the kernel wakes a writer only once a third of its send buffer
    is free, so a process's own buffer can sit unchanged for tens of seconds while a slow reader
    takes every byte the kernel sends; this count shrinks with each acknowledgement."""
    if fd < 0 or not sys.platform.startswith("linux"):
        return None
    import fcntl

    with contextlib.suppress(OSError):
        raw = fcntl.ioctl(fd, SIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", raw)[0])
    return None
