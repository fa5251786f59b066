"""Stores, chosen by URL-like strings so a flag or a config file can name them.

``memory`` · ``lmdb:PATH`` · ``lmdb:PATH?max_disk=10GB&durable=0&map_size=1GB&max_value=64MB``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from keymiss.errors import ConfigError
from keymiss.sizes import parse_size
from keymiss.stores.base import EvictHook, Item, LocalStore, SharedStore, Store, StoreInfo, Write
from keymiss.stores.eviction import LRUPolicy, Policy
from keymiss.stores.memory import MemoryStore

__all__ = [
    "STORE_URLS",
    "EvictHook",
    "Item",
    "LRUPolicy",
    "LocalStore",
    "MemoryStore",
    "Policy",
    "SharedStore",
    "Store",
    "StoreInfo",
    "Write",
    "open_store",
]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(value: str, name: str) -> bool:
    v = value.lower()
    if v in _TRUE | _FALSE:
        return v in _TRUE
    raise ConfigError(f"store option {name}={value!r} must be 1/0, true/false, yes/no or on/off")


STORE_URLS = "memory, lmdb:PATH, redis://HOST:PORT, rediss://HOST:PORT or redis+cluster://HOST:PORT"


def open_store(
    url: str,
    *,
    max_memory: int | str = "auto",
    eviction: str | Policy = "worth",
    on_evict: EvictHook | None = None,
    clock: Callable[[], float] | None = None,
    connections: int | None = None,
    connection_wait: float | None = None,
    reply_timeout: float | None = None,
) -> Store:
    """Build a store from its URL; ``max_memory`` and ``eviction`` apply to the memory store,
    ``clock`` (unix seconds, for expiries) to the in-process stores, ``connections`` (commands on
    the wire at once; more queue) and ``connection_wait`` (seconds one may queue) to a Redis store
    whose URL does not set them (``max_concurrency``, ``pool_wait``), and ``reply_timeout``
    (seconds a sent command waits for Redis's answer) where it does not set ``reply_timeout``.

    Every malformed URL is a ``ConfigError`` with one readable line, never a traceback."""
    try:
        pool = {"max_concurrency": connections, "pool_wait": connection_wait, "reply_timeout": reply_timeout}
        local = {} if clock is None else {"clock": clock}
        return _open(url, max_memory, eviction, on_evict, local, {k: v for k, v in pool.items() if v})
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad store URL {url!r}: {exc}") from None


def _open(
    url: str,
    max_memory: int | str,
    eviction: str | Policy,
    on_evict: EvictHook | None,
    local: dict[str, Any],
    pool: dict[str, Any],
) -> Store:
    base, _, query = url.partition("?")
    opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    scheme, sep, rest = base.partition(":")
    scheme = scheme.strip().lower()
    if scheme == "memory" and not rest:
        unknown = set(opts) - {"max_memory", "eviction"}
        if unknown:
            raise ConfigError(f"unknown memory store option(s): {', '.join(sorted(unknown))}")
        size = parse_size(opts.get("max_memory", max_memory), what="max_memory")
        return MemoryStore(size, eviction=opts.get("eviction", eviction), on_evict=on_evict, **local)
    if scheme == "lmdb" and sep:
        from keymiss.stores.lmdb import LMDBStore

        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise ConfigError("lmdb store needs a directory: lmdb:PATH")
        unknown = set(opts) - {"max_disk", "durable", "map_size", "max_value"}
        if unknown:
            raise ConfigError(f"unknown lmdb store option(s): {', '.join(sorted(unknown))}")
        return LMDBStore(
            path,
            max_disk=parse_size(opts["max_disk"], what="max_disk") if "max_disk" in opts else None,
            durable=_flag(opts.get("durable", "1"), "durable"),
            map_size=parse_size(opts.get("map_size", "256mb"), what="map_size"),
            max_value=parse_size(opts.get("max_value", "64mb"), what="max_value"),
            on_evict=on_evict,
            **local,
        )
    if scheme in {"redis", "rediss", "redis+cluster", "rediss+cluster", "unix"}:
        try:
            from keymiss.stores.redis import RedisStore
            from keymiss.stores.redisgate import DEFAULT_REPLY_TIMEOUT
        except ImportError as exc:
            raise ConfigError(f"store {url!r} needs redis-py: pip install 'keymiss[redis]' ({exc})") from None
        unknown = set(opts) - {
            "timeout",
            "reply_timeout",
            "lease_ms",
            "max_concurrency",
            "pool_wait",
            "near_cache",
            "near_ttl",
        }
        if unknown:
            raise ConfigError(f"unknown redis store option(s): {', '.join(sorted(unknown))}")
        db = "" if scheme == "unix" else urlsplit(base).path.strip("/")
        if db and not (db.isdigit() and int(db) < 1_000_000):
            raise ConfigError(f"redis store URL {url!r}: the database must be a number, not {db!r}")
        if db and int(db) != 0 and "cluster" in scheme:
            raise ConfigError("a Redis Cluster has database 0 only")
        near = opts.pop("near_cache", None)
        near_ttl = _number(opts.pop("near_ttl", "5"), "near_ttl")
        shared = RedisStore(
            base,
            timeout=_number(opts.get("timeout", "2"), "timeout"),
            reply_timeout=_number(
                opts.get("reply_timeout", pool.get("reply_timeout", DEFAULT_REPLY_TIMEOUT)), "reply_timeout"
            ),
            lease_ms=int(_number(opts.get("lease_ms", "30000"), "lease_ms")),
            max_concurrency=int(
                _number(opts.get("max_concurrency", pool.get("max_concurrency", 32)), "max_concurrency")
            ),
            wait=_number(opts.get("pool_wait", pool.get("pool_wait", 10)), "pool_wait"),
        )
        if near:
            from keymiss.stores.near import NearCacheStore

            return NearCacheStore(shared, max_bytes=parse_size(near, what="near_cache"), ttl=near_ttl)
        return shared
    raise ConfigError(f"unknown store {url!r}; use {STORE_URLS}")


def _number(value: str | float, name: str) -> float:
    try:
        n = float(value)
    except ValueError:
        raise ConfigError(f"store option {name}={value!r} must be a number") from None
    if not n > 0 or n == float("inf"):
        raise ConfigError(f"store option {name}={value!r} must be a positive number")
    return n
