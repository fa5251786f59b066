"""One settings object for the server, loaded from a TOML file, then ``KEYMISS_*`` variables,
then command-line flags (each overriding the one before)."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any

from keymiss.errors import ConfigError
from keymiss.options import KeyspaceOptions
from keymiss.sizes import parse_size
from keymiss.valkey import protocol


@dataclass
class Settings:
    """Everything ``keymiss serve`` can be told. Sizes accept ``"64MB"``-style strings."""

    app: str | None = None
    #: the front end: None picks (the embedded Valkey where a binary exists and the store allows),
    #: "valkey" insists on a real server, "python" is the pure-Python RESP server
    server: str | None = None
    redis_server: str | None = None  # another redis-server / valkey-server binary to embed
    redis: str | None = None  # attach workers to this module-loaded server instead of starting one
    data_dir: str | None = None  # the embedded server's snapshots; None: nothing persists
    default_ttl: float = 7 * 24 * 3600.0  # seconds a computed value lives when its keyspace sets no TTL
    restarts: int = 5  # deaths of the embedded server within a minute before keymiss gives up
    #: how long the server may answer BUSY (a script that never ends) before keymiss restarts it
    busy_restart_seconds: float = 30.0
    #: how long a reader of the embedded server's keyspace waits for a worker (the module's GRACE)
    worker_grace: float = 5.0
    host: str = "127.0.0.1"
    port: int = 6380
    store: str | None = None  # None: what the app chose
    #: a Redis store's commands on the wire at once, the rest queue (None: 32, or its URL's max_concurrency)
    store_connections: int | None = None
    #: seconds a command may queue for one of them before it fails as busy (None: 10, or pool_wait)
    store_wait_seconds: float | None = None
    #: seconds a command sent to a Redis store waits for its answer before it fails as BUSY (it is
    #: never sent twice); None: 30, or the store URL's reply_timeout
    store_timeout_seconds: float | None = None
    max_memory: str | None = None
    eviction: str | None = None
    requirepass: str | None = None
    #: the embedded server's operator user (``admin``): the one login that may reconfigure it
    admin_password: str | None = None
    unsafe_no_auth: bool = False
    max_clients: int = 10_000
    #: proto-max-bulk-len; None: 512MB, or --query-buffer where that is smaller (a larger value
    #: could never be sent: its bytes would pass the query buffer first)
    max_bulk: int | str | None = None
    max_inline: int | str = "64KB"
    max_args: int = 1024 * 1024
    query_buffer: int | str = "1GB"  # client-query-buffer-limit
    output_buffer: int | str = "64MB"  # a client whose unread replies pass this is disconnected
    output_stall_seconds: float = 60.0  # ... or whose replies stay unread this long
    request_seconds: float = 30.0  # a request still incomplete after this long is a slowloris: closed
    max_in_flight: int = 10_000  # computations at once before -BUSY
    #: bytes remembered errors (a keyspace's error_ttl) may hold; past it the oldest are forgotten
    error_memory: int | str = "16MB"
    #: a computed value larger than this share of the server's maxmemory is answered, not stored
    max_value_share: float = 0.1
    handler_errors: str | None = None  # what clients see of a handler's exception: message or type
    access_log: bool = False  # log every command on the keymiss.access logger
    grace_seconds: float = 10.0
    metrics_port: int | None = None
    model: str | None = None  # extractive-QA checkpoint directory for the bertqa keyspace
    qa_dtype: str = "auto"  # auto, float32, bf16-autocast or bfloat16 (see qa.models.resolve_dtype)
    qa_backend: str = "auto"  # auto, openvino or torch (see qa.backends.resolve_backend)
    qa_batch_size: int = 16
    qa_batch_wait_ms: float = 5.0
    corpus: str | None = None  # contexts to ingest at start (JSON lines or text)
    log_level: str = "INFO"
    #: per-keyspace option overrides: {pattern: {option: value}} (``[keymiss.keyspaces."hang:*"]``)
    keyspaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: directives for the embedded server's configuration (``[keymiss.valkey]``: ``appendonly = true``)
    valkey: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def size(self, name: str) -> int:
        if name == "max_bulk" and self.max_bulk is None:
            return min(DEFAULT_MAX_BULK, self.size("query_buffer"))
        return parse_size(getattr(self, name), what=name.replace("_", "-"))

    def validate(self) -> None:
        """ConfigError, one line naming the setting, for any value that means nothing: checked at
        start, before anything is created."""
        for name in ("max_bulk", "max_inline", "query_buffer", "output_buffer", "error_memory"):
            self.size(name)
        minimums = {
            "max_bulk": 1024,
            "max_inline": 1024,
            "query_buffer": 1024,
            "output_buffer": 64 * 1024,
            "error_memory": 64 * 1024,
        }
        for name, least in minimums.items():
            if getattr(self, name) is not None and self.size(name) < least:  # max-bulk left out follows
                raise ConfigError(
                    f"{_flag(name)} must be at least {least // 1024}KB, got {self.size(name)} bytes"
                )
        if self.max_memory is not None and self.size("max_memory") < MIN_MAX_MEMORY:
            raise ConfigError(
                f"max-memory must be at least 1MB (the server needs that much for itself), got "
                f"{self.size('max_memory')} bytes"
            )
        for name, most in MAX_SIZES.items():
            if getattr(self, name) is not None and self.size(name) > most:
                raise ConfigError(
                    f"{_flag(name)} must be at most {most // 1024**4}TB, got {self.size(name)} bytes"
                )
        if self.size("max_bulk") > self.size("query_buffer"):
            raise ConfigError(
                f"max-bulk ({self.size('max_bulk')} bytes) cannot be over query-buffer "
                f"({self.size('query_buffer')} bytes): a value that large could never be sent"
            )
        if self.max_clients > MAX_CLIENTS:
            raise ConfigError(f"max-clients must be at most {MAX_CLIENTS}, got {self.max_clients}")
        for name in (
            "output_stall_seconds",
            "request_seconds",
            "busy_restart_seconds",
            "grace_seconds",
            "worker_grace",
        ):
            value = getattr(self, name)
            if math.isfinite(value) and value > MAX_TTL:
                raise ConfigError(
                    f"{_flag(name)} must be at most {MAX_TTL:.0f} seconds (a year), got {value:g}"
                )
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be between 0 and 65535 (0 picks a free one), got {self.port}")
        if self.metrics_port is not None:
            if not 0 < self.metrics_port < 65536:
                raise ConfigError(f"metrics-port must be between 1 and 65535, got {self.metrics_port}")
            if self.metrics_port == self.port:
                raise ConfigError(f"metrics-port cannot be the server's own port ({self.port})")
        for name in ("max_clients", "max_in_flight", "max_args", "qa_batch_size", "store_connections"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in (
            "output_stall_seconds",
            "request_seconds",
            "busy_restart_seconds",
            "store_wait_seconds",
            "store_timeout_seconds",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{_flag(name)} must be above 0 seconds, got {value:g}")
        for name in ("grace_seconds", "worker_grace", "qa_batch_wait_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{_flag(name)} must be 0 or more, got {value:g}")
        if self.restarts < 0:
            raise ConfigError(f"restarts must be 0 or more, got {self.restarts}")
        if not 0 < self.max_value_share <= 1:
            raise ConfigError(
                "max-value-share must be above 0 and at most 1 (a share of maxmemory), got "
                f"{self.max_value_share:g}"
            )
        for name in ("requirepass", "admin_password"):
            secret = getattr(self, name)
            if secret is not None and any(ch in secret for ch in "\r\n\0"):
                raise ConfigError(f"the password (--{_flag(name)}) cannot contain line breaks or NUL bytes")
        if self.admin_password == "":
            raise ConfigError("admin-password cannot be empty")
        if self.server not in (None, "valkey", "python"):
            raise ConfigError(f"server must be valkey or python, got {self.server!r}")
        if not 0 < self.default_ttl <= MAX_TTL:
            raise ConfigError(
                f"default-ttl must be between 1 second and {MAX_TTL / 86400:g} days, got "
                f"{self.default_ttl:g}: a value without a TTL would never be evicted by a server that "
                "evicts only keys with one (volatile-lfu), and the module keeps times up to a year"
            )
        if self.handler_errors is not None and self.handler_errors not in ("message", "type"):
            raise ConfigError(f"handler-errors must be message or type, got {self.handler_errors!r}")


def _flag(name: str) -> str:
    return name.replace("_", "-")


#: proto-max-bulk-len's default, as Redis's
DEFAULT_MAX_BULK = 512 * 1024**2

#: The smallest maxmemory keymiss accepts: the server's own structures take about that much.
MIN_MAX_MEMORY = 1024**2

#: The largest sizes keymiss accepts (the server's own parsers stop near 2**63; keymiss's bounds
#: leave room for its arithmetic): maxmemory, and each client's buffers.
MAX_SIZES = {
    "max_memory": 1024**5,
    "max_bulk": 1024**4,
    "max_inline": 1024**4,
    "query_buffer": 1024**4,
    "output_buffer": 1024**4,
    "error_memory": 1024**4,
}
#: The most clients keymiss lets the server take (keymiss's own connections come on top).
MAX_CLIENTS = 1_000_000

#: The longest TTL or timeout the module keeps (its option parser's limit), in seconds.
MAX_TTL = protocol.MAX_MS / 1000

_FIELDS = {f.name: f for f in fields(Settings) if f.name not in ("extra", "keyspaces", "valkey")}


def _coerce(name: str, value: Any) -> Any:
    """``value`` (from a TOML file, an environment variable or a flag) as the setting's type;
    ConfigError, one line naming the setting, for a value of another type (a list, a float where
    a whole number is meant, a size that is not finite)."""
    kind = str(_FIELDS[name].type)
    flag = _flag(name)
    if value is None and "None" in kind:
        return None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower() if isinstance(value, str) else ""
        if low not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
            raise ConfigError(f"{flag} must be a boolean, got {value!r}")
        return low in {"1", "true", "yes", "on"}
    if kind in {"int", "int | None"}:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag} must be an integer, got {value!r}")
    if kind in {"float", "float | None"}:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{flag} must be a number, got {value!r}")
    if kind in {"int | str", "str | None", "int | str | None"} and name in _SIZES:
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{flag} must be a size (e.g. 64MB) or a whole number of bytes, got {value!r}")
    if kind in {"str", "str | None"} and not isinstance(value, str):
        raise ConfigError(f"{flag} must be a string, got {value!r}")
    return value


_SIZES = ("max_memory", "max_bulk", "max_inline", "query_buffer", "output_buffer", "error_memory")


def load_settings(
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Settings from defaults ← TOML file (a ``[keymiss]`` table or top level) ← env ← flags."""
    values: dict[str, Any] = {}
    keyspaces: dict[str, dict[str, Any]] = {}
    valkey: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file!r}: {exc}") from exc
        data = dict(data.get("keymiss", data))
        tables = data.pop("keyspaces", {})
        if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
            raise ConfigError(f'{config_file}: keyspaces must be tables, e.g. [keymiss.keyspaces."hang:*"]')
        for pattern, opts in tables.items():
            try:
                KeyspaceOptions.check(**{k.replace("-", "_"): v for k, v in opts.items()})
            except ConfigError as exc:
                raise ConfigError(f"{config_file}: keyspace {pattern!r}: {exc}") from None
            keyspaces[pattern] = {k.replace("-", "_"): v for k, v in opts.items()}
        valkey = data.pop("valkey", {})
        if not isinstance(valkey, dict) or any(isinstance(v, dict) for v in valkey.values()):
            raise ConfigError(
                f"{config_file}: [keymiss.valkey] holds server settings, e.g. appendonly = true"
            )
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"{config_file}: unknown setting {key!r}")
            values[name] = value
    env = os.environ if environ is None else environ
    for name in _FIELDS:
        raw = env.get("KEYMISS_" + name.upper())
        if raw is not None:
            values[name] = raw
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    settings = Settings(
        **{k: _coerce(k, v) for k, v in values.items()}, keyspaces=keyspaces, valkey=dict(valkey)
    )
    settings.validate()
    return settings


def as_dict(settings: Settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)
