"""The KEYMISS.* protocol between keymiss's server module and its workers, defined once for Python.

Its C twin is ``keymiss/valkey/module/protocol.h``: every ``KM_<NAME>`` constant there is
``<NAME>`` here, and a test parses the header and compares the two, so a limit or a name changed
on one side only fails the suite instead of drifting into a refused registration at run time.

The conversation, per server:

- ``KEYMISS.REGISTER name glob [TTL ms] [ERRTTL ms] [TIMEOUT ms] [QUEUE n] [STALE ms]
  [EARLY beta-thousandths] [VERSION tag] [LABEL name] [VSTALE ms] [SHARE ppm]`` declares a keyspace
  and makes the connection one of its workers (``+OK``). ``SHARE``: a value over this many
  millionths of the server's maxmemory is answered to its readers and never stored.
- ``KEYMISS.TAKE count block-ms lease-ms [LIMIT name n ...]`` blocks up to ``block-ms`` for queued
  keys of the connection's keyspaces and answers a flat array ``[key, token, key, token, ...]``
  (empty when none came); each key is the worker's until ``lease-ms`` pass. ``LIMIT``: at most
  ``n`` keys of the keyspace ``name`` (0: none, and no waking for it), so that a worker whose slots
  a hung keyspace holds still takes the others'. Keyspaces take turns at going first; a queued key
  nobody waits for any more is dropped, not handed over, while its keyspace's queue is full.
- ``KEYMISS.FILL key token value [PX ms] [VERSION tag] [CODEC n] [COST us] [NOSTORE]`` stores the value and
  wakes the key's readers: :data:`FILL_STORED`, :data:`FILL_DISCARDED` (a client wrote the key,
  the lease passed, or the value is of another version), or :data:`FILL_NOT_STORED`: the readers
  got the value, nothing was stored (``NOSTORE``, the value is over the keyspace's ``SHARE``, or
  near ``maxmemory`` it is worth less per byte than what it would displace: INFO's
  ``admission_rejects``, weighing ``COST``, else the time from TAKE).
  ``CODEC``: the codec that wrote the bytes (``keymiss.codecs.Codec``; 0, plain bytes, if absent).
- ``KEYMISS.FAIL key token error-line [MISMATCH | TIMEOUT]``: every reader of the key gets the
  error line (``1``), or nobody waited any more (``0``). The flag says why, for the counters (as
  the Python server counts): a key that does not fit its template (no ``errors``), the function's
  timeout (``timeouts``); without one, the function failed (``errors``). ``computations`` counts
  FILLs: keys the function computed a value for.
- ``KEYMISS.VERSION name tag [label]`` switches a registered keyspace's version; only a connection
  that registered the keyspace may send it. A FILL discarded twice in a row for its version fails
  its readers ("its version changed during the computation twice; retry").
- ``KEYMISS.GET key`` / ``KEYMISS.MGET key ...`` are what a client's GET / MGET of a registered
  keyspace become inside the server; clients never need to send them.
- ``INFO keymiss`` reports :data:`INFO_FIELDS` and, per keyspace, :data:`INFO_KEYSPACE_FIELDS`.

The record format in Redis, one for every writer (the module's FILL, the Python Redis store) and
every reader (the module's version check, the Python Redis store): a value lives under its own key
as the exact bytes a client reads; beside it, in the same hash slot, its companion key
``keymiss:v:{<slot tag>}<key>`` (:func:`companion_key`; the slot tag is the first short base-36
string whose CRC16 lands in the key's slot, so a cluster keeps both in one slot) holds

    ``<codec>:<crc32>:<version>``   e.g. ``2:8d3c1a0f:9f86d081884c7d65``, or ``0:1b2c3d4e:``

``codec`` in decimal; ``crc32`` the value's CRC-32 (zlib's), 8 lowercase hex digits; ``version``
the keyspace's version tag the value was computed under (16 hex digits from keymiss workers and
stores; ``0000000000000000`` for a computed value of an unversioned keyspace), empty for a client's
value (served under every version). It is written, with the value's ``PX``, before the value, for
every value whose codec is not plain bytes or that has a version; a value without one is a client's
plain bytes (in a versioned keyspace the module serves it only once it has marked it ``0:<crc>:``).
The CRC lets a reader that does not see keyspace events recognise a companion that outlived its
value (a plain client rewrote the key): the value then reads as a client's plain bytes. The module
sees client writes as events and never computes the CRC on a hit; its timer rewrites the companion
of a client's write in a versioned keyspace to ``0:<crc>:``, keeping one whose CRC matches (the
Python store wrote both). Earlier releases' records still read as they did: the module's
version-only companion (the version, or ``client``) and the Python store's
``keymiss:codec:<key>`` tag (same fields, another slot), consulted only where no companion is.
"""

from __future__ import annotations

import binascii
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

# --- command names ---------------------------------------------------------------------------------
CMD_GET = "KEYMISS.GET"
CMD_MGET = "KEYMISS.MGET"
CMD_REGISTER = "KEYMISS.REGISTER"
CMD_TAKE = "KEYMISS.TAKE"
CMD_FILL = "KEYMISS.FILL"
CMD_FAIL = "KEYMISS.FAIL"
CMD_VERSION = "KEYMISS.VERSION"
#: what a client connection past ``MAXCLIENTS`` runs instead of each command it sends (the refusal)
CMD_REFUSED = "KEYMISS.REFUSED"
#: ``FORGET pattern`` | ``FORGET TAG tag``: a client's (or operator's) invalidation, run in steps
CMD_FORGET = "KEYMISS.FORGET"

#: every command the module adds
COMMANDS = (
    CMD_GET,
    CMD_MGET,
    CMD_REGISTER,
    CMD_TAKE,
    CMD_FILL,
    CMD_FAIL,
    CMD_VERSION,
    CMD_REFUSED,
    CMD_FORGET,
)
#: the commands only workers may send (clients are denied them by ACL)
WORKER_COMMANDS = (CMD_REGISTER, CMD_TAKE, CMD_FILL, CMD_FAIL, CMD_VERSION)

# --- options -----------------------------------------------------------------------------------------
OPT_TTL = "TTL"
OPT_ERRTTL = "ERRTTL"
OPT_TIMEOUT = "TIMEOUT"
OPT_QUEUE = "QUEUE"
OPT_STALE = "STALE"
OPT_EARLY = "EARLY"
OPT_VERSION = "VERSION"
OPT_LABEL = "LABEL"
OPT_VSTALE = "VSTALE"
OPT_PX = "PX"
OPT_SHARE = "SHARE"
OPT_NOSTORE = "NOSTORE"
OPT_LIMIT = "LIMIT"
OPT_CODEC = "CODEC"
#: REGISTER's tag of a keyspace (repeatable): a template over its key's ``<field>``s, or a fixed
#: label; ``FORGET TAG tag`` forgets the keys carrying it
OPT_TAG = "TAG"
#: FILL's COST us: the microseconds of handler time the value cost (a batch's call divided among
#: its keys), what INFO's mean/p50/p99_compute_seconds are made of on both front ends
OPT_COST = "COST"
#: FAIL's flag for a key that does not fit its keyspace's template: nothing ran, so it counts in
#: neither ``computations`` nor ``errors`` (a timeout, flagged ``TIMEOUT``, counts in ``timeouts``)
OPT_MISMATCH = "MISMATCH"
#: the module's load arguments: ``GRACE ms``, ``KEYSPACE pattern`` (repeatable), ``MAXCLIENTS n``
#: (TCP client connections admitted; keymiss's own come through the unix socket), in any order
OPT_GRACE = "GRACE"
OPT_KEYSPACE = "KEYSPACE"
OPT_MAXCLIENTS = "MAXCLIENTS"

# --- limits ------------------------------------------------------------------------------------------
#: the longest time in milliseconds any option may say (a year)
MAX_MS = 365 * 24 * 3600 * 1000
#: FILL's COST, at most this many microseconds (a day)
MAX_COST_US = 24 * 3600 * 1000000
#: EARLY is XFetch's beta in thousandths, at most this
MAX_EARLY = 1_000_000
#: a keyspace's QUEUE, at most this
MAX_QUEUE = 1_000_000
#: bytes of a version tag or label
MAX_VERSION = 256
#: bytes of a keyspace's name or glob
MAX_GLOB = 512
#: tags one keyspace may declare
MAX_TAGS = 32
#: ``<field>``s of a keyspace's template that its tags may use
MAX_FIELDS = 32
#: keys one TAKE may ask for
MAX_TAKE = 10_000
#: keyspaces one server holds
MAX_KEYSPACES = 64
#: bytes of an error line the module keeps (longer ones are cut)
MAX_ERROR_LEN = 512
#: a keyspace's TIMEOUT when REGISTER does not give one
DEFAULT_TIMEOUT_MS = 65_000
#: a keyspace's QUEUE when REGISTER does not give one
DEFAULT_QUEUE = 10_000
#: SHARE is in millionths of maxmemory: at most this, the whole of it
MAX_SHARE = 1_000_000
#: a keyspace's SHARE when REGISTER does not give one (a tenth of maxmemory)
DEFAULT_SHARE = 100_000
#: how long a miss of a keyspace without a worker waits for one when ``GRACE`` does not say
DEFAULT_GRACE_MS = 5000
#: FILL's replies: stored, discarded, answered to the key's readers but not stored
FILL_STORED = 1
FILL_DISCARDED = 0
FILL_NOT_STORED = 2
#: how often the module's timer runs (expired leases, deadlines, version switches)
TICK_MS = 50
#: FILL's CODEC, at most this
MAX_CODEC = 255
#: what an earlier release's companion held for a client's write (read, no longer written)
CLIENT_MARK = "client"
#: keymiss's own records (contexts, companions, markers) are named under this
OWN_PREFIX = "keymiss:"
#: a value's companion key: this, a short tag in the value's slot, ``}``, the key
COMPANION_PREFIX = "keymiss:v:{"
#: between a companion's fields: ``<codec>:<crc32>:<version>``
RECORD_SEP = ":"
#: what every error line of the module starts with
ERR_PREFIX = "ERR keymiss: "
#: why a tag is refused whose text after a <field> does not start with the text after it in the key
#: (a field's value may hold it, so one tag would name several keys' values)
TAG_AMBIGUOUS = "a tag's <field> must end the tag or be followed by the text that follows it in the key"

# --- INFO keymiss ------------------------------------------------------------------------------------
INFO_SECTION = "keymiss"
#: the section's own fields (``keymiss_<name>`` in INFO)
INFO_FIELDS = (
    "keyspaces",
    "workers",
    "pending",
    "blocked_readers",
    "error_records",
    "refused_clients",
    "admission_rejects",
    "admission_evictions",
    "admission_sketch_bytes",
)
#: the fields of each ``keymiss_keyspace_<n>`` line, in order (``version`` only when versioned): the
#: words the Python server's ``INFO keymiss`` uses for the same counters, in the same units
#: (``keymiss.stats.SHARED_KEYSPACE_FIELDS``); the last ones are :data:`INFO_KEYSPACE_ALIASES`
INFO_KEYSPACE_FIELDS = (
    "pattern",
    "hits",
    "misses",
    "computations",
    "queued",
    "in_flight",
    "fills",
    "errors",
    "timeouts",
    "requeues",
    "discarded_fills",
    "superseded",
    "busy",
    "no_worker",
    "oversized",
    "dropped",
    "workers",
    "version",
    "version_misses",
    "version_discards",
    "version_stale_hits",
    "stale_hits",
    "early_refreshes",
    "refresh_failures",
    "mean_compute_seconds",
    "p50_compute_seconds",
    "p99_compute_seconds",
    "failures",
    "mean_compute_ms",
)
#: an earlier release's names, still shown for one release: ``failures`` (now ``errors``) and
#: ``mean_compute_ms`` (now ``mean_compute_seconds``)
INFO_KEYSPACE_ALIASES = ("failures", "mean_compute_ms")
#: which per-keyspace fields only grow (counters), with what they count; the rest are gauges
INFO_COUNTERS = {
    "hits": "Reads the server answered from memory",
    "misses": "Reads of a missing key",
    "computations": "Keys the keyspace's function computed a value for",
    "fills": "Values workers stored",
    "errors": "Keys whose computation failed (not a timeout, nor a key its template refuses)",
    "timeouts": "Keys whose readers' deadline passed",
    "requeues": "Keys handed to another worker (lease passed, worker gone)",
    "discarded_fills": "Fills discarded (a client wrote the key meanwhile, or too late)",
    "superseded": "Computations a client's write superseded",
    "busy": "Reads refused with -BUSY (queue full)",
    "no_worker": "Reads refused: no worker attached",
    "oversized": "Values answered to their readers but not stored: over the keyspace's share of maxmemory",
    "dropped": "Queued computations dropped: nobody waited for them and the keyspace's queue was full",
    "version_misses": "Stored values not served: computed under another version",
    "version_discards": "Fills discarded: computed under a version no longer served",
    "version_stale_hits": "Hits on the version just replaced, inside its window, while a refresh ran",
    "stale_hits": "Hits served past the TTL, inside the stale window, while a refresh ran",
    "early_refreshes": "Refreshes a hit started before the TTL ran out",
    "refresh_failures": "Background refreshes that failed (the old value kept being served)",
}
INFO_GAUGES = {"queued": "Keys waiting for a worker", "in_flight": "Keys a worker is computing"}


# --- builders --------------------------------------------------------------------------------------
def register(
    name: str,
    glob: str,
    *,
    ttl_ms: int | None = None,
    error_ttl_ms: int | None = None,
    timeout_ms: int | None = None,
    queue: int | None = None,
    stale_ms: int | None = None,
    early: int | None = None,
    version: str | None = None,
    label: str | None = None,
    version_stale_ms: int | None = None,
    share_ppm: int | None = None,
    tags: Sequence[str] = (),
) -> list[Any]:
    """A ``KEYMISS.REGISTER`` command; options left ``None`` are not sent (the module's defaults)."""
    args: list[Any] = [CMD_REGISTER, name, glob]
    for opt, value in (
        (OPT_TTL, ttl_ms),
        (OPT_ERRTTL, error_ttl_ms),
        (OPT_TIMEOUT, timeout_ms),
        (OPT_QUEUE, queue),
        (OPT_STALE, stale_ms),
        (OPT_EARLY, early),
        (OPT_VERSION, version),
        (OPT_LABEL, label),
        (OPT_VSTALE, version_stale_ms),
        (OPT_SHARE, share_ppm),
    ):
        if value is not None:
            args += [opt, value]
    for tag in tags:
        args += [OPT_TAG, tag]
    return args


def forget(pattern: str | None = None, *, tag: str | None = None) -> list[Any]:
    """A ``KEYMISS.FORGET`` command: by glob, or by tag."""
    if (pattern is None) == (tag is None):
        raise ValueError("forget takes a pattern or a tag")
    return [CMD_FORGET, pattern] if tag is None else [CMD_FORGET, OPT_TAG, tag]


def take(count: int, block_ms: int, lease_ms: int, limits: Mapping[str, int] | None = None) -> list[Any]:
    """A ``KEYMISS.TAKE``: up to ``count`` keys, waiting ``block_ms`` for one, each ours ``lease_ms``;
    of each keyspace named in ``limits`` (by its registered name), at most that many."""
    args: list[Any] = [CMD_TAKE, count, block_ms, lease_ms]
    for name, n in (limits or {}).items():
        args += [OPT_LIMIT, name, n]
    return args


def fill(
    key: str | bytes,
    token: int,
    value: bytes | str,
    *,
    px: int | None = None,
    version: str | None = None,
    codec: int = 0,
    store: bool = True,
    cost: float | None = None,
) -> list[Any]:
    """A ``KEYMISS.FILL`` of a taken key (its token from TAKE); ``store=False``: its readers get the
    value, nothing is stored. ``codec`` (not sent when 0) and ``version`` go to the companion;
    ``cost``: the handler seconds the value cost (``Computed.cost``), sent as ``COST`` microseconds."""
    args: list[Any] = [CMD_FILL, key, token, value]
    if px is not None:
        args += [OPT_PX, px]
    if version is not None:
        args += [OPT_VERSION, version]
    if codec:
        args += [OPT_CODEC, codec]
    if cost is not None:  # the handler's seconds, for INFO's compute times
        args += [OPT_COST, min(MAX_COST_US, max(0, round(cost * 1_000_000)))]
    if not store:
        args.append(OPT_NOSTORE)
    return args


def fail(key: str | bytes, token: int, line: str, flag: str | None = None) -> list[Any]:
    """A ``KEYMISS.FAIL``: ``line`` is the whole error line the key's readers get, code first;
    ``flag`` (``OPT_MISMATCH`` or ``OPT_TIMEOUT``) says why, for the keyspace's counters."""
    return [CMD_FAIL, key, token, line] if flag is None else [CMD_FAIL, key, token, line, flag]


def switch_version(name: str, tag: str, label: str | None = None) -> list[Any]:
    """A ``KEYMISS.VERSION``: the registered keyspace ``name`` serves ``tag`` from now on."""
    return [CMD_VERSION, name, tag] if label is None else [CMD_VERSION, name, tag, label]


# --- the record format in Redis ---------------------------------------------------------------------
_SLOTS = 16384
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def key_slot(key: bytes) -> int:
    """Redis Cluster's slot of ``key``: the CRC16 of its ``{hash tag}``, else of the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return binascii.crc_hqx(key, 0) & (_SLOTS - 1)


@functools.cache
def _slot_tags() -> tuple[bytes, ...]:
    """For every slot, the first short base-36 string (least significant digit first, as the
    module counts) whose CRC16 lands in it: the module's table, built the same way (once, ~0.1 s)."""
    tags: list[bytes | None] = [None] * _SLOTS
    left, n = _SLOTS, 0
    while left:
        v, digits = n, []
        while True:
            digits.append(_BASE36[v % 36])
            v //= 36
            if not v or len(digits) == 4:
                break
        tag = "".join(digits).encode()
        slot = binascii.crc_hqx(tag, 0) & (_SLOTS - 1)
        if tags[slot] is None:
            tags[slot] = tag
            left -= 1
        n += 1
    return tuple(t or b"" for t in tags)


def companion_key(key: bytes) -> bytes:
    """``keymiss:v:{<slot tag>}<key>``: where the record of ``key``'s value lives, in its slot."""
    return b"%s%s}%s" % (COMPANION_PREFIX.encode(), _slot_tags()[key_slot(key)], key)


def companion(codec: int, crc: int, version: str | bytes | None) -> bytes:
    """A companion's bytes: ``<codec>:<crc32, 8 hex>:<version>`` (no version: a client's value)."""
    ver = version.encode() if isinstance(version, str) else (version or b"")
    return b"%d:%08x:%s" % (codec, crc & 0xFFFFFFFF, ver)


class Record(NamedTuple):
    """A companion, read: ``crc`` is None for an earlier release's (version-only, no CRC);
    ``version`` is empty for a client's value."""

    codec: int
    crc: int | None
    version: bytes


def parse_companion(raw: bytes) -> Record | None:
    """A companion's fields, or None for bytes that are no companion (read as a client's value)."""
    if RECORD_SEP.encode() not in raw:  # an earlier release's module: the version, or "client"
        return Record(0, None, b"" if raw == CLIENT_MARK.encode() else raw)
    codec, _, rest = raw.partition(b":")
    crc, sep, version = rest.partition(b":")
    if not (sep and codec.isdigit() and len(crc) == 8):
        return None
    try:
        return Record(int(codec), int(crc, 16), version)
    except ValueError:
        return None


# --- replies ---------------------------------------------------------------------------------------
def decode_take(reply: Sequence[Any] | None) -> list[tuple[str, int]]:
    """TAKE's flat ``[key, token, ...]`` as ``(key, token)`` pairs; keys keep undecodable bytes as
    surrogates, so a FILL sends back exactly the key that was taken."""
    if not reply:
        return []
    out = []
    for i in range(0, len(reply) - 1, 2):
        key = reply[i]
        out.append(
            (
                key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else str(key),
                int(reply[i + 1]),
            )
        )
    return out


def label(version: str | None) -> str:
    """A version's name as INFO shows it (the module keeps up to ``MAX_VERSION`` bytes of it)."""
    raw = (version or "").encode("utf-8", "surrogateescape")[:MAX_VERSION]
    return raw.decode("utf-8", "ignore") or "-"


def parse_info_keyspace(line: str) -> dict[str, str]:
    """One ``keymiss_keyspace_<n>`` INFO value (``pattern=...,hits=...``) as a dict. A pattern may
    hold commas, so fields are found by their known names, not by splitting on every comma."""
    out: dict[str, str] = {}
    known = set(INFO_KEYSPACE_FIELDS)
    name: str | None = None
    for part in line.split(","):
        head, eq, value = part.partition("=")
        if eq and head in known and (name is None or head != "pattern"):
            name = head
            out[name] = value
        elif name is not None:
            out[name] += "," + part
    return out
