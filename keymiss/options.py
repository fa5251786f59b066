"""Keyspace options: one dataclass, validated once, shared by every way a keyspace is declared.

``Keymiss.keyspace()``, ``Keymiss.add_keyspace()``, the QA app and the worker all build a
``KeyspaceOptions``; nothing else lists the option names, so a new option is added in one place.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from keymiss.codecs import codec_from_name
from keymiss.errors import CodecError, ConfigError

DEFAULT_TIMEOUT = 60.0

#: What a client sees of a handler's exception: its type and message, or its type alone (the
#: message can carry file paths or secrets). The server log always has the full traceback.
ERROR_DETAILS = ("message", "type")


def default_concurrency() -> int:
    """Threads a sync keyspace may occupy at once, as ``ThreadPoolExecutor`` sizes its pool."""
    return min(32, (os.cpu_count() or 1) + 4)


@dataclass(frozen=True, slots=True)
class KeyspaceOptions:
    """How one keyspace computes, stores and fails.

    ``concurrency`` bounds the handler calls running at once (threads, for a sync handler), so a
    keyspace whose handler hangs exhausts only its own slots. ``queue`` bounds the computations
    waiting for a slot and ``queue_timeout`` how long one may wait: past either, the caller gets
    ``BusyError`` rather than a timeout charged to a handler that never started. ``timeout`` runs
    from the moment the handler starts.
    """

    ttl: float | None = None
    batch_size: int | None = None
    batch_wait_ms: float | None = None
    timeout: float | None = DEFAULT_TIMEOUT
    codec: str | None = None
    error_ttl: float | None = None
    concurrency: int | None = None  # None: default_concurrency() for sync handlers, unbounded for async
    queue: int = 1000
    queue_timeout: float | None = None  # None: the keyspace's timeout
    error_detail: str | None = None  # None: the engine's default ("message")
    #: XFetch's beta: a hit may start one background recomputation before the TTL runs out, more
    #: likely as expiry nears and the slower the keyspace computes (None: off)
    early_refresh: float | None = None
    #: seconds past the TTL an old value is still served while one refresh runs (None: off)
    stale: float | None = None
    #: the model/code version values are computed under: a string, or a cheap zero-argument
    #: callable asked on every check, so an application can switch versions at run time. A value
    #: computed under another version is never served (None: unversioned)
    version: str | Callable[[], str] | None = None
    #: seconds after a version switch that a value computed under the version just replaced is
    #: still served, while one refresh per key recomputes it under the new one — a model rollout
    #: without a latency cliff, asked for explicitly (None: an old version's value is never served)
    version_stale: float | None = None
    #: labels for invalidation (``km.forget_tag``, ``KEYMISS.FORGET TAG``): each a template over the
    #: key's ``<field>``s (``"user:<user>"``: a key carries ``user:42`` when its ``<user>`` is 42)
    #: or a fixed label every key of the keyspace carries
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def number(value: object) -> bool:
            if not isinstance(value, int | float) or isinstance(value, bool):
                return False
            try:
                return math.isfinite(value)
            except OverflowError:  # an int too large for a float: no timer could hold it
                return False

        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def positive(name: str, value: float | None) -> None:
            if value is not None and not (number(value) and value > 0):
                raise ConfigError(f"{name} must be positive seconds or None, got {value!r}")

        positive("ttl", self.ttl)
        positive("timeout", self.timeout)
        positive("error_ttl", self.error_ttl)
        positive("queue_timeout", self.queue_timeout)
        positive("early_refresh", self.early_refresh)
        positive("stale", self.stale)
        if self.stale is not None and self.ttl is None:
            raise ConfigError("stale needs a ttl: a value without one never goes stale")
        positive("version_stale", self.version_stale)
        if self.version_stale is not None and self.version is None:
            raise ConfigError("version_stale needs a version: an unversioned keyspace never switches")
        if self.batch_size is not None and not (integer(self.batch_size) and self.batch_size >= 1):
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.batch_wait_ms is not None:
            if self.batch_size is None:
                raise ConfigError("batch_wait_ms needs batch_size")
            if not (number(self.batch_wait_ms) and self.batch_wait_ms >= 0):
                raise ConfigError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms!r}")
        if self.concurrency is not None and not (integer(self.concurrency) and self.concurrency >= 1):
            raise ConfigError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        if not (integer(self.queue) and self.queue >= 0):
            raise ConfigError(f"queue must be an integer >= 0, got {self.queue!r}")
        if self.codec is not None and not isinstance(self.codec, str):
            raise ConfigError(f"codec must be a name (auto, bytes, text, json, numpy), got {self.codec!r}")
        if self.error_detail is not None and self.error_detail not in ERROR_DETAILS:
            raise ConfigError(
                f"error_detail must be one of {', '.join(ERROR_DETAILS)}, got {self.error_detail!r}"
            )
        if self.version is not None and not callable(self.version) and not utf8_text(self.version):
            raise ConfigError(
                f"version must be a non-empty UTF-8 string or a zero-argument callable, got {self.version!r}"
            )
        try:
            codec_from_name(self.codec)
        except CodecError as exc:
            raise ConfigError(str(exc)) from None
        if not isinstance(self.tags, list | tuple) or not all(utf8_text(t) for t in self.tags):
            raise ConfigError(f"tags must be a list of non-empty strings, got {self.tags!r}")
        object.__setattr__(self, "tags", tuple(self.tags))  # frozen: a list given becomes a tuple

    @classmethod
    def of(cls, options: KeyspaceOptions | None = None, **overrides: Any) -> KeyspaceOptions:
        """Options from keyword arguments (unknown names are a ``ConfigError``, not a ``TypeError``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown keyspace option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        base = options or cls()
        return dataclasses.replace(base, **overrides) if overrides else base

    @classmethod
    def check(cls, **overrides: Any) -> None:
        """Validate overrides on their own (names and values), as a config file gives them: the
        rules between options (batch_wait_ms needs batch_size) wait for the keyspace they tune."""
        if "batch_wait_ms" in overrides and "batch_size" not in overrides:
            overrides = {**overrides, "batch_size": 1}
        cls.of(**overrides)

    @property
    def batch_wait(self) -> float:
        """Seconds a batch waits to fill."""
        return (5.0 if self.batch_wait_ms is None else self.batch_wait_ms) / 1000.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def utf8_text(value: object) -> bool:
    """A non-empty string that encodes as UTF-8: a version is stored and sent as its bytes, so a
    lone surrogate must be refused where it is given, not fail every read later."""
    if not isinstance(value, str) or not value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
