"""The Redis store's record format and its wire details: a value beside its companion key
(``keymiss:v:{<slot tag>}<key>`` = ``<codec>:<crc32>:<version>``, the format the module's workers
write too; see ``keymiss.valkey.protocol``), earlier releases' ``keymiss:codec:<key>`` tags, the Lua
guards that delete only what this node wrote, the relay's reply parser, and how redis-py's errors
read to a client."""

from __future__ import annotations

import zlib
from typing import Any

from redis._parsers import _AsyncRESP2Parser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisClusterException, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keymiss.errors import UNSURE, BusyError, KeymissError, ReplyError, StoreError
from keymiss.stores.base import NULL_ARRAY, Item, StatusReply, Write
from keymiss.valkey import protocol

#: an earlier release's tag of a value: read where a value has no companion, never written
CODEC_PREFIX = "keymiss:codec:"
#: what SCAN through keymiss hides: companions and earlier releases' tags
TAGS = (CODEC_PREFIX.encode(), protocol.COMPANION_PREFIX.encode())


def key_bytes(key: str) -> bytes:
    """Keys are binary-safe: surrogate-escaped bytes go back to the bytes a client sent."""
    return key.encode("utf-8", "surrogateescape")


def tag_key(key: str) -> bytes:
    """The companion of ``key``'s value, in its slot (the module's name for it)."""
    return protocol.companion_key(key_bytes(key))


def legacy_key(key: str) -> bytes:
    """Where an earlier release kept ``key``'s codec tag (another slot than the value's)."""
    return key_bytes(CODEC_PREFIX + key)


def px_of(ttl: float | None) -> int | None:
    return None if ttl is None else max(1, int(ttl * 1000))


# Delete a key only while it holds the value given (a tag this node wrote and no one replaced).
DROP_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def tag_value(codec: int, value: bytes, version: bytes | None = None) -> bytes:
    """A companion names the codec and the CRC32 of the bytes it describes, so one that outlived
    its value (the key was rewritten by a plain Redis client) is recognised and ignored. A computed
    value's adds its keyspace's version tag (hex): a client's rewrite, whose companion no longer
    matches, reads as a client's write, which every version serves."""
    return protocol.companion(codec, zlib.crc32(value), None if version is None else version.hex())


def tagged(w: Write) -> bool:
    """Whether a write needs a companion: a codec other than plain bytes, or a version."""
    return bool(w.codec) or w.version is not None


def _version(raw: bytes) -> bytes | None:
    """A record's version as ``Item.version``: None for a client's (empty); the 8-byte tag its
    16 hex digits name; another tag as it is (it matches no version keymiss computes)."""
    if not raw:
        return None
    if len(raw) == 16:
        try:
            return bytes.fromhex(raw.decode("ascii"))
        except ValueError:
            pass
    return raw


def item_of(value: bytes | None, record: bytes | None, legacy: bytes | None = None) -> Item | None:
    """The item a value reads as, given its companion and an earlier release's tag (read only
    where no companion is). A record whose CRC is not the value's is a client's plain bytes."""
    if value is None:
        return None
    if record is None:
        return _legacy_item(value, legacy)
    rec = protocol.parse_companion(record)
    if rec is None or (rec.crc is not None and rec.crc != zlib.crc32(value)):
        return Item(value)
    return Item(value, rec.codec, None, _version(rec.version))


def _legacy_item(value: bytes, tag: bytes | None) -> Item:
    """An earlier release's ``keymiss:codec:`` tag, read as that release read it."""
    codec = 0
    version = None
    if tag:
        head, _, rest = tag.partition(b":")
        crc, _, ver = rest.partition(b":")
        if head.isdigit() and crc == b"%08x" % zlib.crc32(value):
            codec = int(head)
            if len(ver) == 16:
                try:
                    version = bytes.fromhex(ver.decode("ascii"))
                except ValueError:
                    version = None
    return Item(value, codec, None, version)


# Delete a value only while it is the bytes read (compared by SHA1, as Lua has no CRC32).
DEL_IF_SHA = (
    "local v = redis.call('get', KEYS[1]) "
    "if v and redis.sha1hex(v) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


try:  # redis-py ≥ 7: maintenance notifications (a RESP3 feature) are off for the relay's parser
    from redis.maint_notifications import MaintNotificationsConfig

    NO_MAINT: Any = MaintNotificationsConfig(enabled=False)
except ImportError:  # pragma: no cover - older redis-py
    NO_MAINT = None


class RelayParser(_AsyncRESP2Parser):
    """redis-py's RESP2 parser, except that a status reply comes back as ``StatusReply``: a relayed
    ``+OK`` must reach the client as ``+OK``, not as the bulk string ``"OK"`` (redis-cli shows the
    difference, and some clients check for it)."""

    async def _read_response(self, disable_decoding: bool = False) -> Any:
        raw = await self._readline()
        byte, response = raw[:1], raw[1:]
        if byte == b"-":
            text = response.decode("utf-8", errors="replace")
            error = self.parse_error(text)  # type: ignore[no-untyped-call]
            if isinstance(error, RedisConnectionError):
                self._clear()  # type: ignore[no-untyped-call]
                raise error
            # the special classes (MOVED, ASK, …) drive the cluster client; the rest keep their code
            return ResponseError(text) if type(error) is ResponseError else error
        if byte == b"+":
            return StatusReply(response)
        if byte == b":":
            return int(response)
        if byte == b"$" and response == b"-1":
            return None
        if byte == b"*" and response == b"-1":
            return NULL_ARRAY  # LMPOP on an empty list: *-1, not $-1
        if byte == b"$":
            return await self._read(int(response))
        if byte == b"*":
            return [await self._read_response(disable_decoding) for _ in range(int(response))]
        raise InvalidResponse(f"Protocol Error: {raw!r}")


def reply_error(exc: ResponseError) -> ReplyError:
    """Redis's own error line, code included (redis-py strips the code of the errors it knows)."""
    text = str(exc)
    code = getattr(exc, "status_code", None)
    if code and not text.startswith(code):
        text = f"{code} {text}"
    return ReplyError(text if text.split(" ", 1)[0].isupper() else f"ERR {text}")


def relay_error(exc: Exception, reply_timeout: float | None = None) -> KeymissError:
    """What a relayed command's failure is to the client: Redis's own error line, a cluster's
    CROSSSLOT, Redis being slow, or the store being unreachable."""
    if isinstance(exc, ResponseError):
        return reply_error(exc)
    if isinstance(exc, RedisClusterException):
        if "slot" in str(exc).lower():
            return ReplyError("CROSSSLOT Keys in request don't hash to the same slot")
        return ReplyError(f"ERR {exc}")
    return wrap_error(exc, reply_timeout)


def wrap_error(exc: Exception, reply_timeout: float | None = None) -> KeymissError:
    """A failure that is not Redis's own error line. A reply that took longer than the store's
    reply timeout is a slow Redis, not a missing one: BUSY, saying that the command was sent once
    and not again, so a write in it may or may not have been applied."""
    if isinstance(exc, RedisTimeoutError) and reply_timeout is not None:
        return BusyError(
            f"the redis store did not answer within {reply_timeout:g}s (--store-timeout-seconds, "
            f"or the store URL's reply_timeout); the command was sent once and not repeated: {UNSURE}"
        )
    return StoreError(f"redis unavailable: {type(exc).__name__}: {exc}")


def sum_nodes(per_node: Any) -> dict[str, Any]:
    if not isinstance(per_node, dict) or not all(isinstance(v, dict) for v in per_node.values()):
        return per_node if isinstance(per_node, dict) else {}
    total: dict[str, Any] = {}
    for values in per_node.values():
        for k, v in values.items():
            if isinstance(v, int | float):
                total[k] = total.get(k, 0) + v
    return total
