"""Keyspaces: which registered function owns a key, and what that function is given.

Two pattern kinds:

* **glob** (``double:*``) — Redis ``KEYS`` globbing; the function receives the whole key.
* **template** (``bertqa{<tag>}_<context>_<question>``) — ``<name>`` fields. Each field runs up to the
  first occurrence of the literal text after it, and the last field takes the rest, so a question
  may contain ``_`` freely. A key that starts with the template's literal prefix but does not parse
  raises ``KeyMismatchError``: a typo in a key is reported, not silently treated as a miss.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import time
from collections import namedtuple
from collections.abc import Callable
from typing import Any

from keymiss.codecs import Codec, codec_from_name
from keymiss.errors import ConfigError, KeyMismatchError
from keymiss.glob import can_start_with, compile_glob, glob_prefix
from keymiss.options import DEFAULT_TIMEOUT, KeyspaceOptions, utf8_text
from keymiss.stats import KeyspaceStats, printable
from keymiss.stores.base import NO_VERSION
from keymiss.valkey.protocol import MAX_FIELDS, MAX_GLOB, MAX_TAGS, TAG_AMBIGUOUS

_HEX = frozenset("0123456789ABCDEFabcdef")
_FIELD = re.compile(r"<([A-Za-z_][A-Za-z0-9_]*)>")

__all__ = ["DEFAULT_TIMEOUT", "Keyspace", "Registry", "Template"]


_ANNOTATED_CODECS = {"str": Codec.TEXT, "bytes": Codec.BYTES, "ndarray": Codec.NUMPY}
_JSON_TYPES = ("dict", "list", "tuple", "int", "float", "bool")


def _codec_from_annotation(handler: Callable[..., Any], batched: bool) -> Codec | None:
    """The codec a handler's return annotation implies (``-> str`` is text, ``-> dict`` JSON; for a
    batched handler, the element type of ``-> list[...]``), so values read back from a shared store,
    which keeps plain bytes only, decode to the same type on every node."""
    try:
        ann = inspect.signature(handler).return_annotation
    except (TypeError, ValueError):
        return None
    if ann is inspect.Signature.empty:
        return None
    if isinstance(ann, str):
        text = ann
    elif getattr(ann, "__args__", None):  # list[str] and friends: keep the parameters
        text = str(ann)
    else:
        text = getattr(ann, "__name__", None) or str(ann)
    text = text.replace("typing.", "").replace(" ", "")
    if batched:
        m = re.fullmatch(r"(?:list|List|Sequence|tuple)\[(.+?)(?:,\.\.\.)?\]", text)
        if not m:
            return None
        text = m.group(1)
    base = text.split("[", 1)[0].rsplit(".", 1)[-1]
    if base in _ANNOTATED_CODECS:
        return _ANNOTATED_CODECS[base]
    if base in _JSON_TYPES:
        return Codec.JSON
    return None


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


class Template:
    """A compiled ``<field>`` template: literal pieces alternating with field names."""

    def __init__(self, pattern: str, *, empty_fields: bool = False, escaped: bool = False) -> None:
        self.pattern = pattern
        #: whether a field may be empty (a cached function's ``""`` argument); a hand-written
        #: template refuses it, so a key missing a field reads as a typo
        self.empty_fields = empty_fields
        #: whether each ``%`` in a field starts a ``%XX`` escape (a cached function's keys): the
        #: literal after a field is never looked for inside one (``%32`` holds a ``2``)
        self.escaped = escaped
        self.names: list[str] = []
        self.literals: list[str] = []  # literals[i] precedes names[i]; literals[-1] trails
        pos = 0
        for m in _FIELD.finditer(pattern):
            self.literals.append(pattern[pos : m.start()])
            self.names.append(m.group(1))
            pos = m.end()
        self.literals.append(pattern[pos:])
        if not self.names:
            raise ConfigError(f"template {pattern!r} has no <field>")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"template {pattern!r} names a field twice")
        for i, lit in enumerate(self.literals[1:-1], start=1):
            if not lit:
                raise ConfigError(
                    f"template {pattern!r}: fields <{self.names[i - 1]}> and <{self.names[i]}> need "
                    "literal text between them, or the split is ambiguous"
                )
        self.prefix = self.literals[0]
        if not self.prefix:
            raise ConfigError(
                f"template {pattern!r} must begin with literal text: a template claims every key "
                "that starts with its text before the first field, and one with none would claim "
                "every key of every other keyspace"
            )
        self.fields_type = namedtuple("Fields", self.names)  # type: ignore[misc]

    def glob(self) -> str:
        """The Redis glob matching every key of this template (each field a ``*``)."""
        return "*".join(_glob_escape(lit) for lit in self.literals)

    def _find(self, key: str, literal: str, pos: int) -> int:
        if not self.escaped or "%" not in key:
            return key.find(literal, pos)
        while pos < len(key):
            if key.startswith(literal, pos):
                return pos
            hexes = key[pos + 1 : pos + 3]
            pos += 3 if key[pos] == "%" and len(hexes) == 2 and set(hexes) <= _HEX else 1
        return -1

    def parse(self, key: str) -> Any:
        """The key's fields as a named tuple, or ``None`` when the key does not fit the template."""
        if not key.startswith(self.prefix):
            return None
        pos = len(self.prefix)
        values: list[str] = []
        last = len(self.names) - 1
        trailer = self.literals[-1]
        for i in range(len(self.names)):
            if i < last:
                end = self._find(key, self.literals[i + 1], pos)
                if end < 0:
                    return None
                values.append(key[pos:end])
                pos = end + len(self.literals[i + 1])
            else:
                if trailer:
                    if not key.endswith(trailer) or len(key) - len(trailer) < pos:
                        return None
                    values.append(key[pos : len(key) - len(trailer)])
                else:
                    values.append(key[pos:])
        if not self.empty_fields and any(not v for v in values):
            return None
        return self.fields_type(*values)


class Keyspace:
    """One registered function and the settings that govern its computations."""

    #: whether the template's fields may be empty (see ``Template.empty_fields``)
    empty_fields = False
    #: whether the template's fields are ``%XX``-escaped text (see ``Template.escaped``)
    escaped_fields = False

    def __init__(
        self,
        pattern: str,
        handler: Callable[..., Any],
        options: KeyspaceOptions | None = None,
        **overrides: Any,
    ) -> None:
        if not pattern:
            raise ConfigError("a keyspace pattern cannot be empty")
        try:
            opts = KeyspaceOptions.of(options, **overrides)
        except ConfigError as exc:
            raise ConfigError(f"keyspace {pattern!r}: {exc}") from None
        self.pattern = pattern
        self.handler = handler
        self.options = opts
        self.ttl = opts.ttl
        self.batch_size = opts.batch_size
        self.batch_wait = opts.batch_wait
        self.timeout = opts.timeout
        self.error_ttl = opts.error_ttl
        self.early_refresh = opts.early_refresh
        self.stale = opts.stale
        self.version = opts.version
        self._version_seen: tuple[str, bytes] | None = None  # the last version asked, and its tag
        self.version_stale = opts.version_stale
        #: the tag of the version just replaced, and until when (on ``clock``) its values are served
        self._previous: tuple[bytes, float] | None = None
        #: the clock the ``version_stale`` window runs on: the engine that registers the keyspace
        #: gives it its own (``Keymiss(clock=...)``), so the window is testable in virtual time
        self.clock: Callable[[], float] = time.monotonic
        self.codec: Codec | None = codec_from_name(opts.codec) or _codec_from_annotation(
            handler, opts.batch_size is not None
        )
        self.stats = KeyspaceStats()
        self.is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        self.template: Template | None = None
        if _FIELD.search(pattern):
            self.template = Template(pattern, empty_fields=self.empty_fields, escaped=self.escaped_fields)
        self.claims: Callable[[str], bool]
        """Whether this keyspace is responsible for a key (a template claims its whole prefix)."""
        if self.template is not None:
            self.prefix = self.template.prefix
            self.claims = self._claims_prefix
            if opts.batch_size is None:
                self._check_signature()
        else:
            self.prefix = glob_prefix(pattern)
            self.claims = compile_glob(pattern)
        self.tags = opts.tags
        self._tags = [self._tag_template(t) for t in opts.tags]
        if len(self._tags) > MAX_TAGS:
            raise ConfigError(f"keyspace {pattern!r}: at most {MAX_TAGS} tags")

    def _tag_template(self, tag: str) -> Template | None:
        """A declared tag: a template over the key's fields, or ``None`` for a fixed label."""
        if len(tag.encode("utf-8")) > MAX_GLOB:
            raise ConfigError(f"keyspace {self.pattern!r}: tag {tag[:40]!r}... is over {MAX_GLOB} bytes")
        if not _FIELD.search(tag):
            return None
        try:
            tt = Template(tag)
        except ConfigError as exc:
            raise ConfigError(f"keyspace {self.pattern!r}: {exc}") from None
        names = self.template.names if self.template is not None else []
        missing = [n for n in tt.names if n not in names]
        if missing:
            raise ConfigError(
                f"keyspace {self.pattern!r}: tag {tag!r} names <{missing[0]}>, which its pattern "
                f"does not have (its fields: {', '.join(names) or 'none, it is a glob'})"
            )
        if len(names) > MAX_FIELDS:
            raise ConfigError(f"keyspace {self.pattern!r}: a tagged template has at most {MAX_FIELDS} fields")
        assert self.template is not None
        kt = self.template
        # The tag is read back as the key is: a field runs up to the first occurrence of the text
        # after it. Unless that text starts with the text after the same field in the key (which a
        # value never holds), one tag would name several keys' values (u<a>-<b>: a=4-2,b=3 and
        # a=4,b=2-3 both render u4-2-3) and forgetting it would miss some of them.
        for name, after in zip(tt.names[:-1], tt.literals[1:-1], strict=True):
            k = kt.names.index(name)
            in_key = kt.literals[k + 1] if k + 1 < len(kt.names) else None
            if in_key is None or not after.startswith(in_key):
                raise ConfigError(
                    f"keyspace {self.pattern!r}: tag {tag!r}: {TAG_AMBIGUOUS} (<{name}> is followed by "
                    f"{after!r} in the tag, by {in_key or 'the end of the key'!r} in the key)"
                )
        return tt

    def tag_bindings(self, tag: str) -> list[dict[str, str]]:
        """For each declared tag that ``tag`` fits, the key fields it fixes (``{}`` for a label, which
        every key carries). A key carries ``tag`` when it ``carries`` one of them."""
        out: list[dict[str, str]] = []
        for declared, tt in zip(self.tags, self._tags, strict=True):
            if tt is None:
                if declared == tag:
                    out.append({})
                continue
            fields = tt.parse(tag)
            if fields is not None:
                out.append(dict(zip(tt.names, fields, strict=True)))
        return out

    def carries(self, key: str, binding: dict[str, str]) -> bool:
        """Whether ``key`` (routed to this keyspace) has the fields ``binding`` fixes."""
        if not binding:
            return True
        assert self.template is not None
        fields = self.template.parse(key)
        return fields is not None and all(getattr(fields, k) == v for k, v in binding.items())

    def tag_glob(self, binding: dict[str, str]) -> str:
        """A glob over every key that may carry ``binding`` (``carries`` decides)."""
        if self.template is None:
            return self.pattern
        t = self.template
        parts = [_glob_escape(t.literals[0])]
        for name, lit in zip(t.names, t.literals[1:], strict=True):
            parts.append(_glob_escape(binding[name]) if name in binding else "*")
            parts.append(_glob_escape(lit))
        return "".join(parts)

    def own_glob(self) -> str:
        """A glob over every key this keyspace claims."""
        return self.pattern if self.template is None else _glob_escape(self.prefix) + "*"

    def tuned(self, options: KeyspaceOptions) -> Keyspace:
        """The same keyspace (pattern, handler, counters) under other options: what ``tune`` and
        a config file's ``[keyspaces."…"]`` table make of it."""
        ks = type(self)(self.pattern, self.handler, options)
        ks.stats = self.stats
        return ks

    def current_version(self) -> str | None:
        """The version values are computed under now (a callable version is asked each time)."""
        v = self.version
        if v is None or isinstance(v, str):
            return v
        current = v()
        if not utf8_text(current):
            raise ConfigError(f"keyspace {self.pattern!r}: its version callable returned {current!r}")
        return current

    def version_tag(self) -> bytes:
        """The 8 bytes stored beside each computed value: a digest of ``current_version()``, so a
        long version (a model fingerprint) costs no more to keep or compare than a short one."""
        if self.version is None:
            return NO_VERSION
        v = self.current_version()
        seen = self._version_seen
        if seen is not None and seen[0] == v:
            return seen[1]
        assert v is not None
        tag = hashlib.blake2b(v.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        if seen is not None and self.version_stale:  # a switch: the window opens when it is seen
            self._previous = (seen[1], self.clock() + self.version_stale)
        self._version_seen = (v, tag)
        return tag

    def serves(self, item_version: bytes | None) -> bool:
        """Whether a stored value may be served: written by a client (no tag), or computed under
        the current version. An unversioned keyspace serves every value."""
        return item_version is None or self.version is None or item_version == self.version_tag()

    def serves_previous(self, item_version: bytes | None) -> bool:
        """Whether a value ``serves`` refused is of the version just replaced, inside the
        ``version_stale`` window that opened when keymiss first saw the switch."""
        previous = self._previous
        if previous is None or item_version != previous[0]:
            return False
        if self.clock() < previous[1]:
            return True
        self._previous = None
        return False

    def _claims_prefix(self, key: str) -> bool:
        return key.startswith(self.prefix)

    @property
    def kind(self) -> str:
        return "glob" if self.template is None else "template"

    def _check_signature(self) -> None:
        assert self.template is not None
        try:
            sig = inspect.signature(self.handler)
        except (TypeError, ValueError):  # builtins without signatures: trust the user
            return
        try:
            sig.bind(**dict.fromkeys(self.template.names, ""))
        except TypeError as exc:
            raise ConfigError(
                f"keyspace {self.pattern!r}: handler {getattr(self.handler, '__name__', self.handler)!r} "
                f"cannot take the template's fields {self.template.names}: {exc}"
            ) from None

    def argument(self, key: str) -> Any:
        """What the handler receives for ``key``: the key itself, or its parsed fields."""
        if self.template is None:
            return key
        fields = self.template.parse(key)
        if fields is None:
            raise KeyMismatchError(
                f"key {key[:200]!r} does not fit keyspace template {self.pattern!r}",
                keyspace=self.pattern,
            )
        return fields

    def describe(self) -> dict[str, Any]:
        """Settings and counters, as KEYMISS KEYSPACES shows them."""
        return {
            "pattern": self.pattern,
            "kind": self.kind,
            "handler": getattr(self.handler, "__qualname__", repr(self.handler)),
            "async": self.is_async,
            "ttl": self.ttl,
            "batch_size": self.batch_size,
            "batch_wait_ms": self.batch_wait * 1000 if self.batch_size else None,
            "timeout": self.timeout,
            "codec": self.codec.name.lower() if self.codec is not None else "auto",
            "concurrency": self.options.concurrency,
            "error_ttl": self.error_ttl,
            "early_refresh": self.early_refresh,
            "stale": self.stale,
            "version": self._describe_version(),
            "version_stale": self.version_stale,
            "tags": list(self.tags),
            **self.stats.as_dict(),
        }

    def _describe_version(self) -> str | None:
        try:
            return self.current_version()
        except Exception as exc:  # INFO must still answer when an application's callable fails
            return f"<version callable failed: {type(exc).__name__}>"


def _meet(a: Keyspace, b: Keyspace) -> bool:
    """Whether a key could be claimed by both: a template claims every key that starts with its
    literal prefix (one that does not parse is reported as a typo), a glob the keys it matches."""
    if a.template is None and b.template is None:
        return False  # globs may nest: the first registered that matches owns a key
    if a.template is not None and b.template is not None:
        return a.prefix.startswith(b.prefix) or b.prefix.startswith(a.prefix)
    glob, template = (a, b) if a.template is None else (b, a)
    return can_start_with(glob.pattern, template.prefix)


#: The longest key a keyspace owns (UTF-8 bytes): what a module-mode server routes to a worker
#: (``KM_MAX_ROUTED_KEY``); a longer one is no keyspace's on every front end.
MAX_KEY_BYTES = 4096


def routable(key: str) -> bool:
    """Whether ``key`` is short enough for a keyspace to own (cheap for every ordinary key)."""
    return len(key) <= MAX_KEY_BYTES // 4 or len(key.encode("utf-8", "surrogateescape")) <= MAX_KEY_BYTES


class Registry:
    """The keyspaces of one app, in registration order (of globs that both match a key, the first
    registered owns it; a template shares its prefix with no other keyspace)."""

    def __init__(self) -> None:
        self.keyspaces: list[Keyspace] = []
        # (literal prefix, full matcher or None when the prefix decides, keyspace): routing runs on
        # every hit for the per-keyspace counters, so most keys are settled by one startswith.
        self._routes: list[tuple[str, Callable[[str], bool] | None, Keyspace]] = []

    def add(self, ks: Keyspace) -> None:
        if any(k.pattern == ks.pattern for k in self.keyspaces):
            raise ConfigError(f"keyspace {ks.pattern!r} is already registered")
        for other in self.keyspaces:
            if _meet(ks, other):
                prefix = (ks if ks.template is not None else other).prefix
                raise ConfigError(
                    f"keyspace {ks.pattern!r} overlaps keyspace {other.pattern!r}: a template "
                    f"claims every key that starts with its literal prefix ({prefix!r}), "
                    "so one key could belong to both; give each a prefix of its own "
                    "(user:<uid> and user_posts:<uid>, not user:<uid> and user:<uid>:posts)"
                )
        self.keyspaces.append(ks)
        exact = ks.template is not None or ks.pattern == ks.prefix + "*"
        self._routes.append((ks.prefix, None if exact else ks.claims, ks))

    def replace(self, ks: Keyspace) -> None:
        """Put ``ks`` in the place of the registered keyspace with its pattern (new options)."""
        for i, old in enumerate(self.keyspaces):
            if old.pattern == ks.pattern:
                self.keyspaces[i] = ks
                self._routes[i] = (self._routes[i][0], self._routes[i][1], ks)
                return
        raise ConfigError(f"no keyspace {ks.pattern!r} is registered")

    def shown(self) -> str:
        """The patterns, comma-separated, for a log line: a control character in one is written
        ``\\xNN`` (``stats.printable``), so a name cannot send a terminal an escape sequence."""
        return ", ".join(printable(k.pattern) for k in self.keyspaces)

    def get(self, pattern: str) -> Keyspace | None:
        return next((k for k in self.keyspaces if k.pattern == pattern), None)

    def route(self, key: str) -> Keyspace | None:
        """The keyspace that owns ``key``: none for a key over ``MAX_KEY_BYTES`` (the module
        routes no longer key to a worker, so no front end computes one: the read-contract row
        long-key)."""
        if not routable(key):
            return None
        for prefix, matcher, ks in self._routes:
            if key.startswith(prefix) and (matcher is None or matcher(key)):
                return ks
        return None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.keyspaces)

    def __len__(self) -> int:
        return len(self.keyspaces)
