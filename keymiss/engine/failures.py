"""What a failed computation leaves behind: a log line for the operator, a small record for clients.

A handler's exception can carry file paths or secrets, so what a client sees is chosen per keyspace
(its type and message, or its type alone), while the log always gets the traceback — once per rate
window per keyspace, so a broken model does not flood the log at request rate.

A failure remembered for ``error_ttl`` is kept as a small record and raised as a fresh exception on
every read: re-raising one exception object would grow its traceback on each raise, without bound.
Records are bounded in bytes, not only in number: a flood of failing 64 KB keys whose messages quote
them would otherwise hold gigabytes outside any memory budget. A record keeps its message cut to
``MESSAGE_KEPT`` characters and a long key only by its digest.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from keymiss.errors import KeymissError, KeyspaceError

log = logging.getLogger("keymiss.handler")

#: Seconds between two logged failures of one keyspace; failures in between are counted.
LOG_WINDOW = 10.0
KEY_SHOWN = 200
#: A remembered error's message is kept to this many characters; a key longer than ``KEY_KEPT``
#: is remembered by its SHA-256 digest.
MESSAGE_KEPT = 512
KEY_KEPT = 128
#: What one record costs beyond its key and message: the dict slot, the record and its strings.
RECORD_OVERHEAD = 240
#: Remembered errors kept at most, over all keyspaces, by number and by bytes.
MAX_REMEMBERED = 100_000
DEFAULT_ERROR_MEMORY = 16 * 1024**2


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """An error's class and text, without its traceback or cause."""

    kind: type[KeymissError]
    message: str
    keyspace: str | None
    expires_at: float

    @classmethod
    def of(cls, exc: KeymissError, ttl: float) -> ErrorRecord:
        keyspace = exc.keyspace if isinstance(exc, KeyspaceError) else None
        message = str(exc)
        if len(message) > MESSAGE_KEPT:
            message = message[: MESSAGE_KEPT - 1] + "…"
        return cls(type(exc), message, keyspace, time.monotonic() + ttl)

    @property
    def size(self) -> int:
        """Bytes this record holds, roughly: its message and its fixed overhead."""
        return len(self.message) + RECORD_OVERHEAD

    def fresh(self) -> KeymissError:
        """A new exception equal to the remembered one."""
        if issubclass(self.kind, KeyspaceError):
            return self.kind(self.message, keyspace=self.keyspace)
        return self.kind(self.message)


def client_text(exc: BaseException, detail: str) -> str:
    """The part of a handler's exception a client may see."""
    if detail == "type":
        return f"{type(exc).__name__} (details in the server log)"
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ itself raises: its type is all that is known
        text = "(its message could not be read)"
    return f"{type(exc).__name__}: {text}"


class FailureLog:
    """Logs one keyspace's handler failures and timeouts, at most one line per window."""

    def __init__(self, keyspace: str, window: float = LOG_WINDOW) -> None:
        self.keyspace = keyspace
        self.window = window
        self._last = float("-inf")
        self.suppressed = 0

    def failed(
        self, what: str, keys: list[str], exc: BaseException | None, level: int = logging.ERROR
    ) -> None:
        """Record a failure of ``keys``; log it with its traceback unless one was logged recently."""
        now = time.monotonic()
        if now - self._last < self.window:
            self.suppressed += 1
            return
        self._last = now
        more = f" (+{len(keys) - 1} more keys in the batch)" if len(keys) > 1 else ""
        since = (
            f"; {self.suppressed} similar failure(s) not logged in the last {self.window:g}s"
            if self.suppressed
            else ""
        )
        self.suppressed = 0
        key = keys[0] if keys else ""
        log.log(
            level,
            "keyspace %r: %s for key %r%s%s",
            self.keyspace,
            what,
            key[:KEY_SHOWN] + ("…" if len(key) > KEY_SHOWN else ""),
            more,
            since,
            exc_info=exc if exc is not None and exc.__traceback__ is not None else None,
        )


def _slot(key: str) -> str | bytes:
    """Where ``key``'s record is filed: the key itself, or the digest of a long one (bytes, so it
    can never be mistaken for a short key's name)."""
    if len(key) <= KEY_KEPT:
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class RememberedErrors:
    """Failures kept for their keyspace's ``error_ttl``, oldest first, within ``max_bytes`` and
    ``max_count``: past either, the oldest records go (a flood of failing keys only shortens how
    long each is remembered)."""

    def __init__(self, max_bytes: int = DEFAULT_ERROR_MEMORY, max_count: int = MAX_REMEMBERED) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.bytes = 0
        self._records: dict[str | bytes, ErrorRecord] = {}  # insertion order: the oldest first

    def __len__(self) -> int:
        return len(self._records)

    @staticmethod
    def _cost(slot: str | bytes, record: ErrorRecord) -> int:
        return len(slot) + record.size

    def get(self, key: str, now: float) -> ErrorRecord | None:
        """``key``'s record while it lasts; an expired one is dropped."""
        slot = _slot(key)
        record = self._records.get(slot)
        if record is not None and record.expires_at <= now:
            self._drop(slot)
            return None
        return record

    def put(self, key: str, record: ErrorRecord) -> None:
        slot = _slot(key)
        self._drop(slot)
        self._records[slot] = record
        self.bytes += self._cost(slot, record)
        now = time.monotonic()
        records = self._records
        while records:  # expired or over a bound, oldest first
            oldest = next(iter(records))
            over = self.bytes > self.max_bytes or len(records) > self.max_count
            if not over and records[oldest].expires_at > now:
                break
            self._drop(oldest)

    def _drop(self, slot: str | bytes) -> None:
        record = self._records.pop(slot, None)
        if record is not None:
            self.bytes -= self._cost(slot, record)

    def sweep(self, now: float) -> int:
        """Drop expired records; how many went."""
        expired = [s for s, r in self._records.items() if r.expires_at <= now]
        for slot in expired:
            self._drop(slot)
        return len(expired)

    def forget(self, keys: set[str]) -> None:
        """Drop the records of these keys (their values were forgotten)."""
        for slot in {_slot(k) for k in keys}:
            self._drop(slot)

    def forget_matching(self, matches: Callable[[str], bool]) -> None:
        """Drop the records of the keys that ``matches`` (a forget by glob or tag). A key kept by
        its digest (longer than ``KEY_KEPT``) cannot be matched: its record lasts its error_ttl."""
        for slot in [s for s in self._records if isinstance(s, str) and matches(s)]:
            self._drop(slot)
