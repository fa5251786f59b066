"""The LMDB store's record format: ``header | [full key] | [version tag] | value``.

The header holds a magic, the codec tag, the expiry, an insertion sequence number (the eviction
order when ``max_disk`` is set) and a CRC32 over the key, the header fields, the version tag of a
computed value and the value: a record that was truncated, copied from another key or written by
something else is detected and read as a miss, never interpreted. Also here: what an LMDB error
means in words a user can act on.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

import lmdb

from keymiss.sizes import format_size
from keymiss.stores.base import (
    Item,
)

HEADER = struct.Struct("<2sBBIqQ")  # magic, codec, flags, crc32, expires_ms (0 = never), seq
FIELDS = struct.Struct("<BBqQ")  # the header fields the checksum covers
KEYLEN = struct.Struct("<I")
SEQ = struct.Struct(">Q")  # big-endian so the order index sorts by insertion
MAGIC = b"KM"
FLAG_LONG_KEY = 1
FLAG_VERSION = 2  # a computed value: its keyspace's 8-byte version tag follows the key
LONG_KEY_PREFIX = b"\x00km#"
DATA_DB = b"keymiss.data"
ORDER_DB = b"keymiss.order"


def explain(exc: BaseException, doing: str, path: str) -> str:
    """What went wrong, in words a user can act on: LMDB reports a damaged meta page as "Cannot
    allocate memory" and a full disk as "Input/output error"."""
    import shutil

    said = f"LMDB said: {exc}"
    damaged = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.VersionMismatchError)
    if isinstance(exc, damaged) or (
        "Cannot allocate memory" in str(exc) and os.path.exists(os.path.join(path, "data.mdb"))
    ):
        return (
            f"{doing}: the store's file looks damaged ({said}); restore it from a copy, or move "
            f"{path} aside to start with an empty cache"
        )
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        free = None
    if isinstance(exc, lmdb.DiskError) or (free is not None and free < 16 * 1024**2):
        room = f"{format_size(free)} free" if free is not None else "no space"
        return (
            f"{doing}: the disk holding {path} is full or failing ({room}; {said}); "
            "free space or set ?max_disk="
        )
    return f"{doing}: {exc}"


def encode_key(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def db_key(kb: bytes, max_key: int) -> bytes:
    """The LMDB key of ``kb``: itself, or a digest when LMDB cannot hold it as a key."""
    if 0 < len(kb) <= max_key and not kb.startswith(LONG_KEY_PREFIX):
        return kb
    return LONG_KEY_PREFIX + hashlib.sha256(kb).digest()


def pack(
    kb: bytes,
    dbk: bytes,
    value: bytes,
    codec: int,
    expires_at: float | None,
    seq: int,
    version: bytes | None = None,
) -> bytes:
    flags = (FLAG_LONG_KEY if dbk is not kb else 0) | (FLAG_VERSION if version is not None else 0)
    exp = 0 if expires_at is None else max(1, round(expires_at * 1000))  # the ms given
    crc = zlib.crc32(FIELDS.pack(codec, flags, exp, seq), zlib.crc32(kb))
    if version is not None:
        crc = zlib.crc32(version, crc)
    crc = zlib.crc32(value, crc)
    head = HEADER.pack(MAGIC, codec, flags, crc, exp, seq)
    parts = [head]
    if flags & FLAG_LONG_KEY:
        parts += [KEYLEN.pack(len(kb)), kb]
    if version is not None:
        parts.append(version)
    parts.append(value)
    return b"".join(parts)


def unpack(kb: bytes | None, raw: bytes) -> tuple[bytes, Item, int] | None:
    """(full key, item, seq) or None when the record is not a valid keymiss record for ``kb``."""
    try:
        magic, codec, flags, crc, exp, seq = HEADER.unpack_from(raw)
    except struct.error:
        return None
    if magic != MAGIC:
        return None
    pos = HEADER.size
    if flags & FLAG_LONG_KEY:
        try:
            (klen,) = KEYLEN.unpack_from(raw, pos)
        except struct.error:
            return None
        stored_key = raw[pos + 4 : pos + 4 + klen]
        pos += 4 + klen
        if kb is not None and stored_key != kb:
            return None
        kb = stored_key
    if kb is None:
        return None
    check = zlib.crc32(FIELDS.pack(codec, flags, exp, seq), zlib.crc32(kb))
    version = None
    if flags & FLAG_VERSION:
        version = raw[pos : pos + 8]
        if len(version) != 8:
            return None
        check = zlib.crc32(version, check)
        pos += 8
    value = raw[pos:]
    if zlib.crc32(value, check) != crc:
        return None
    return kb, Item(value, codec, exp / 1000 if exp else None, version), seq
