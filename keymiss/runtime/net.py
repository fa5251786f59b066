"""Network facts both front ends check before they listen or log an address."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


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
