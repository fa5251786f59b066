"""Values ↔ bytes, with no pickle anywhere.

The bytes a codec produces are what a Redis client reading the key sees: UTF-8 text for ``str``, the
JSON document for dicts and lists, the bytes themselves for ``bytes``. A one-byte tag kept beside the
value (never inside it) says which codec wrote it, so ``Keymiss.get`` gives back the same type the
handler returned. Numpy arrays carry a small self-describing header (dtype and shape as JSON) so a
reader in any language can decode them; object arrays are refused because they would need pickle.
"""

from __future__ import annotations

import json
import math
import numbers
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from keymiss.errors import CodecError

try:  # numpy is a core dependency, but keep the import failure readable for slim installs
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]


class Codec(IntEnum):
    """The tag stored beside each value."""

    BYTES = 0
    TEXT = 1
    JSON = 2
    NUMPY = 3


#: the longest time to live a value may ask for (a year: the module front end's limit on any time)
MAX_VALUE_TTL = 365 * 24 * 3600.0
#: the shortest: stores keep times to the millisecond, so a shorter one would mean "gone" on one
#: front end and "one millisecond" on another
MIN_VALUE_TTL = 0.001


@dataclass(frozen=True, slots=True)
class Value:
    """What a handler returns to give one value its own time to live: ``Value(v, ttl=30)`` stores
    ``v`` (encoded like any handler result) for 30 seconds instead of the keyspace's ``ttl`` — a
    price quoted for a minute, a failed lookup kept briefly, a page whose ``max-age`` says how long.
    ``ttl=None`` keeps the keyspace's. Every front end honours it (library, Python server, module
    mode, where the worker's FILL carries it as ``PX``); a keyspace's ``stale`` window is added to
    it as to the keyspace's own TTL. The time is checked here, where the handler builds it, so a
    bad one fails that key's computation with a clear error on every front end alike."""

    value: Any
    ttl: float | None = None

    def __post_init__(self) -> None:
        ttl = self.ttl
        if ttl is None:
            return
        ok = isinstance(ttl, numbers.Real) and not isinstance(ttl, bool)
        seconds = float(ttl) if ok else math.nan
        if not (math.isfinite(seconds) and MIN_VALUE_TTL <= seconds <= MAX_VALUE_TTL):
            raise ValueError(
                f"Value ttl must be seconds from {MIN_VALUE_TTL:g} (a millisecond, the finest time "
                f"a store keeps) to {MAX_VALUE_TTL:.0f} (a year), or None, got {ttl!r}"
            )
        object.__setattr__(self, "ttl", seconds)  # a numpy or Decimal number: a plain float


NUMPY_MAGIC = b"KMNDARR1"
_HLEN = struct.Struct("<H")


def encode(value: Any, codec: Codec | None = None) -> tuple[bytes, Codec]:
    """Encode ``value``; with ``codec=None`` the codec follows the value's type."""
    try:
        if codec is None:
            codec = _codec_for(value)
        if codec is Codec.BYTES:
            if isinstance(value, bytes | bytearray | memoryview):
                return bytes(value), codec
            raise CodecError(f"the bytes codec needs bytes, got {type(value).__name__}")
        if codec is Codec.TEXT:
            if isinstance(value, str):
                return value.encode("utf-8", "surrogateescape"), codec
            raise CodecError(f"the text codec needs str, got {type(value).__name__}")
        if codec is Codec.JSON:
            return json.dumps(
                value, ensure_ascii=False, separators=(",", ":"), allow_nan=False
            ).encode(), codec
        if codec is Codec.NUMPY:
            return _encode_array(value), codec
    except CodecError:
        raise
    except (TypeError, ValueError, UnicodeError) as exc:
        raise CodecError(f"cannot encode {type(value).__name__} value: {exc}") from exc
    raise CodecError(f"unknown codec {codec!r}")  # pragma: no cover


# Plain ints: comparing against enum members costs a descriptor lookup on every hit.
_BYTES, _TEXT, _JSON, _NUMPY = 0, 1, 2, 3


def decode(data: bytes, codec: Codec | int) -> Any:
    """Decode bytes written under ``codec``; any malformed input raises ``CodecError``."""
    try:
        if codec == _TEXT:
            return data.decode("utf-8", "surrogateescape")
        if codec == _BYTES:
            return data
        if codec == _JSON:
            return json.loads(data)
        if codec == _NUMPY:
            return _decode_array(data)
    except CodecError:
        raise
    except (ValueError, TypeError, UnicodeError, KeyError, IndexError, RecursionError, MemoryError) as exc:
        # stored bytes come from anyone who can write the store: a forged header or JSON nested
        # past Python's recursion limit is a value that does not decode, never a crash of the reader
        raise CodecError(f"stored value does not decode as {Codec(codec).name.lower()}: {exc}") from exc
    raise CodecError(f"unknown codec tag {codec!r}")


def codec_from_name(name: str | None) -> Codec | None:
    """``"text"``, ``"json"``, ``"bytes"``, ``"numpy"`` or ``None``/``"auto"`` (follow the value)."""
    if name is None or name == "auto":
        return None
    try:
        return Codec[name.upper()]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; use auto, bytes, text, json or numpy") from None


def _codec_for(value: Any) -> Codec:
    if isinstance(value, str):
        return Codec.TEXT
    if isinstance(value, bytes | bytearray | memoryview):
        return Codec.BYTES
    if np is not None and isinstance(value, np.ndarray):
        return Codec.NUMPY
    if value is None or isinstance(value, dict | list | tuple | int | float | bool):
        return Codec.JSON
    raise CodecError(
        f"cannot store a {type(value).__name__}: return str, bytes, a JSON-able value or a numpy array"
    )


def _encode_array(arr: Any) -> bytes:
    if np is None:  # pragma: no cover
        raise CodecError("numpy is not installed")
    arr = np.asarray(arr)
    if arr.dtype.hasobject:
        raise CodecError("numpy arrays of Python objects cannot be stored (they would need pickle)")
    shape = list(arr.shape)  # before ascontiguousarray, which makes a 0-d array 1-d: a scalar is []
    arr = np.ascontiguousarray(arr)
    header = json.dumps({"dtype": arr.dtype.str, "shape": shape}, separators=(",", ":")).encode()
    body: bytes = arr.tobytes()
    return NUMPY_MAGIC + _HLEN.pack(len(header)) + header + body


def _decode_array(data: bytes) -> Any:
    if np is None:  # pragma: no cover
        raise CodecError("numpy is not installed")
    if not data.startswith(NUMPY_MAGIC) or len(data) < len(NUMPY_MAGIC) + 2:
        raise CodecError("stored value is not a keymiss numpy array")
    start = len(NUMPY_MAGIC) + 2
    (hlen,) = _HLEN.unpack_from(data, len(NUMPY_MAGIC))
    meta = json.loads(data[start : start + hlen])
    dtype = np.dtype(meta["dtype"])
    if dtype.hasobject:
        raise CodecError("refusing an object dtype")
    shape = tuple(int(s) for s in meta["shape"])
    body = memoryview(data)[start + hlen :]
    count = 1
    for s in shape:
        count *= s
    if len(body) != count * dtype.itemsize:
        raise CodecError(f"array body is {len(body)} bytes, header says {count * dtype.itemsize}")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()
