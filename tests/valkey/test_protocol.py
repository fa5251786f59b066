"""The module's protocol.h and keymiss/valkey/protocol.py define the same KEYMISS.* protocol.

The header is parsed (``#define KM_<NAME> value``: integer expressions, adjacent string literals,
and ``KM_<NAME>(X)`` lists) and compared with the Python module constant by constant, both ways: a
value, a name or an order changed on one side only fails here.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keymiss.valkey import protocol

HEADER = Path(protocol.__file__).parent / "module" / "protocol.h"

#: Python constants that are not part of what the module speaks (metric descriptions): no C twin
PYTHON_ONLY = {"INFO_COUNTERS", "INFO_GAUGES"}

# --- the header ------------------------------------------------------------------------------------

_TOKENS = re.compile(r'"(?:\\.|[^"\\\n])*"|/\*.*?\*/|//[^\n]*', re.S)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+KM_(\w+)(\(X\))?(.*)$", re.M)
_STRINGS = re.compile(r'\s*(?:"(?:\\.|[^"\\])*"\s*)+')
_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"')
_SUFFIX = re.compile(r"\b(0[xX][0-9a-fA-F]+|\d+)(?:[uU][lL]{0,2}|[lL]{1,2}[uU]?)\b")
_ITEM = re.compile(r"X\(\s*(\w+)\s*\)")
_OPS: dict[type, Callable[..., int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.floordiv,  # C's integer division, for the positive values a limit has
    ast.Mod: operator.mod,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitOr: operator.or_,
    ast.BitAnd: operator.and_,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def _strip_comments(text: str) -> str:
    """Comments out, string literals kept (a literal may hold ``/*`` or ``//``)."""
    return _TOKENS.sub(lambda m: m.group(0) if m.group(0).startswith('"') else " ", text)


def _integer(expr: str, resolve: Callable[[str], Any]) -> int:
    """A C integer constant expression: literals (suffixes dropped), + - * / % << >> | &,
    parentheses, and other KM_ constants."""

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Name) and node.id.startswith("KM_"):
            value = resolve(node.id[3:])
            if type(value) is int:
                return value
        raise ValueError(f"not an integer constant expression: {expr!r}")

    return ev(ast.parse(_SUFFIX.sub(r"\1", expr).strip(), mode="eval"))


def parse_header(text: str) -> dict[str, Any]:
    """Every ``KM_<NAME>`` the header defines, by ``<NAME>``: an int, a str (adjacent literals
    concatenated), or a tuple (an X-macro list; an item naming another constant is its value)."""
    text = _strip_comments(text).replace("\\\n", " ")
    raw: dict[str, tuple[bool, str]] = {}
    for m in _DEFINE.finditer(text):
        name, xmacro, body = m.group(1), m.group(2) is not None, m.group(3).strip()
        if name in raw:
            raise ValueError(f"KM_{name} is defined twice")
        raw[name] = (xmacro, body)
    values: dict[str, Any] = {}

    def resolve(name: str) -> Any:
        if name not in values:
            if name not in raw:
                raise ValueError(f"KM_{name} is not defined in the header")
            xmacro, body = raw[name]
            if xmacro:
                if _ITEM.sub("", body).strip():
                    raise ValueError(f"KM_{name}(X) holds more than X(item) entries: {body!r}")
                items = _ITEM.findall(body)
                values[name] = tuple(resolve(i[3:]) if i.startswith("KM_") else i for i in items)
            elif _STRINGS.fullmatch(body):
                values[name] = "".join(ast.literal_eval(lit) for lit in _LITERAL.findall(body))
            else:
                values[name] = _integer(body, resolve)
        return values[name]

    for name in raw:
        resolve(name)
    return values


# --- the Python module ------------------------------------------------------------------------------


def python_constants() -> dict[str, Any]:
    """protocol.py's module-level constants the header mirrors: str, int and tuple values."""
    out: dict[str, Any] = {}
    for name, value in vars(protocol).items():
        if not name.isupper() or name.startswith("_") or name in PYTHON_ONLY:
            continue
        if isinstance(value, bool) or not isinstance(value, str | int | tuple):
            raise AssertionError(
                f"protocol.{name} is a {type(value).__name__}: mirror it or list it in PYTHON_ONLY"
            )
        out[name] = value
    return out


def _same(c: Any, py: Any) -> bool:
    """Equal values; a command name (one of protocol.COMMANDS) whatever its case: the server
    matches command names in any case, and the module registers them in lowercase."""
    if isinstance(c, tuple) and isinstance(py, tuple):
        return len(c) == len(py) and all(_same(x, y) for x, y in zip(c, py, strict=True))
    if type(c) is not type(py):
        return False
    if isinstance(py, str) and py.upper() in {n.upper() for n in protocol.COMMANDS}:
        return bool(c.upper() == py.upper())
    return bool(c == py)


def differences(c: dict[str, Any], py: dict[str, Any]) -> list[str]:
    """What keeps the two definitions apart, one line each (empty when they agree)."""
    out = [f"protocol.{n} has no KM_{n} in protocol.h" for n in sorted(py.keys() - c.keys())]
    out += [f"KM_{n} in protocol.h has no protocol.{n}" for n in sorted(c.keys() - py.keys())]
    out += [
        f"KM_{n} is {c[n]!r} in protocol.h, protocol.{n} is {py[n]!r}"
        for n in sorted(c.keys() & py.keys())
        if not _same(c[n], py[n])
    ]
    return out


C = parse_header(HEADER.read_text())
PY = python_constants()


# --- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PY))
def test_every_python_constant_has_its_c_twin(name: str) -> None:
    assert name in C, f"protocol.{name} has no KM_{name} in {HEADER}"
    assert _same(C[name], PY[name]), f"KM_{name} = {C[name]!r}, protocol.{name} = {PY[name]!r}"


@pytest.mark.parametrize("name", sorted(C))
def test_every_c_constant_has_its_python_twin(name: str) -> None:
    assert name in PY, f"KM_{name} in {HEADER} has no protocol.{name}"


def test_the_two_agree() -> None:
    assert differences(C, PY) == []
    # what the module's error texts and the tuples' X-macros rest on
    assert C["MAX_MS"] == 365 * 24 * 3600 * 1000
    assert C["INFO_KEYSPACE_FIELDS"] == protocol.INFO_KEYSPACE_FIELDS
    assert len(C) == len(PY)


@pytest.mark.parametrize(
    "change",
    [
        lambda c, py: c.update(MAX_GLOB=c["MAX_GLOB"] + 1),
        lambda c, py: py.update(MAX_GLOB=py["MAX_GLOB"] + 1),
        lambda c, py: c.update(ERR_PREFIX="ERR other: "),
        lambda c, py: py.update(CMD_FILL=py["CMD_FILL"] + "X"),
        lambda c, py: c.update(INFO_FIELDS=c["INFO_FIELDS"][::-1]),
        lambda c, py: py.update(INFO_KEYSPACE_FIELDS=py["INFO_KEYSPACE_FIELDS"][:-1]),
        lambda c, py: c.update(TICK_MS=str(c["TICK_MS"])),
        lambda c, py: c.pop("OPT_PX"),
        lambda c, py: py.pop("DEFAULT_QUEUE"),
        lambda c, py: c.update(NEW_LIMIT=1),
        lambda c, py: py.update(NEW_LIMIT=1),
    ],
)
def test_a_change_on_one_side_only_is_a_difference(
    change: Callable[[dict[str, Any], dict[str, Any]], Any],
) -> None:
    c, py = dict(C), dict(PY)
    change(c, py)
    assert differences(c, py)


def test_a_changed_header_is_a_difference() -> None:
    text = HEADER.read_text()
    for old, new in [("#define KM_MAX_TAKE 10000", "#define KM_MAX_TAKE 10001"), ("X(busy)", "X(bsy)")]:
        assert old in text
        assert differences(parse_header(text.replace(old, new)), PY)


def test_the_parser_reads_what_c_writes() -> None:
    got = parse_header(
        "/* a comment: #define KM_GONE 1 */\n"
        "#define KM_A (365LL * 24 * 3600 * 1000) // a year\n"
        "#define KM_B 0x10ULL\n"
        '#define KM_C "one" "two" /* not "three" */\n'
        '#define KM_D "a/*b*/c//d"\n'
        "#define KM_E (KM_B * 2 + 1u)\n"
        "#define KM_L(X)  \\\n    X(first) \\\n    X(KM_C) X(last)\n"
        "#define OTHER 5\n"
    )
    assert got == {
        "A": 31_536_000_000,
        "B": 16,
        "C": "onetwo",
        "D": "a/*b*/c//d",
        "E": 33,
        "L": ("first", "onetwo", "last"),
    }
    with pytest.raises(ValueError):
        parse_header("#define KM_F sizeof(int)\n")
    with pytest.raises(ValueError):
        parse_header("#define KM_G 1\n#define KM_G 2\n")
