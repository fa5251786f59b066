"""Exceptions a caller can act on.

Each carries the keyspace (where there is one) so a server can turn it into a Redis-style
``-ERR`` line that tells the operator which registered function is at fault.
"""

from __future__ import annotations


class KeymissError(Exception):
    """Base of every error keymiss raises on purpose."""


class ConfigError(KeymissError, ValueError):
    """A setting that cannot work (bad size, unknown store URL, bad pattern)."""


class KeyspaceError(KeymissError):
    """Something went wrong inside one keyspace; ``keyspace`` names its pattern."""

    def __init__(self, message: str, *, keyspace: str | None = None) -> None:
        super().__init__(message)
        self.keyspace = keyspace


class KeyMismatchError(KeyspaceError, ValueError):
    """The key starts like a template keyspace but its fields cannot be parsed.

    Raised instead of a silent miss so a client with a typo in a key learns why nothing was computed.
    """


class HandlerError(KeyspaceError):
    """The registered function raised; the original exception is ``__cause__``."""


class ComputeTimeoutError(KeyspaceError, TimeoutError):
    """The registered function did not finish within the keyspace's timeout."""


class BatchResultError(KeyspaceError):
    """A batched function returned a result list whose length differs from its input list."""


class CodecError(KeymissError, ValueError):
    """A value could not be turned into bytes, or stored bytes could not be read back."""


class StoreError(KeymissError):
    """The store could not complete an operation (disk full, connection lost, key too long)."""


class BusyError(KeymissError):
    """Too many computations in flight; the caller should retry later."""


class ReplyError(KeymissError):
    """The backing server answered a passed-through command with an error; ``str(self)`` is its
    whole error line (``CROSSSLOT Keys in request don't hash to the same slot``)."""


def error_line(exc: BaseException) -> str:
    """The error line a client sees for ``exc``, code first, on one line and without RESP
    framing: the Python server frames it as ``-LINE\r\n``, a worker hands it to the module, which
    does the same. What UTF-8 cannot carry (a lone surrogate in a message, the undecodable bytes of
    a key quoted in it) becomes ``?``, so the line always encodes and both front ends say the
    same."""
    if isinstance(exc, ReplyError):  # already a whole error line
        line = str(exc)
    elif isinstance(exc, BusyError):
        line = f"BUSY {exc}"
    elif isinstance(exc, StoreError):
        line = f"ERR store error: {exc}"
    elif isinstance(exc, KeymissError):
        line = f"ERR {exc}"
    else:
        line = f"ERR internal error ({type(exc).__name__}); see the server log"
    clean = line.replace("\r", " ").replace("\n", " ")
    return clean.encode("utf-8", "replace").decode("utf-8")


#: What a store's reply that timed out says of a write in it: keymiss's server reads this as "it
#: may have changed its keys" (a computation of them is then not stored over the client's write).
UNSURE = "a write in it may or may not have been applied"
