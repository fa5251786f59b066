"""The rest of the string surface: INCR and kin, APPEND, SETRANGE, STRLEN, GETRANGE, KEYS, MEMORY
USAGE, OBJECT ENCODING, with Redis's replies and error texts.

Split from ``strings`` (the commands that compute on a miss): none of these computes. An edit is
one read-modify-write step of the store's single writer (``LocalStore.update``), so concurrent
INCRs never lose an increment and a client's edit wins over a computation that started before it.
On a shared Redis these commands are relayed to it, where Redis itself does the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from keymiss.errors import ReplyError, StoreError
from keymiss.glob import compile_glob
from keymiss.server import reply, resp
from keymiss.server.commands import (
    NOT_INT,
    SYNTAX,
    CommandError,
    Reply,
    arg,
    command,
    key_of,
    local_store_of,
    to_int,
)
from keymiss.server.strings import LLONG_MAX, OOM
from keymiss.stores.base import PINNED_PREFIX, Item

if TYPE_CHECKING:
    from keymiss.server.client import Client

LLONG_MIN = -(2**63)
#: Redis's largest string (proto-max-bulk-len's default), which SETRANGE and APPEND may not pass.
MAX_STRING = 512 * 1024 * 1024
TOO_BIG = "ERR string exceeds maximum allowed size (proto-max-bulk-len)"

Edit = Callable[[Item | None], tuple[bytes | None, Any]]


def edit_or_relay(
    c: Client, args: list[bytes], key: str, edit: Edit, encode: Callable[[Any], bytes]
) -> Reply:
    """Run ``edit`` on the in-process store (inline where writes are synchronous), or relay the
    command to the shared Redis."""
    if c.shared is not None:
        return c.relay(args)
    store = local_store_of(c)
    if store is not None and store.sync_writes:
        return encode(store.update_now(key, edit))

    async def later() -> bytes:
        return encode(await store.update(key, edit))  # type: ignore[union-attr]

    return later()


def read_or_relay(c: Client, args: list[bytes], key: str, read: Callable[[Item | None], bytes]) -> Reply:
    """Answer a read from the in-process store, or relay it to the shared Redis."""
    if c.shared is not None:
        return c.relay(args)

    async def later() -> bytes:
        return read(await c.km.store.get(key))

    store = local_store_of(c)
    return read(store.get_now(key)) if store is not None else later()


# --- INCR and kin --------------------------------------------------------------------------------------
def _as_int(item: Item | None) -> int:
    if item is None:
        return 0
    value = resp.parse_int(item.value) if len(item.value) <= 20 else None
    if value is None:
        raise CommandError(NOT_INT)
    return value


def _incr(c: Client, args: list[bytes], by: int) -> Reply:
    def edit(item: Item | None) -> tuple[bytes, int]:
        new = _as_int(item) + by
        if not LLONG_MIN <= new <= LLONG_MAX:
            raise CommandError("ERR increment or decrement would overflow")
        return b"%d" % new, new

    return edit_or_relay(c, args, key_of(args[1]), edit, reply.integer)


def _counter(name: str, summary: str, with_amount: bool) -> None:
    arguments = [arg("key", "key")] + (
        [arg("increment" if "incr" in name else "decrement", "integer")] if with_amount else []
    )

    @command(
        name,
        3 if with_amount else 2,
        flags=("write", "fast"),
        keys=(1, 1, 1),
        group="string",
        summary=summary,
        arguments=arguments,
    )
    def handler(c: Client, args: list[bytes]) -> Reply:
        if not with_amount:
            return _incr(c, args, 1 if name == "incr" else -1)
        amount = to_int(args[2])
        if name == "decrby":
            if amount == LLONG_MIN:
                raise CommandError("ERR decrement would overflow")
            amount = -amount
        return _incr(c, args, amount)


_counter("incr", "Add 1 to the integer a key holds (0 if missing).", False)
_counter("decr", "Subtract 1 from the integer a key holds (0 if missing).", False)
_counter("incrby", "Add an integer to the integer a key holds.", True)
_counter("decrby", "Subtract an integer from the integer a key holds.", True)


def _long_double(raw: bytes, message: str) -> np.longdouble:
    """A number as Redis's string2ld reads it (strtold: decimal, exponent, hex; no spaces, no
    underscores, no NaN), as a long double, which is what Redis adds in."""
    text = raw.decode("ascii", "replace")
    if not text or len(text) > 5000 or text != text.strip() or "_" in text or "\0" in text:
        raise CommandError(message)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = np.longdouble(text)
    except (ValueError, OverflowError):
        raise CommandError(message) from None
    if np.isnan(value):
        raise CommandError(message)
    return value


def format_long_double(value: np.longdouble) -> str:
    """Redis's human form of a long double (``%.17Lf``, trailing zeros trimmed): 10.5 + 0.1 is
    10.6, and 1e30 prints its exact binary value, as Redis prints it."""
    text = np.format_float_positional(value, precision=17, unique=False, fractional=True, trim="-")
    return "0" if text in ("-0", "-0.") else text


@command(
    "incrbyfloat",
    3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Add a floating-point number to the number a key holds.",
    arguments=[arg("key", "key"), arg("increment", "double")],
)
def cmd_incrbyfloat(c: Client, args: list[bytes]) -> Reply:
    by = _long_double(args[2], "ERR value is not a valid float")

    def edit(item: Item | None) -> tuple[bytes, bytes]:
        current = (
            np.longdouble(0) if item is None else _long_double(item.value, "ERR value is not a valid float")
        )
        with np.errstate(all="ignore"):
            new = current + by
        if not np.isfinite(new):
            raise CommandError("ERR increment would produce NaN or Infinity")
        text = format_long_double(new).encode()
        return text, text

    return edit_or_relay(c, args, key_of(args[1]), edit, reply.bulk)


# --- APPEND, SETRANGE ----------------------------------------------------------------------------------
@command(
    "append",
    3,
    flags=("write", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="Append to a key's value (creating it); returns the new length.",
    arguments=[arg("key", "key"), arg("value")],
)
def cmd_append(c: Client, args: list[bytes]) -> Reply:
    tail = args[2]
    key = key_of(args[1])
    store = local_store_of(c)

    def edit(item: Item | None) -> tuple[bytes, int]:
        old = b"" if item is None else item.value
        if len(old) + len(tail) > MAX_STRING:
            raise CommandError(TOO_BIG)
        if store is not None and not store.fits(key, len(old) + len(tail)):
            raise CommandError(OOM)  # before the string is built, not after
        new = old + tail
        return new, len(new)

    return edit_or_relay(c, args, key, edit, reply.integer)


@command(
    "setrange",
    4,
    flags=("write",),
    keys=(1, 1, 1),
    group="string",
    summary="Overwrite part of a key's value at an offset, zero-padding as needed.",
    arguments=[arg("key", "key"), arg("offset", "integer"), arg("value")],
)
def cmd_setrange(c: Client, args: list[bytes]) -> Reply:
    offset = to_int(args[2])
    if offset < 0:
        raise CommandError("ERR offset is out of range")
    part = args[3]
    key = key_of(args[1])
    store = local_store_of(c)

    def edit(item: Item | None) -> tuple[bytes | None, int]:
        old = b"" if item is None else item.value
        if not part:  # nothing to write: the length as it is, and no key is created
            return None, len(old)
        if offset + len(part) > MAX_STRING:
            raise CommandError(TOO_BIG)
        if store is not None and not store.fits(key, max(len(old), offset + len(part))):
            raise CommandError(OOM)  # before 512 MB of zeros are built for a 10 MB budget
        padded = old.ljust(offset, b"\0")
        new = padded[:offset] + part + padded[offset + len(part) :]
        return new, len(new)

    return edit_or_relay(c, args, key, edit, reply.integer)


# --- reads ---------------------------------------------------------------------------------------------
@command(
    "strlen",
    2,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    group="string",
    summary="The length of a key's value (0 if missing; nothing is computed).",
    arguments=[arg("key", "key")],
)
def cmd_strlen(c: Client, args: list[bytes]) -> Reply:
    return read_or_relay(
        c, args, key_of(args[1]), lambda item: reply.integer(0 if item is None else len(item.value))
    )


def _substr(value: bytes, start: int, end: int) -> bytes:
    """Redis's GETRANGE: negative offsets count from the end; an empty range is empty."""
    n = len(value)
    if start < 0 and end < 0 and start > end:
        return b""
    if start < 0:
        start = max(0, n + start)
    if end < 0:
        end = max(0, n + end)
    end = min(end, n - 1)
    if start > end or n == 0:
        return b""
    return value[start : end + 1]


@command(
    "getrange",
    4,
    flags=("readonly",),
    keys=(1, 1, 1),
    group="string",
    summary="Part of a key's value, by byte offsets (nothing is computed).",
    arguments=[arg("key", "key"), arg("start", "integer"), arg("end", "integer")],
)
def cmd_getrange(c: Client, args: list[bytes]) -> Reply:
    start, end = to_int(args[2]), to_int(args[3])
    return read_or_relay(
        c,
        args,
        key_of(args[1]),
        lambda item: reply.bulk(b"" if item is None else _substr(item.value, start, end)),
    )


command(
    "substr",
    4,
    flags=("readonly",),
    keys=(1, 1, 1),
    group="string",
    summary="GETRANGE's old name.",
    arguments=[arg("key", "key"), arg("start", "integer"), arg("end", "integer")],
)(cmd_getrange)


@command(
    "keys",
    2,
    flags=("readonly",),
    group="generic",
    summary="Every key matching a pattern: O(N) in the number of keys, as in Redis (prefer SCAN).",
    arguments=[arg("pattern", "pattern")],
)
def cmd_keys(c: Client, args: list[bytes]) -> Reply:
    shared = c.shared
    if shared is not None:

        async def relayed() -> bytes:  # keymiss's records (leases, codec tags) left out, as SCAN does
            try:
                keys = await shared.raw(args, 2)
            except (ReplyError, StoreError) as exc:
                return c.error(exc)
            own = PINNED_PREFIX.encode()
            return reply.array(reply.bulk(k) for k in keys or () if not k.startswith(own))

        return relayed()
    pattern = key_of(args[1])
    store = local_store_of(c)
    if store is None:
        raise CommandError("ERR KEYS needs an in-process store")
    matches = compile_glob(pattern)
    keys = [k for k in store.matching_keys("*") if matches(k) and not k.startswith(PINNED_PREFIX)]
    return reply.array(reply.bulk(k.encode("utf-8", "surrogateescape")) for k in keys)


def _encoding(value: bytes) -> str:
    if len(value) <= 20 and resp.parse_int(value) is not None:
        return "int"
    return "embstr" if len(value) <= 44 else "raw"


#: What one key costs beyond its name and value in the in-process stores (entry, policy node).
ENTRY_OVERHEAD = 64


@command(
    "memory",
    -2,
    flags=("readonly",),
    group="server",
    summary="MEMORY USAGE: the bytes a key takes (name, value and bookkeeping).",
    subcommands=("usage", "help"),
)
def cmd_memory(c: Client, args: list[bytes]) -> Reply:
    if c.shared is not None:
        return c.relay(args)
    sub = args[1].lower()
    if sub == b"help":
        if len(args) != 2:
            raise CommandError("ERR wrong number of arguments for 'memory|help' command")
        return reply.array(reply.simple(line) for line in _MEMORY_HELP)
    if sub != b"usage":
        raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try MEMORY HELP.")
    if len(args) < 3:
        raise CommandError("ERR wrong number of arguments for 'memory|usage' command")
    i = 3
    while i < len(args):  # SAMPLES count, as often as given (the last wins), as Redis reads it
        if args[i].lower() != b"samples" or i + 1 >= len(args) or to_int(args[i + 1]) < 0:
            raise CommandError(SYNTAX)
        i += 2
    key = key_of(args[2])
    return read_or_relay(
        c,
        args,
        key,
        lambda item: (
            reply.null(c.proto)
            if item is None
            else reply.integer(len(args[2]) + len(item.value) + ENTRY_OVERHEAD)
        ),
    )


_MEMORY_HELP = (
    "MEMORY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "USAGE <key> [SAMPLES <count>]",
    "    Return memory in bytes used by <key> and its value.",
    "HELP",
    "    Print this help.",
)


@command(
    "object",
    -2,
    flags=("readonly",),
    group="generic",
    summary="OBJECT ENCODING / REFCOUNT / IDLETIME / FREQ of a key.",
    subcommands=("encoding", "refcount", "idletime", "freq", "help"),
)
def cmd_object(c: Client, args: list[bytes]) -> Reply:
    if c.shared is not None:
        return c.relay(args)
    sub = args[1].lower()
    if sub == b"help":
        if len(args) != 2:
            raise CommandError("ERR wrong number of arguments for 'object|help' command")
        return reply.array(reply.simple(line) for line in _OBJECT_HELP)
    if sub not in (b"encoding", b"refcount", b"idletime", b"freq"):
        raise CommandError(f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try OBJECT HELP.")
    if len(args) != 3:
        raise CommandError(f"ERR wrong number of arguments for 'object|{sub.decode()}' command")

    def read(item: Item | None) -> bytes:
        if item is None:
            return reply.null(c.proto)
        if sub == b"encoding":
            return reply.bulk(_encoding(item.value).encode())
        if sub == b"freq":  # Redis's answer where maxmemory-policy is not an LFU one
            raise CommandError(NO_LFU)
        return reply.integer(1 if sub == b"refcount" else 0)

    return read_or_relay(c, args, key_of(args[2]), read)


NO_LFU = (
    "ERR An LFU maxmemory policy is not selected, access frequency not tracked. Please note that when "
    "switching between policies at runtime LRU and LFU data will take some time to adjust."
)

_OBJECT_HELP = (
    "OBJECT <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "ENCODING <key>",
    "    Return the kind of internal representation used in order to store the value",
    "    associated with a <key>.",
    "FREQ <key>",
    "    Return the access frequency index of the <key> (not tracked here: an error, as Redis",
    "    answers without an LFU maxmemory policy).",
    "IDLETIME <key>",
    "    Return the idle time of the <key> (0: not tracked here).",
    "REFCOUNT <key>",
    "    Return the number of references of the value associated with the specified <key>.",
    "HELP",
    "    Print this help.",
)
