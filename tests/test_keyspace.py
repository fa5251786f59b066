"""Key patterns: Redis globbing and ``<field>`` templates, including the flagship QA key."""

from __future__ import annotations

import pytest

from keymiss import ConfigError, KeyMismatchError
from keymiss.glob import compile_glob
from keymiss.keyspace import Keyspace, Registry, Template

SEED = "bertqa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral transmission among adults"
QA = "bertqa{<tag>}_<context>_<question>"


def test_seed_key_parses_into_tag_context_question() -> None:
    fields = Template(QA).parse(SEED)
    assert fields is not None
    assert fields.tag == "8YG"
    assert fields.context == "PMC302072.xml:{8YG}:10"
    assert fields.question == "Who performs viral transmission among adults"


@pytest.mark.parametrize(
    "question",
    ["what is snake_case_naming?", "_leading", "trailing_", "a__b", "x_{y}_z"],
)
def test_question_with_underscores_survives(question: str) -> None:
    fields = Template(QA).parse(f"bertqa{{8YG}}_PMC1.xml:{{8YG}}:3_{question}")
    assert fields is not None
    assert fields.context == "PMC1.xml:{8YG}:3"
    assert fields.question == question


@pytest.mark.parametrize(
    "key",
    [
        "bertqa{8YG}",  # no context, no question
        "bertqa{8YG}_ctx",  # no question
        "bertqa{8YG_ctx_q",  # tag never closed
        "bertqa{}_ctx_q",  # empty tag
        "bertqa{8YG}_ctx_",  # empty question
    ],
)
def test_malformed_keys_do_not_parse(key: str) -> None:
    assert Template(QA).parse(key) is None


def test_trailing_literal_template() -> None:
    t = Template("emb:<model>:<text>:v1")
    fields = t.parse("emb:minilm:a:b:v1")
    assert fields is not None and fields.model == "minilm" and fields.text == "a:b"
    assert t.parse("emb:minilm:a:b:v2") is None


def test_adjacent_fields_are_rejected() -> None:
    with pytest.raises(ConfigError, match="ambiguous"):
        Template("x<a><b>")


def test_duplicate_field_rejected() -> None:
    with pytest.raises(ConfigError, match="twice"):
        Template("x<a>_<a>")


def test_template_keyspace_reports_mismatch_on_its_prefix() -> None:
    ks = Keyspace(QA, lambda tag, context, question: "")
    assert ks.claims("bertqa{8YG}_oops")
    with pytest.raises(KeyMismatchError, match="does not fit"):
        ks.argument("bertqa{8YG}_oops")
    assert not ks.claims("other:key")


def test_handler_signature_checked_against_fields() -> None:
    with pytest.raises(ConfigError, match="cannot take"):
        Keyspace(QA, lambda tag, question: "")


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("double:*", "double:21", True),
        ("double:*", "triple:21", False),
        ("h?llo", "hello", True),
        ("h?llo", "heello", False),
        ("h[ae]llo", "hallo", True),
        ("h[ae]llo", "hillo", False),
        ("h[^e]llo", "hallo", True),
        ("h[^e]llo", "hello", False),
        ("h[a-b]llo", "hbllo", True),
        ("h[a-b]llo", "hcllo", False),
        (r"h\*llo", "h*llo", True),
        (r"h\*llo", "hello", False),
        ("*", "", True),
        ("a*b*c", "a-x-b-y-c", True),
        ("a*b*c", "a-x-c", False),
        ("exact", "exact", True),
        ("exact", "exactly", False),
        ("multi\nline*", "multi\nline-x", True),
    ],
)
def test_redis_glob(pattern: str, key: str, expected: bool) -> None:
    assert compile_glob(pattern)(key) is expected


def test_registry_routes_to_first_claimant() -> None:
    reg = Registry()
    a = Keyspace("user:admin:*", lambda k: "a")
    b = Keyspace("user:*", lambda k: "b")
    reg.add(a)
    reg.add(b)
    assert reg.route("user:admin:1") is a
    assert reg.route("user:7") is b
    assert reg.route("nobody") is None
    with pytest.raises(ConfigError, match="already registered"):
        reg.add(Keyspace("user:*", lambda k: "c"))


def test_bad_keyspace_settings() -> None:
    for kwargs in ({"ttl": 0}, {"batch_size": 0}, {"batch_wait_ms": 5}, {"timeout": -1}):
        with pytest.raises(ConfigError):
            Keyspace("x:*", lambda k: k, **kwargs)  # type: ignore[arg-type]
