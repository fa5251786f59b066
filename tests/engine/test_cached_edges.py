"""Edges of cached functions and of routing: keyspaces that could share a key are refused at
registration (a template claims its whole literal prefix), a template must begin with literal text,
and a key's fields are cut outside ``%XX`` escapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from keymiss import ConfigError, Keymiss


def test_templates_that_could_share_a_key_are_refused_in_either_order() -> None:
    for first, second in (("user:{uid}", "user:{uid}:posts"), ("user:{uid}:posts", "user:{uid}")):
        km = Keymiss()
        km.cached(first)(lambda uid: uid)
        with pytest.raises(ConfigError, match="overlaps"):
            km.cached(second)(lambda uid: uid)
        assert [ks.pattern for ks in km.keyspaces()] == [first.replace("{uid}", "<uid>")]
    km = Keymiss()
    km.cached("user:{uid}")(lambda uid: uid)
    km.cached("user_posts:{uid}")(lambda uid: uid)  # a prefix of its own
    km.keyspace("session:*")(lambda key: key)
    with pytest.raises(ConfigError, match="overlaps"):  # a glob reaching into a template's prefix
        km.keyspace("user:admin:*")(lambda key: key)
    with pytest.raises(ConfigError, match="overlaps"):
        km.keyspace("*")(lambda key: key)
    with pytest.raises(ConfigError, match="overlaps"):  # a template inside a glob's keys
        km.keyspace("session:<sid>")(lambda sid: sid)
    km.keyspace("us[^e]*")(lambda key: key)  # matches no key starting with "user:"
    km.keyspace("session:admin:*")(lambda key: key)  # globs nest: the first registered owns a key


def test_a_template_must_begin_with_literal_text() -> None:
    km = Keymiss()
    with pytest.raises(ConfigError, match="must begin with literal text"):
        km.cached("{lang}/greeting")(lambda lang: lang)
    with pytest.raises(ConfigError, match="must begin with literal text"):
        km.keyspace("<lang>/greeting")(lambda lang: lang)
    km.keyspace("double:*")(lambda key: key)
    assert km.sync.get("double:21") == "double:21"
    assert km.sync.get("session:abc") is None  # no keyspace's: the not-ours row
    km.sync.close()


def test_the_literal_after_a_field_is_not_looked_for_inside_an_escape() -> None:
    km = Keymiss()

    @km.cached("fx:{src}2{dst}")
    def convert(src: str, dst: str) -> str:
        return f"{src}->{dst}"

    @km.cached("grid:{row}A{col}")
    def cell(row: str, col: str) -> str:
        return f"{row}/{col}"

    try:
        assert convert.key("h2o", "x") == "fx:h%32o2x"
        assert convert("h2o", "x") == "h2o->x"
        assert convert("a*", "b") == "a*->b"
        assert km.sync.get("fx:h%32o2x") == "h2o->x"
        assert cell("*", "2") == "*/2"
        assert cell("A", "b") == "A/b"
        assert cell("%A", "A") == "%A/A"
    finally:
        km.sync.close()


def test_an_argument_outside_the_key_must_be_its_default_strictly() -> None:
    from unittest import mock

    km = Keymiss()

    @km.cached("d:{n}")
    def d(n: int, scale: int = 1, flag: object = None, dims: tuple[int, ...] = (1, 2)) -> list[object]:
        return [n, scale]

    for kwargs in (
        {"scale": True},
        {"scale": 1.0},
        {"flag": mock.ANY},
        {"dims": (1, 2.0)},
        {"dims": (True, 2)},
    ):
        with pytest.raises(TypeError, match="is not part of the key"):
            d.key(2, **kwargs)
    assert d.key(2, scale=1, flag=None, dims=(1, 2)) == "d:2"  # equal plain values of its type


def test_a_call_reads_a_value_a_client_wrote_as_its_return_annotation_says() -> None:
    from keymiss import CodecError

    km = Keymiss()

    @km.cached("sq:{n}")
    def square(n: int) -> int:
        return n * n

    @km.cached("name:{n}")
    def name(n: int) -> str:
        return str(n)

    @km.cached("raw:{n}")
    def raw(n: int) -> bytes:
        return b"%d" % n

    try:
        km.sync.set("sq:12", b"144")  # what a client's SET stores: bytes
        km.sync.set("name:1", b"one")
        km.sync.set("raw:1", b"\x00")
        assert square(12) == 144
        assert name(1) == "one"
        assert raw(1) == b"\x00"
        km.sync.set("sq:13", b"not a number")
        with pytest.raises(CodecError, match="written by a client, not int"):
            square(13)
        km.sync.set("sq:14", b"true")
        with pytest.raises(CodecError, match="not int"):
            square(14)
    finally:
        km.sync.close()


def test_value_ttls_are_any_real_number_of_a_millisecond_or_more() -> None:
    import numpy as np

    from keymiss import Value

    assert Value(1, ttl=np.int64(3)).ttl == 3.0
    assert Value(1, ttl=np.float64(2.5)).ttl == 2.5
    assert Value(1, ttl=0.001).ttl == 0.001
    for bad in (1e-9, 0.0005, True, "3", float("nan")):
        with pytest.raises(ValueError, match=r"from 0\.001"):
            Value(1, ttl=bad)  # type: ignore[arg-type]

    class Priced(Value):
        pass

    km = Keymiss()

    @km.cached("p:{n}", ttl=600)
    def price(n: int) -> int:
        return Priced(n, ttl=5)  # type: ignore[return-value]

    try:
        assert price(3) == 3  # a subclass of Value is unwrapped too
        assert 0 < km.sync.pttl("p:3") <= 5000
    finally:
        km.sync.close()


def test_keys_longer_than_the_module_routes_are_refused_everywhere() -> None:
    from keymiss.keyspace import MAX_KEY_BYTES

    header = Path(__file__).parents[2] / "keymiss/valkey/module/keymiss.h"
    assert f"#define KM_MAX_ROUTED_KEY ({MAX_KEY_BYTES // 1024} * 1024)" in header.read_text()
    km = Keymiss()

    @km.cached("s:{text}")
    def echo(text: str) -> str:
        return text

    @km.cached("i:{n}")
    def ident(n: int) -> int:
        return n

    try:
        assert len(echo.key("x" * (MAX_KEY_BYTES - 2))) == MAX_KEY_BYTES
        with pytest.raises(ValueError, match="longer than 4096 bytes"):
            echo("x" * (MAX_KEY_BYTES - 1))
        with pytest.raises(ValueError, match="longer than 4096 bytes"):
            echo.key("é" * 2048)  # counted in UTF-8 bytes
        with pytest.raises(ValueError, match="more digits than a key holds"):
            ident.key(10**5000)
        assert km.sync.get("s:" + "x" * MAX_KEY_BYTES) is None  # a client's GET: no keyspace's
    finally:
        km.sync.close()
