"""``km.forget`` and ``km.forget_tag`` in library mode: which keys a tag selects (exactly those
whose fields it names), what is refused, what a forget leaves alone, and the tags a keyspace may
declare. The same rules run on every front end in tests/contract (the ``forget`` row) and in the
module in tests/valkey/test_forget.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keymiss import Keymiss
from keymiss.errors import ConfigError, KeymissError


def doc_keyspace(km: Keymiss, calls: list[str]) -> None:
    @km.keyspace("doc:<a>:<b>", tags=["a:<a>", "b=<b>", "pair:<a>:<b>", "docs"])
    async def doc(a: str, b: str) -> str:
        calls.append(f"{a}|{b}")
        return f"{a}|{b}"


async def test_a_tag_selects_exactly_the_keys_whose_fields_it_names(km: Keymiss) -> None:
    calls: list[str] = []
    doc_keyspace(km, calls)
    # <a> runs up to the first ":", so "doc:x:y:z" is a=x, b=y:z
    for key in ("doc:x:1", "doc:x:y:z", "doc:xx:1", "doc:y:1"):
        await km.get(key)
    assert await km.forget_tag("a:x:y") == 0  # no key has a == "x:y", though "doc:x:y:*" matches one
    assert await km.forget_tag("b=y:z") == 1
    assert await km.exists("doc:x:y:z") == 0
    assert await km.forget_tag("pair:x:1") == 1
    assert await km.exists("doc:x:1", "doc:xx:1", "doc:y:1") == 2
    assert await km.forget_tag("docs") == 2
    assert await km.get("doc:x:1") == "x|1"
    assert calls.count("x|1") == 2  # forgotten, so computed again


async def test_forget_touches_only_keys_a_keyspace_owns(km: Keymiss) -> None:
    doc_keyspace(km, [])
    await km.get("doc:x:1")
    await km.set("docs-of-mine", "kept")
    await km.set("keymiss:ctx:c", "a context")
    assert await km.forget("doc*") == 1
    assert await km.get("docs-of-mine") == "kept"
    with pytest.raises(KeymissError, match="no keyspace's keys match that pattern"):
        await km.forget("mine:*")
    with pytest.raises(KeymissError, match="no keyspace declares that tag"):
        await km.forget_tag("nobody")
    assert await km.forget("keymiss:ctx:*") == 1  # keymiss's own records, by name


async def test_forget_drops_a_remembered_error(km: Keymiss) -> None:
    runs = []

    @km.keyspace("flaky:*", error_ttl=60, tags=["flaky"])
    async def flaky(key: str) -> str:
        runs.append(key)
        if len(runs) == 1:
            raise ValueError("not yet")
        return "ok"

    with pytest.raises(KeymissError):
        await km.get("flaky:1")
    with pytest.raises(KeymissError):
        await km.get("flaky:1")  # remembered: not run again
    assert len(runs) == 1
    assert await km.forget_tag("flaky") == 0  # nothing stored, but the error is forgotten
    assert await km.get("flaky:1") == "ok"


@pytest.mark.parametrize(
    ("pattern", "tags", "error"),
    [
        ("doc:<a>:<b>", ["c:<c>"], "names <c>, which its pattern does not have"),
        ("doc:*", ["a:<a>"], "names <a>, which its pattern does not have"),
        ("doc:<a>:<b>", ["<a><b>"], "need literal text between them"),
        ("doc:<a>:<b>", "a:<a>", "tags must be a list"),
        ("doc:<a>:<b>", [""], "tags must be a list of non-empty strings"),
        # a value of <a> may hold "-" (doc:4-2:3 and doc:4:2-3 would both carry p4-2-3)
        ("doc:<a>:<b>", ["p<a>-<b>"], "must end the tag or be followed by the text that follows it"),
        ("doc:<a>:<b>", ["x<b>:<a>"], "must end the tag or be followed by the text that follows it"),
    ],
)
def test_tags_a_keyspace_may_not_declare(pattern: str, tags: object, error: str) -> None:
    km = Keymiss()
    with pytest.raises(ConfigError, match=error):
        km.add_keyspace(pattern, lambda **_: "", tags=tags)


def test_a_tag_that_names_one_set_of_values_is_accepted() -> None:
    km = Keymiss()
    km.add_keyspace("doc:<a>:<b>", lambda **_: "", tags=["p<a>::<b>", "q<a>:", "r<b>"])


async def test_forget_refuses_the_lengths_the_module_refuses(km: Keymiss) -> None:
    doc_keyspace(km, [])
    for bad in ("", "doc:" + "x" * 509):
        with pytest.raises(KeymissError, match="a pattern or tag is 1 to 512 bytes"):
            await km.forget(bad)
        with pytest.raises(KeymissError, match="a pattern or tag is 1 to 512 bytes"):
            await km.forget_tag(bad)
    assert await km.forget("doc:" + "x" * 508) == 0  # 512 bytes: accepted


async def test_forget_leaves_keys_longer_than_any_keyspace_routes(km: Keymiss) -> None:
    doc_keyspace(km, [])
    long = "doc:a:" + "x" * 5000  # over 4096 bytes: the module never computes it, so no keyspace's
    await km.set(long, "a client's")
    await km.get("doc:a:1")
    assert await km.forget("doc:*") == 1
    assert await km.forget_tag("docs") == 0
    assert await km.exists(long) == 1


def test_a_glob_with_many_stars_matches_in_bounded_time() -> None:
    """``*a*a...b`` once compiled to a backtracking regex took time exponential in its stars; run
    in a child so a regression fails on the timeout instead of hanging the suite."""
    code = (
        "from keymiss.glob import compile_glob\n"
        "m = compile_glob('sq:' + '*a' * 30 + 'b')\n"
        "assert not m('sq:' + 'a' * 200)\n"
        "assert m('sq:' + 'a' * 200 + 'b')\n"
        "assert compile_glob('*a?[bc]*d')('xxaxbyyd') and not compile_glob('*a?[bc]*d')('xxaxdyyb')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)
