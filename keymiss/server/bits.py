"""Bit and sequence commands on strings: SETBIT, GETBIT, BITCOUNT, BITPOS (with BYTE/BIT ranges)
and LCS, with Redis 7.0's replies and error texts.

Split from ``edits`` (the read-modify-write string commands) to keep each module small; SETBIT is
an edit like SETRANGE (one step of the store's single writer, the TTL kept), the others read. On a
shared Redis every one of them is relayed, where Redis itself answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from keymiss.server import reply
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
from keymiss.server.edits import MAX_STRING, edit_or_relay, read_or_relay
from keymiss.server.strings import OOM
from keymiss.stores.base import Item

if TYPE_CHECKING:
    from keymiss.server.client import Client

BAD_OFFSET = "ERR bit offset is not an integer or out of range"
BAD_BIT = "ERR bit is not an integer or out of range"


def _bit_offset(raw: bytes) -> int:
    """A bit offset as Redis reads it: an integer, not negative, inside proto-max-bulk-len."""
    offset = to_int(raw, BAD_OFFSET)
    if offset < 0 or (offset >> 3) >= MAX_STRING:
        raise CommandError(BAD_OFFSET)
    return offset


@command(
    "setbit",
    4,
    flags=("write",),
    keys=(1, 1, 1),
    group="bitmap",
    summary="Set or clear one bit of a key's value (zero-padding it); returns the bit it had.",
    arguments=[arg("key", "key"), arg("offset", "integer"), arg("value", "integer")],
)
def cmd_setbit(c: Client, args: list[bytes]) -> Reply:
    offset = _bit_offset(args[2])
    on = to_int(args[3], BAD_BIT)
    if on & ~1:
        raise CommandError(BAD_BIT)
    key = key_of(args[1])
    store = local_store_of(c)
    byte, shift = offset >> 3, 7 - (offset & 7)

    def edit(item: Item | None) -> tuple[bytes | None, int]:
        old = b"" if item is None else item.value
        had = (old[byte] >> shift) & 1 if byte < len(old) else 0
        if item is not None and byte < len(old) and had == on:
            return None, had  # nothing changes: no write
        if store is not None and not store.fits(key, max(len(old), byte + 1)):
            raise CommandError(OOM)
        value = bytearray(old.ljust(byte + 1, b"\0"))
        value[byte] = (value[byte] & ~(1 << shift)) | (on << shift)
        return bytes(value), had

    return edit_or_relay(c, args, key, edit, reply.integer)


@command(
    "getbit",
    3,
    flags=("readonly", "fast"),
    keys=(1, 1, 1),
    group="bitmap",
    summary="One bit of a key's value (0 past its end or for a missing key; nothing is computed).",
    arguments=[arg("key", "key"), arg("offset", "integer")],
)
def cmd_getbit(c: Client, args: list[bytes]) -> Reply:
    offset = _bit_offset(args[2])
    byte, shift = offset >> 3, 7 - (offset & 7)

    def read(item: Item | None) -> bytes:
        value = b"" if item is None else item.value
        return reply.integer((value[byte] >> shift) & 1 if byte < len(value) else 0)

    return read_or_relay(c, args, key_of(args[1]), read)


def _range(
    args: list[bytes], at: int, length: int, end_required: bool
) -> tuple[int, int, int, int, bool, bool]:
    """Redis's range of BITCOUNT/BITPOS from ``args[at:]``: byte ``start``, ``end`` (inclusive),
    the masks of the bits outside a BIT range in its first and last bytes, whether an end was
    given, and whether the range is in bits."""
    start = to_int(args[at])
    end_given = len(args) > at + 1
    if end_required:  # BITCOUNT: the end, and an empty negative range, before the unit
        end = to_int(args[at + 1])
        if start < 0 and end < 0 and start > end:
            return 1, 0, 0, 0, end_given, False
    unit = args[at + 2].lower() if len(args) > at + 2 else b"byte"
    if unit not in (b"byte", b"bit"):
        raise CommandError(SYNTAX)
    isbit = unit == b"bit"
    if not end_required:
        end = to_int(args[at + 1]) if end_given else ((length << 3) + 7 if isbit else length - 1)
    total = length << 3 if isbit else length
    if start < 0:
        start += total
    if end < 0:
        end += total
    start, end = max(start, 0), max(end, 0)
    end = min(end, total - 1)
    first_mask = last_mask = 0
    if isbit and start <= end:
        first_mask = ~((1 << (8 - (start & 7))) - 1) & 0xFF
        last_mask = (1 << (7 - (end & 7))) - 1
        start >>= 3
        end >>= 3
    return start, end, first_mask, last_mask, end_given, isbit


def _popcount(data: bytes) -> int:
    return int.from_bytes(data, "big").bit_count() if data else 0


@command(
    "bitcount",
    -2,
    flags=("readonly",),
    keys=(1, 1, 1),
    group="bitmap",
    summary="Count the set bits of a key's value, or of a range of it in bytes or bits.",
    arguments=[arg("key", "key"), arg("range", "block", optional=True)],
)
def cmd_bitcount(c: Client, args: list[bytes]) -> Reply:
    def read(item: Item | None) -> bytes:
        if item is None:
            return reply.integer(0)  # before the arguments are looked at, as Redis
        value = item.value
        if len(args) in (4, 5):
            start, end, first_mask, last_mask, _, _ = _range(args, 2, len(value), True)
        elif len(args) == 2:
            start, end, first_mask, last_mask = 0, len(value) - 1, 0, 0
        else:
            raise CommandError(SYNTAX)
        if start > end:
            return reply.integer(0)
        count = _popcount(value[start : end + 1])
        count -= _popcount(bytes([value[start] & first_mask, value[end] & last_mask]))
        return reply.integer(count)

    return read_or_relay(c, args, key_of(args[1]), read)


def _first_bit(data: bytes, bit: int) -> int:
    """redisBitpos: the first bit equal to ``bit``; not found: -1 for a 1, the bit after the
    data for a 0."""
    rest = data.lstrip(b"\0" if bit else b"\xff")
    if not rest:
        return -1 if bit else len(data) << 3
    byte = rest[0] if bit else rest[0] ^ 0xFF
    return ((len(data) - len(rest)) << 3) + 8 - byte.bit_length()


@command(
    "bitpos",
    -3,
    flags=("readonly",),
    keys=(1, 1, 1),
    group="bitmap",
    summary="The position of the first set or clear bit of a key's value, or of a range of it.",
    arguments=[arg("key", "key"), arg("bit", "integer"), arg("range", "block", optional=True)],
)
def cmd_bitpos(c: Client, args: list[bytes]) -> Reply:
    bit = to_int(args[2])
    if bit not in (0, 1):
        raise CommandError("ERR The bit argument must be 1 or 0.")

    def read(item: Item | None) -> bytes:
        if item is None:
            return reply.integer(-1 if bit else 0)
        p = item.value
        if len(args) in (4, 5, 6):
            start, end, first_mask, last_mask, end_given, _ = _range(args, 3, len(p), False)
        elif len(args) == 3:
            start, end, first_mask, last_mask, end_given = 0, len(p) - 1, 0, 0, False
        else:
            raise CommandError(SYNTAX)
        if start > end:
            return reply.integer(-1)
        return reply.integer(_bitpos(p, bit, start, end, first_mask, last_mask, end_given))

    return read_or_relay(c, args, key_of(args[1]), read)


def _bitpos(
    p: bytes, bit: int, start: int, end: int, first_mask: int, last_mask: int, end_given: bool
) -> int:
    """Redis's bitposCommand from its range on: the edge bytes masked, then the bytes between."""
    nbytes = end - start + 1
    pos = -1
    done = False
    if first_mask:
        tmp = p[start] & ~first_mask & 0xFF if bit else p[start] | first_mask
        if last_mask and nbytes == 1:
            tmp = tmp & ~last_mask & 0xFF if bit else tmp | last_mask
        pos = _first_bit(bytes([tmp]), bit)
        if nbytes == 1 or (pos not in (-1, 8)):
            done = True
        else:
            start += 1
            nbytes -= 1
    if not done:
        cur = nbytes - (1 if last_mask else 0)
        if cur > 0:
            pos = _first_bit(p[start : start + cur], bit)
            if nbytes == cur or (pos != -1 and pos != cur << 3):
                done = True
            else:
                start += cur
                nbytes -= cur
        if not done:
            tmp = p[end] & ~last_mask & 0xFF if bit else p[end] | last_mask
            pos = _first_bit(bytes([tmp]), bit)
    if end_given and bit == 0 and pos == nbytes << 3:
        return -1
    return pos + (start << 3) if pos != -1 else -1


# --- LCS -----------------------------------------------------------------------------------------------
@command(
    "lcs",
    -3,
    flags=("readonly",),
    keys=(1, 2, 1),
    group="string",
    summary="The longest common subsequence of two keys' values (its length, or the matching ranges).",
    arguments=[
        arg("key1", "key"),
        arg("key2", "key"),
        arg("len", "pure-token", optional=True, token="LEN"),
        arg("idx", "pure-token", optional=True, token="IDX"),
        arg("min-match-len", "integer", optional=True, token="MINMATCHLEN"),
        arg("withmatchlen", "pure-token", optional=True, token="WITHMATCHLEN"),
    ],
)
def cmd_lcs(c: Client, args: list[bytes]) -> Reply:
    if c.shared is not None:
        return c.relay(args)
    getlen = getidx = withlen = False
    minlen = 0
    j = 3
    while j < len(args):
        opt = args[j].lower()
        if opt == b"idx":
            getidx = True
        elif opt == b"len":
            getlen = True
        elif opt == b"withmatchlen":
            withlen = True
        elif opt == b"minmatchlen" and j + 1 < len(args):
            minlen = max(0, to_int(args[j + 1], NOT_INT))
            j += 1
        else:
            raise CommandError(SYNTAX)
        j += 1
    if getlen and getidx:
        raise CommandError("ERR If you want both the length and indexes, please just use IDX.")

    async def later() -> bytes:
        store = c.km.store
        a, b = (await store.get(key_of(args[1]))), (await store.get(key_of(args[2])))
        return _lcs(
            b"" if a is None else a.value,
            b"" if b is None else b.value,
            getlen,
            getidx,
            withlen,
            minlen,
            c.proto,
        )

    return later()


def _lcs(a: bytes, b: bytes, getlen: bool, getidx: bool, withlen: bool, minlen: int, proto: int) -> bytes:
    """Redis's LCS: the dynamic-programming table (bounded as Redis bounds it), then its walk back
    from the end, emitting the matching ranges as Redis does."""
    alen, blen = len(a), len(b)
    if (alen + 1) * (blen + 1) * 4 > MAX_STRING:
        raise CommandError("ERR Insufficient memory, transient memory for LCS exceeds proto-max-bulk-len")
    table = np.zeros((alen + 1, blen + 1), dtype=np.uint32)
    bv = np.frombuffer(b, dtype=np.uint8)
    for i in range(1, alen + 1):  # row i: max(up, diagonal + 1 where equal), then running max (left)
        prev = table[i - 1]
        cand = np.maximum(prev[1:], np.where(bv == a[i - 1], prev[:-1] + 1, 0))
        np.maximum.accumulate(cand, out=table[i, 1:])
    total = int(table[alen, blen])
    result = bytearray(total)
    idx = total
    ranges: list[bytes] = []
    a_start, a_end, b_start, b_end = alen, 0, 0, 0
    compute = getidx or not getlen
    i, j = alen, blen
    while compute and i > 0 and j > 0:
        emit = False
        if a[i - 1] == b[j - 1]:
            result[idx - 1] = a[i - 1]
            if a_start == alen:
                a_start = a_end = i - 1
                b_start = b_end = j - 1
            elif a_start == i and b_start == j:
                a_start -= 1
                b_start -= 1
            else:
                emit = True
            if a_start == 0 or b_start == 0:
                emit = True
            idx, i, j = idx - 1, i - 1, j - 1
        else:
            if table[i - 1, j] > table[i, j - 1]:
                i -= 1
            else:
                j -= 1
            if a_start != alen:
                emit = True
        match_len = a_end - a_start + 1
        if emit:
            if (minlen == 0 or match_len >= minlen) and getidx:
                parts = [
                    reply.array([reply.integer(a_start), reply.integer(a_end)]),
                    reply.array([reply.integer(b_start), reply.integer(b_end)]),
                ]
                if withlen:
                    parts.append(reply.integer(match_len))
                ranges.append(reply.array(parts))
            a_start = alen
    if getidx:
        head = b"%2\r\n" if proto == 3 else b"*4\r\n"
        return head + reply.bulk(b"matches") + reply.array(ranges) + reply.bulk(b"len") + reply.integer(total)
    if getlen:
        return reply.integer(total)
    return reply.bulk(bytes(result))
