"""Cached functions: ``@km.cached("sq:{n}", ttl=60)`` makes a function's calls reads of keys.

The key template names the function's parameters in ``str.format`` fields (``{{``/``}}`` are
literal braces, so ``"user:{{{uid}}}"`` puts the argument in a Redis Cluster hash tag). It becomes
an ordinary template keyspace (``sq:<n>``) whose handler is the function itself, so the function
computes the same value whoever asks: a Python caller of ``sq(12)``, or any Redis client sending
``GET sq:12`` to the Python server or to a module-loaded server whose workers run the app.

**The key is the whole call.** A call builds its key from its arguments (bound with
``inspect.signature``: positional, keyword and defaults give one key) and reads that key; the
function is always called with the arguments parsed back from the key, by the engine, as for a
client's GET. So a Python call and a client's GET are the same computation and share one
single-flight, and two calls that build one key are the same call. For that:

- each field's type comes from the parameter's annotation: ``str`` (or none), ``int``, ``float``
  or ``bool``, each written one canonical way (``str(12)``, ``repr(0.5)``, ``True``). An argument
  of another type is refused (``TypeError``), never turned into a key that parses back to
  something else; a key written another way (``sq:012``, ``sq:+12``) does not fit the keyspace
  (``KeyMismatchError``), so one call has one key and ``forget`` reaches it;
- text is escaped: ``%``, the glob characters ``* ? [ ] \\``, the braces ``{ }`` and the first
  character of the literal text after each field are written ``%XX`` (UTF-8), so
  a hostile argument cannot end its field early and read another call's value (``a:{x}:{y}``
  with ``x="1:2"``), widen a ``forget`` pattern, or move its key into another hash slot. A key a
  client sends with an escape written another way (``%3a``, ``%41``) does not fit either;
- parameters outside the template must have defaults, and a call must leave them at their
  defaults: the very object, or a plain value of the default's own type equal to it (``True`` or
  ``1.0`` for a default ``1`` is another argument: a ``TypeError``, the cached value would be
  another call's); ``*args`` and ``**kwargs`` are refused when the function is decorated;
- a key is at most ``MAX_KEY_BYTES`` (the longest a module-mode server routes), on every front end.

An empty string is an empty field (``sq:``): cached keyspaces accept empty fields, where a
hand-written template refuses them as a typo.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import string
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from keymiss.engine import syncface
from keymiss.errors import CodecError, ConfigError, KeyMismatchError
from keymiss.keyspace import MAX_KEY_BYTES, Keyspace, routable
from keymiss.options import KeyspaceOptions

__all__ = ["CachedKeyspace", "KeyTemplate", "cached"]

#: always escaped in a field's text: the escape itself, glob characters, hash-tag braces
ALWAYS_ESCAPED = frozenset("%*?[]\\{}")

_KINDS = ("str", "int", "float", "bool")
_ARTICLE = {"str": "a str", "int": "an int", "float": "a float", "bool": "a bool"}
_TEMPLATE_FIELD = re.compile(r"<[A-Za-z_][A-Za-z0-9_]*>")


def _kind(annotation: Any) -> str | None:
    """``str``/``int``/``float``/``bool`` for an annotation (a type or its name, as ``from
    __future__ import annotations`` leaves it); ``None`` for a type a key cannot carry."""
    if annotation is inspect.Parameter.empty:
        return "str"
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)
    if annotation in (str, int, float, bool) or (isinstance(annotation, str) and name in _KINDS):
        return name
    return None


def _text(kind: str, value: Any) -> str | None:
    """An argument's canonical text, or ``None`` when it is not of the field's type."""
    if kind == "str":
        return "".join((value,)) if isinstance(value, str) else None
    if kind == "bool":
        return ("True" if value else "False") if isinstance(value, bool) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if kind == "int":
        return str(int(value)) if isinstance(value, int) else None
    try:
        return repr(float(value))
    except OverflowError:  # an int too large for a float
        return None


def _parse(kind: str, text: str) -> Any:
    """A field's value from its (unescaped) text; ``ValueError`` unless the text is canonical."""
    value: Any
    if kind == "str":
        return text
    if kind == "bool":
        value = {"True": True, "False": False}[text] if text in ("True", "False") else None
    elif kind == "int":
        value = int(text)
    else:
        value = float(text)
    if value is None or _text(kind, value) != text:
        raise ValueError(text)
    return value


#: types whose equal values are interchangeable, so an argument equal to the default (and of its
#: very type: ``True == 1 == 1.0``) is the default
_PLAIN = (int, float, complex, str, bytes, type(None))


def _same(value: Any, default: Any) -> bool:
    """Whether an argument outside the key is its parameter's default: the same object, or a
    plain value of the default's own type equal to it (tuples and frozensets element by element).
    Anything else (``mock.ANY``, an array, an object whose ``==`` says yes) is another argument."""
    if value is default:
        return True
    if type(value) is not type(default):
        return False
    if isinstance(default, tuple):
        return len(value) == len(default) and all(map(_same, value, default))
    if isinstance(default, frozenset):
        return bool(value == default) and all(type(v) in _PLAIN for v in value)
    return type(default) in _PLAIN and bool(value == default)


_MAX_INT_BITS = 4 * MAX_KEY_BYTES  # more than 4096 decimal digits: too long for any key


class KeyTemplate:
    """A cached function's key template: builds a call's key, and parses a key back into the
    function's arguments."""

    def __init__(self, template: str, fn: Callable[..., Any]) -> None:
        self.template = template
        name = getattr(fn, "__qualname__", repr(fn))
        try:
            self.signature = inspect.signature(fn)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cached {name}: its signature cannot be read ({exc})") from None
        params = self.signature.parameters
        pieces: list[str] = []  # the keyspace pattern, built piece by piece
        literals: list[str] = []  # the literal text after each field
        self.fields: list[str] = []
        self.kinds: dict[str, str] = {}
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise ConfigError(
                f"cached key {template!r}: {exc} (write a literal brace as {{{{ or }}}})"
            ) from None
        for literal, field, spec, conversion in parsed:
            if _TEMPLATE_FIELD.search(literal):
                raise ConfigError(f"cached key {template!r}: name fields as {{name}}, not <name>")
            pieces.append(literal)
            if self.fields:
                literals.append(literal)
            if field is None:
                continue
            if not field.isidentifier() or spec or conversion:
                raise ConfigError(
                    f"cached key {template!r}: a field is a parameter's name alone ({{{field}}} is not)"
                )
            if field not in params:
                raise ConfigError(f"cached key {template!r}: {name} has no parameter {field!r}")
            kind = _kind(params[field].annotation)
            if kind is None:
                raise ConfigError(
                    f"cached key {template!r}: parameter {field!r} is annotated "
                    f"{params[field].annotation!r}; a key field is str, int, float or bool"
                )
            self.fields.append(field)
            self.kinds[field] = kind
            pieces.append(f"<{field}>")
        if not self.fields:
            raise ConfigError(f"cached key {template!r} names no parameter: every call would share one value")
        for p in params.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"cached {name}: *{p.name} cannot be part of a key; name each parameter")
            if p.name not in self.kinds and p.default is p.empty:
                raise ConfigError(
                    f"cached {name}: parameter {p.name!r} is not in the key {template!r} and has no "
                    "default; every argument that changes the value must be part of the key"
                )
        self.pattern = "".join(pieces)
        # a field that holds no first character of the literal after it cannot hold that literal:
        # the key parses back at the field's own end
        self.escaped = ALWAYS_ESCAPED | {lit[0] for lit in literals if lit}
        self._others = {n: p.default for n, p in params.items() if n not in self.kinds}

    def escape(self, text: str) -> str:
        esc = self.escaped
        if not any(ch in esc for ch in text):
            return text
        return "".join("".join(f"%{b:02X}" for b in ch.encode()) if ch in esc else ch for ch in text)

    def key(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The key of a call with these arguments."""
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        for name, default in self._others.items():
            value = values.get(name, default)
            if not _same(value, default):
                raise TypeError(
                    f"argument {name!r} is not part of the key {self.template!r}: called with "
                    f"{value!r} instead of its default {default!r}, it would read another call's value"
                )
        texts = {}
        for name in self.fields:
            value = values[name]
            if type(value) is int and value.bit_length() > _MAX_INT_BITS:
                raise ValueError(
                    f"argument {name!r} is an int of more digits than a key holds (a cached "
                    f"function's key is at most {MAX_KEY_BYTES} bytes)"
                )
            text = _text(self.kinds[name], value)
            if text is None:
                raise TypeError(
                    f"argument {name!r} is {type(values[name]).__name__} {values[name]!r}; keys of "
                    f"{self.template!r} carry a {self.kinds[name]} there (the function's annotation)"
                )
            try:
                text.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise ValueError(f"argument {name!r} is not UTF-8 text and cannot be part of a key") from None
            texts[name] = self.escape(text)
        key = self.template.format(**texts)
        if not routable(key):
            raise ValueError(
                f"the key of this call of {self.template!r} is longer than {MAX_KEY_BYTES} bytes, the "
                "longest key a cached function builds (the longest a module-mode server routes)"
            )
        return key

    def arguments(self, raw: dict[str, str]) -> dict[str, Any]:
        """The function's arguments from a key's fields (as ``Template.parse`` cut them);
        ``ValueError`` naming the field when one is not written as a call would write it."""
        out = {}
        for name, text in raw.items():
            plain = unquote(text, errors="surrogateescape")
            if self.escape(plain) != text:
                raise ValueError(f"field <{name}> ({text[:80]!r}) is not escaped as keymiss escapes it")
            try:
                out[name] = _parse(self.kinds[name], plain)
            except ValueError:
                kind = _ARTICLE[self.kinds[name]]
                raise ValueError(
                    f"field <{name}> ({plain[:80]!r}) is not {kind} written as a call writes it"
                ) from None
        return out


class CachedKeyspace(Keyspace):
    """The template keyspace of a cached function: a key's fields are unescaped and typed before
    the function gets them, and a key no call would build does not fit (``KeyMismatchError``)."""

    empty_fields = True
    escaped_fields = True

    def __init__(
        self,
        pattern: str,
        handler: Callable[..., Any],
        options: KeyspaceOptions | None = None,
        *,
        key: KeyTemplate,
        **overrides: Any,
    ) -> None:
        super().__init__(pattern, handler, options, **overrides)
        self.key_template = key

    def tuned(self, options: KeyspaceOptions) -> Keyspace:
        ks = CachedKeyspace(self.pattern, self.handler, options, key=self.key_template)
        ks.stats = self.stats
        return ks

    def argument(self, key: str) -> Any:
        fields = super().argument(key)  # a key over MAX_KEY_BYTES never gets here: no keyspace's
        assert self.template is not None
        try:
            raw = dict(zip(self.template.names, fields, strict=True))
            return self.template.fields_type(**self.key_template.arguments(raw))
        except ValueError as exc:
            raise KeyMismatchError(
                f"key {key[:200]!r} does not fit cached keyspace {self.key_template.template!r}: {exc}",
                keyspace=self.pattern,
            ) from None


def _utf8(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


#: a return annotation's name: how a client's bytes are read, and the type they must give
_READS: dict[str, tuple[Callable[[bytes], Any], Any]] = {
    "str": (_utf8, str),
    "int": (json.loads, int),
    "float": (json.loads, (int, float)),
    "bool": (json.loads, bool),
    "dict": (json.loads, dict),
    "list": (json.loads, list),
}


def _client_value_reader(fn: Callable[..., Any]) -> Callable[[Any, str], Any]:
    """What a call returns for what it read: the value itself, except bytes under a function
    annotated ``-> str``/``int``/``float``/``bool``/``dict``/``list``. Such a function's own values are
    stored as text or JSON and read back as such, so bytes are a value a Redis client wrote (``SET
    sq:12 144``): read as the annotation says (``144``), or ``CodecError`` when they do not parse."""
    try:
        ann = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        ann = inspect.Signature.empty
    name = ann if isinstance(ann, str) else getattr(ann, "__name__", "")
    if name not in _READS:
        return lambda value, key: value
    read, want = _READS[name]

    def typed(value: Any, key: str) -> Any:
        if not isinstance(value, bytes):
            return value
        try:
            out = read(value)
        except ValueError:
            out = None
        if name == "float" and type(out) is int:
            out = float(out)
        if not isinstance(out, want) or (name == "int" and isinstance(out, bool)):
            raise CodecError(
                f"the value of {key[:200]!r} is {value[:80]!r}, written by a client, not {name} as the "
                f"function's return annotation says"
            )
        return out

    return typed


def cached(km: Any, template: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """The decorator ``Keymiss.cached`` returns (see there)."""
    opts = KeyspaceOptions.of(**options)
    if opts.batch_size is not None:
        raise ConfigError(
            f"cached key {template!r}: batch_size is for a keyspace function taking a list "
            "(@km.keyspace); a cached function computes one call"
        )

    def decorate(fn: Callable[..., Any]) -> Any:
        keys = KeyTemplate(template, fn)
        ks = km.register(CachedKeyspace(keys.pattern, fn, opts, key=keys))

        def key(*args: Any, **kwargs: Any) -> str:
            return keys.key(args, kwargs)

        async def aforget(*args: Any, **kwargs: Any) -> int:
            k = keys.key(args, kwargs)

            async def drop() -> int:
                km.engine.forget_errors({k})  # a remembered failure goes with the value
                return await km.delete(k)  # type: ignore[no-any-return]

            return await syncface.on_home(km, drop)

        typed = _client_value_reader(fn)

        async def acall(*args: Any, **kwargs: Any) -> Any:
            k = keys.key(args, kwargs)
            return typed(await syncface.on_home(km, km.get, k), k)

        wrapper: Any
        if ks.is_async:

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = keys.key(args, kwargs)
                return typed(await syncface.on_home(km, km.get, k), k)

            forget: Callable[..., Any] = aforget
        else:

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                k = keys.key(args, kwargs)
                return typed(syncface.wait(km, km.get, k), k)

            def forget(*args: Any, **kwargs: Any) -> int:
                k = keys.key(args, kwargs)

                async def drop() -> int:
                    km.engine.forget_errors({k})
                    return await km.delete(k)  # type: ignore[no-any-return]

                return syncface.wait(km, drop)

        forget.__doc__ = "Drop the value of this call (its key), wherever the keymiss's store keeps it."
        wrapper.key = key
        wrapper.forget = forget
        wrapper.acall = acall
        wrapper.aforget = aforget
        wrapper.keyspace = ks
        wrapper.km = km
        return wrapper

    return decorate
