"""Edges of cached functions and of routing: keyspaces that could share a key are refused at
registration (a template claims its whole literal prefix), a template must begin with literal text,
and a key's fields are cut outside ``%XX`` escapes."""

from __future__ import annotations

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
