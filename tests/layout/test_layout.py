"""The package's shape as tests: layers without circles, no private names across modules, small
files. Read from the source, so a new module is held to them the moment it exists."""

from __future__ import annotations

import ast
import re

from tests.layout.graph import PACKAGE, circles, graph, modules, private_uses

#: low to high: a module imports its own layer and the ones below, never one above
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "base",
        (
            "keymiss.errors",
            "keymiss.glob",
            "keymiss.sizes",
            "keymiss.stats",
            "keymiss.logs",
            "keymiss.version",
            "keymiss.codecs",
            "keymiss.options",
            "keymiss.config",
            # the KEYMISS protocol: constants and builders that import nothing, the contract
            # between the module front end and the settings that must fit its limits
            "keymiss.valkey.protocol",
        ),
    ),
    ("stores", ("keymiss.stores",)),
    ("engine", ("keymiss.keyspace", "keymiss.engine")),
    ("apps", ("keymiss.apps", "keymiss.qa", "keymiss.api", "keymiss.examples", "keymiss")),
    ("runtime", ("keymiss.runtime",)),
    ("front ends", ("keymiss.server", "keymiss.valkey")),
    ("entry points", ("keymiss.launch", "keymiss.cli", "keymiss.__main__")),
]

#: front ends stand side by side: neither imports the other
SIBLINGS = ("keymiss.server", "keymiss.valkey")

#: private names of other code a module may use, each with the reason it may
ALLOWED_PRIVATE = {
    # redis-py exposes no public RESP parser to subclass; the relay needs status replies kept as
    # such (+OK), so it extends redis-py's own parser and its reading primitives
    ("keymiss/stores/redisrecord.py", "redis._parsers._AsyncRESP2Parser"),
    ("keymiss/stores/redisrecord.py", "self._readline"),
    ("keymiss/stores/redisrecord.py", "self._clear"),
    ("keymiss/stores/redisrecord.py", "self._read"),
    # documented public API with a leading underscore: namedtuple's _asdict, os._exit
    ("keymiss/engine/compute.py", "payload._asdict"),
    ("keymiss/runtime/loop.py", "os._exit"),
    ("keymiss/valkey/embedded.py", "os._exit"),
}


def _prefix_match(name: str, prefix: str) -> bool:
    return name == prefix or (prefix != "keymiss" and name.startswith(prefix + "."))


def layer_of(name: str) -> int:
    """The layer of a module: the longest prefix that names it wins (``keymiss`` itself is the
    package's public face, in the apps layer)."""
    best, depth = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _prefix_match(name, prefix) and len(prefix) > depth:
                best, depth = i, len(prefix)
    assert best >= 0, f"{name} belongs to no layer: add it to LAYERS"
    return best


def sibling_of(name: str) -> str | None:
    return next((s for s in SIBLINGS if _prefix_match(name, s)), None)


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_the_import_graph_has_no_circles() -> None:
    assert circles(graph()) == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = [
        f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
        for a, targets in graph().items()
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert upward == []


def test_the_front_ends_never_import_each_other() -> None:
    crossing = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in sorted(targets)
        if sibling_of(a) and sibling_of(b) and sibling_of(a) != sibling_of(b)
    ]
    assert crossing == []


def test_the_engine_imports_no_front_end_and_no_app() -> None:
    engine = layer_of("keymiss.engine")
    bad = [
        f"{a} imports {b}"
        for a, t in graph().items()
        if layer_of(a) <= engine
        for b in t
        if layer_of(b) > engine
    ]
    assert bad == []


def test_no_module_uses_another_modules_private_names() -> None:
    found = []
    for path in modules().values():
        rel = str(path.relative_to(PACKAGE.parent))
        found += [
            f"{rel}:{line}: {what}" for line, what in private_uses(path) if (rel, what) not in ALLOWED_PRIVATE
        ]
    assert found == []


def test_no_python_module_over_500_lines_and_no_c_file_over_600() -> None:
    long = [
        f"{p.relative_to(PACKAGE.parent)}: {n}"
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > 500
    ]
    long += [
        f"{p.relative_to(PACKAGE.parent)}: {n}"
        for p in sorted(PACKAGE.rglob("*.[ch]"))
        if (n := len(p.read_text().splitlines())) > 600
    ]
    assert long == []


def test_the_checks_catch_what_they_are_for() -> None:
    """The graph reader sees a lazy import inside a function and one under TYPE_CHECKING, and the
    private-name reader sees ``other._x``; without this, the tests above could pass on a reader
    that sees nothing."""
    src = (PACKAGE / "engine" / "cache.py").read_text()
    assert re.search(r"^from keymiss\.", src, re.M)
    edges = graph()
    assert "keymiss.engine.compute" in edges["keymiss.engine.cache"]
    assert "keymiss.engine.cache" in edges["keymiss.runtime.apps"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert layer_of("keymiss") == layer_of("keymiss.api") > layer_of("keymiss.engine.cache")
    assert layer_of("keymiss.server.app") > layer_of("keymiss.runtime.loop")


def test_the_private_name_reader_flags_a_foreign_private(tmp_path) -> None:  # type: ignore[no-untyped-def]
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from x import _hidden\n"
        "class A:\n    __slots__ = ('_slot',)\n    def __init__(self):\n        self._mine = 1\n"
        "    def f(self, other):\n        return self._mine, self._slot, other._theirs, other.__class__,"
        " getattr(other, '_secret'), '_quoted'\n"
    )
    assert sorted(what for _, what in private_uses(probe)) == [
        "getattr(other, '_secret')",
        "other._theirs",
        "x._hidden",
    ]


def test_the_worker_does_not_load_the_python_server() -> None:
    """``keymiss worker`` needs an app and the module's protocol, not the RESP server's commands."""
    import subprocess
    import sys

    code = (
        "import sys, keymiss.cli, keymiss.runtime.apps, keymiss.runtime.loop, keymiss.valkey.worker;"
        "print(sorted(m for m in sys.modules if m.startswith('keymiss.server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_the_keymiss_commands_are_spelled_only_in_the_protocol_module() -> None:
    """Command names live in ``keymiss/valkey/protocol.py``; everything else (code, tests, bench
    scripts, docstrings; upper or lower case) builds them from it, so a renamed command is one edit."""
    names = "get|mget|register|take|fill|fail|version"
    command = re.compile(rf"\b(KEYMISS\.({names.upper()})|keymiss\.({names}))\b")  # not Keymiss.get
    root = PACKAGE.parent
    protocol_module = PACKAGE / "valkey" / "protocol.py"
    found = []
    for folder in ("keymiss", "tests", "bench"):
        for path in sorted((root / folder).rglob("*.py")):
            if path == protocol_module:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                text = node.value
                for m in command.finditer(text):
                    if m.group(0) == "keymiss.version" and text.strip() in ("keymiss.version",):
                        continue  # the module of that name, in the layer table
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {m.group(0)}")
    assert found == []
