"""What a failed computation leaves behind: a log line for the operator, a small record for clients.

A handler's exception can carry file paths or secrets, so what a client sees is chosen per keyspace
(its type and message, or its type alone), while the log always gets the traceback — once per rate
window per keyspace, so a broken model does not flood the log at request rate.

A failure remembered for ``error_ttl`` is kept as a small record and raised as a fresh exception on
every read: re-raising one exception object would grow its traceback on each raise, without bound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from keymiss.errors import KeymissError, KeyspaceError

log = logging.getLogger("keymiss.handler")

#: Seconds between two logged failures of one keyspace; failures in between are counted.
LOG_WINDOW = 10.0
KEY_SHOWN = 200


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
        return cls(type(exc), str(exc), keyspace, time.monotonic() + ttl)

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
