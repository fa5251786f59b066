"""The RESP reply parser and framer: every type, whole or fed one byte at a time."""

from __future__ import annotations

import math
from typing import Any

import pytest

from keymiss.errors import ReplyError
from keymiss.valkey.respclient import Incomplete, Push, encode, frame, parse

from ..support import aeventually, eventually, parse_reply

CASES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", "OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nhel\r\n\r\n", b"hel\r\n"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n$1\r\na\r\n:7\r\n*2\r\n+x\r\n$-1\r\n", [b"a", 7, ["x", None]]),
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    (b",3.5\r\n", 3.5),
    (b",-inf\r\n", -math.inf),
    (b"(3492890328409238509324850943850943825024385\r\n", 3492890328409238509324850943850943825024385),
    (b"=15\r\ntxt:Some string\r\n", b"Some string"),
    (b"%2\r\n+first\r\n:1\r\n$6\r\nsecond\r\n#f\r\n", {"first": 1, b"second": False}),
    (b"%1\r\n*2\r\n:1\r\n:2\r\n+pair\r\n", {(1, 2): "pair"}),
    (b"~3\r\n:1\r\n:2\r\n:1\r\n", {1, 2}),
    (b"~2\r\n*1\r\n:1\r\n:2\r\n", [[1], 2]),
    (b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n", Push([b"message", b"ch", b"hi"])),
    (
        b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2039123\r\n:9543892\r\n",
        [2039123, 9543892],
    ),
    (b"%0\r\n", {}),
]


def same(got: Any, want: Any) -> bool:
    if isinstance(want, ReplyError):
        return isinstance(got, ReplyError) and str(got) == str(want)
    return type(got) is type(want) and got == want


@pytest.mark.parametrize(("data", "want"), CASES, ids=[repr(c[0][:12]) for c in CASES])
def test_whole_reply(data: bytes, want: Any) -> None:
    value, end = parse(data, 0)
    assert same(value, want), value
    assert end == len(data) == frame(data, 0)
    assert same(parse_reply(data), want)


@pytest.mark.parametrize(("data", "want"), CASES, ids=[repr(c[0][:12]) for c in CASES])
def test_fed_one_byte_at_a_time(data: bytes, want: Any) -> None:
    buf = bytearray(b"junk")  # replies start mid-buffer, as in a read loop
    start = len(buf)
    for i, byte in enumerate(data):
        buf.append(byte)
        if i < len(data) - 1:
            with pytest.raises(Incomplete):
                parse(buf, start)
            with pytest.raises(Incomplete):
                frame(buf, start)
    value, end = parse(buf, start)
    assert same(value, want) and end == len(buf) == frame(buf, start)


def test_errors_are_values() -> None:
    for data, line in (
        (b"-ERR no such key\r\n", "ERR no such key"),
        (b"!21\r\nSYNTAX invalid syntax\r\n", "SYNTAX invalid syntax"),
    ):
        value, end = parse(data, 0)
        assert isinstance(value, ReplyError) and str(value) == line and end == len(data) == frame(data)


def test_a_pipeline_is_framed_reply_by_reply() -> None:
    stream = b"".join(c[0] for c in CASES)
    pos, n = 0, 0
    while pos < len(stream):
        end = frame(stream, pos)
        assert same(parse(stream, pos)[0], CASES[n][1]) and parse(stream, pos)[1] == end
        pos, n = end, n + 1
    assert n == len(CASES)


@pytest.mark.parametrize("data", [b"?what\r\n", b"*x\r\n", b"$1x\r\nab\r\n"])
def test_garbage_is_a_connection_error(data: bytes) -> None:
    with pytest.raises((ConnectionError, ValueError)):
        parse(data, 0)
    with pytest.raises(ConnectionError):
        frame(data, 0)


def test_encode_round_trips_through_the_parser() -> None:
    cmd = encode(["SET", "ключ", 12, b"\x00\xff"])
    assert parse(cmd, 0) == ([b"SET", "ключ".encode(), b"12", b"\x00\xff"], len(cmd))


def test_eventually_returns_the_true_value_and_reports_the_last_false_one() -> None:
    values = iter([0, [], "yes"])
    assert eventually(lambda: next(values), interval=0) == "yes"
    with pytest.raises(AssertionError, match=r"did not hold within 0.05s \(\d+ tries\): last returned \[\]"):
        eventually(lambda: [], timeout=0.05)
    empty: dict[str, int] = {}
    with pytest.raises(AssertionError, match=r"raised KeyError"):
        eventually(lambda: empty["k"], timeout=0.05, ignore=(KeyError,))
    with pytest.raises(AssertionError, match=r"last returned 2, expected 3"):
        eventually(lambda: 2, timeout=0.05, expect=3)
    assert eventually(lambda: 0, expect=0) == 0


async def test_aeventually_takes_sync_and_async_predicates() -> None:
    calls: list[int] = []

    async def grows() -> int:
        calls.append(1)
        return len(calls) >= 3 and len(calls)

    assert await aeventually(grows, interval=0) == 3
    assert await aeventually(lambda: "now") == "now"
    with pytest.raises(AssertionError, match="never"):
        await aeventually(lambda: None, timeout=0.05, message="never")
