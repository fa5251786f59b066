"""Which front end serves ``keymiss serve``, and starting it: the one place that knows both.

The default is a real server: the embedded Valkey (or ``--redis-server PATH``) with the keymiss
module, hits at the server's own speed, and workers in this process computing the misses. An app
whose store is a server URL (or ``--redis URL``) gets workers attached to that server instead.
The pure-Python RESP server remains for the LMDB store, for ``--server python``, and for machines
with no server binary (said in the log).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from keymiss.config import Settings
from keymiss.engine.cache import Keymiss
from keymiss.errors import ConfigError
from keymiss.stores import Store, open_store
from keymiss.valkey.serverconf import ServerBinary, find_binary
from keymiss.valkey.topology import parse_url

log = logging.getLogger("keymiss.server")


@dataclass(frozen=True)
class FrontEnd:
    """``kind`` is "python", "embedded" or "attach"; ``why`` is said in the log."""

    kind: str
    why: str
    binary: ServerBinary | None = None
    url: str | None = None


def choose_front_end(km: Keymiss, settings: Settings) -> FrontEnd:
    """The front end for this app and these settings (ConfigError for contradictions)."""
    spec = settings.store if settings.store is not None else km.store_spec
    url = settings.redis
    if (
        url is None
        and isinstance(spec, str)
        and spec.split(":", 1)[0].lower()
        in (
            "redis",
            "rediss",
            "redis+cluster",
            "rediss+cluster",
        )
    ):
        url = spec
    if isinstance(spec, str):
        _check_store_url(spec, settings)
    if settings.server == "python":
        if settings.redis:
            raise ConfigError("--redis attaches workers to a server; the Python server takes --store URL")
        return FrontEnd("python", "--server python")
    lmdb = isinstance(spec, str) and spec.lower().startswith("lmdb")
    if lmdb or (isinstance(spec, Store) and not spec.url.startswith("memory")):
        if settings.server == "valkey":
            raise ConfigError("the LMDB store is served by the Python server: use --server python")
        return FrontEnd("python", "the LMDB store is served by the Python server")
    if url is not None:
        if settings.redis_server:
            raise ConfigError("--redis attaches to a running server; --redis-server starts one: pick one")
        parse_url(url)
        return FrontEnd("attach", f"workers attached to {url.split('@')[-1]}", url=url)
    binary, origin = find_binary(settings.redis_server)
    if binary is None:
        if settings.server == "valkey":
            raise ConfigError(f"no server binary to embed: {origin}; pass --redis-server PATH")
        return FrontEnd("python", f"no server binary to embed ({origin})")
    return FrontEnd("embedded", f"{binary} from {origin}", binary=binary)


def _check_store_url(spec: str, settings: Settings) -> None:
    """A malformed store URL is one clear error whatever the front end (nothing connects here)."""
    if spec.lower().startswith("lmdb"):
        if spec.split(":", 1)[-1].split("?", 1)[0] in ("", "lmdb"):
            raise ConfigError(f"store {spec!r}: lmdb needs a directory (lmdb:PATH)")
        return  # opening it would create the directory: the Python server does that
    open_store(spec, max_memory=settings.max_memory or "64MB", eviction="lru")


def serve(km: Keymiss, settings: Settings, *, config_file: str | None = None) -> int:
    """Run the chosen front end until a signal; the exit status (ConfigError before anything runs)."""
    front = choose_front_end(km, settings)
    if front.kind == "python":
        from keymiss.server import run

        if front.why != "--server python":
            log.info("serving with the Python server: %s", front.why)
        for name in ("data_dir", "redis_server", "valkey", "admin_password"):
            if getattr(settings, name):
                log.warning("%s applies to the embedded server only: ignored", name.replace("_", "-"))
        return run(km, settings, config_file=config_file)
    from keymiss.valkey.runner import run_module_front

    # the run says which front end once its settings passed (a refusal is the only line said)
    return run_module_front(km, settings, binary=front.binary, url=front.url, why=front.why)
