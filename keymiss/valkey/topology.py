"""Where workers attach: a server URL (``redis[s]+cluster://`` names a cluster by any node), and a
cluster's masters from ``CLUSTER NODES``."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from keymiss.errors import ConfigError


def parse_url(url: str) -> tuple[bool, str]:
    """``(cluster, plain_url)``: ``redis[s]+cluster://`` names a cluster by any of its nodes."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "unix" and parts.path:  # the embedded server's own socket
        return False, url
    if scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        raise ConfigError(f"bad --redis URL {url!r}: use redis://host:port or redis+cluster://host:port")
    if not parts.hostname:
        raise ConfigError(f"bad --redis URL {url!r}: no host")
    if parts.path not in ("", "/", "/0"):
        raise ConfigError(f"bad --redis URL {url!r}: keyspaces live in database 0 (no /{parts.path[1:]})")
    clean = urlunsplit((scheme.replace("+cluster", ""), parts.netloc, parts.path, parts.query, ""))
    return scheme.endswith("+cluster"), clean


def with_node(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = (auth + "@" if auth else "") + (f"[{host}]" if ":" in host else host) + f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def masters_of(nodes_text: str) -> list[tuple[str, int]]:
    """Masters that serve slots and are not failed, from ``CLUSTER NODES``."""
    out = []
    for line in nodes_text.splitlines():
        fields_ = line.split()
        if len(fields_) < 8:
            continue
        flags = fields_[2].split(",")
        if "master" not in flags or "fail" in flags or "noaddr" in flags or len(fields_) < 9:
            continue
        addr = fields_[1].split("@", 1)[0].split(",", 1)[0]
        host, _, port = addr.rpartition(":")
        if host and port.isdigit() and int(port):
            out.append((host, int(port)))
    return out
