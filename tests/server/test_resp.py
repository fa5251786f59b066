"""Request framing, fed in 1–5 byte chunks, against Redis's own rules and error texts."""

from __future__ import annotations

import contextlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keymiss.server import reply
from keymiss.server.resp import ProtocolError, RequestParser


def feed_chunked(data: bytes, seed: int = 0, parser: RequestParser | None = None) -> list[list[bytes]]:
    """Feed ``data`` 1–5 bytes at a time, collecting every complete command."""
    rng = random.Random(seed)
    p = parser or RequestParser()
    out: list[list[bytes]] = []
    i = 0
    while i < len(data):
        n = rng.randint(1, 5)
        p.feed(data[i : i + n])
        i += n
        while (cmd := p.next()) is not None:
            out.append(cmd)
    return out


def multibulk(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%b\r\n" % (len(a), a) for a in args)


@pytest.mark.parametrize("seed", range(5))
def test_pipelined_multibulk_in_tiny_chunks(seed: int) -> None:
    data = multibulk(b"SET", b"k", b"v\r\nwith crlf") + multibulk(b"GET", b"k") + multibulk(b"PING")
    assert feed_chunked(data, seed) == [[b"SET", b"k", b"v\r\nwith crlf"], [b"GET", b"k"], [b"PING"]]


def test_binary_and_empty_arguments() -> None:
    data = multibulk(b"SET", b"\x00\xff", b"")
    assert feed_chunked(data) == [[b"SET", b"\x00\xff", b""]]


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"PING\r\n", [b"PING"]),
        (b"PING\n", [b"PING"]),  # LF-only, as telnet/nc may send
        (b"  set   a   b  \r\n", [b"set", b"a", b"b"]),
        (b'set k "hello world"\r\n', [b"set", b"k", b"hello world"]),
        (b'set k "a\\tb\\x41\\"q"\r\n', [b"set", b"k", b'a\tbA"q']),
        (b"set k 'it''s'\r\n", None),  # closing quote must be followed by a space
        (b"set k 'it\\'s'\r\n", [b"set", b"k", b"it's"]),
        (b'set k ""\r\n', [b"set", b"k", b""]),
    ],
)
def test_inline_commands(line: bytes, args: list[bytes] | None) -> None:
    if args is None:
        with pytest.raises(ProtocolError, match="unbalanced quotes"):
            feed_chunked(line)
    else:
        assert feed_chunked(line) == [args]


def test_empty_lines_and_empty_multibulk_are_skipped() -> None:
    assert feed_chunked(b"\r\n\n*0\r\n*-10\r\nPING\r\n") == [[b"PING"]]


def test_mixed_line_endings() -> None:
    assert feed_chunked(b"PING\nECHO a\r\n" + multibulk(b"PING")) == [[b"PING"], [b"ECHO", b"a"], [b"PING"]]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"*3000000000\r\n", "invalid multibulk length"),
        (b"*blabla\r\n", "invalid multibulk length"),
        (b"*+3\r\n", "invalid multibulk length"),
        (b"*03\r\n", "invalid multibulk length"),
        (b"*1\r\n$blabla\r\n", "invalid bulk length"),
        (b"*1\r\n$-1\r\n", "invalid bulk length"),
        (b"*1\r\n$2000000000\r\n", "invalid bulk length"),
        (b"*1\r\nfoo\r\n", "expected '$', got 'f'"),
        (b"*2\r\n$3\r\nGET\r\n*1\r\n", "expected '$', got '*'"),  # nested arrays are not requests
        (b"*1\r\n%1\r\n", "expected '$', got '%'"),  # nor are RESP3 maps
        (b'set "unterminated\r\n', "unbalanced quotes in request"),
        (b"\x00" * (70 * 1024), "too big inline request"),
        (b"*" + b"1" * (70 * 1024), "too big mbulk count string"),
        (b"*1\r\n$" + b"1" * (70 * 1024), "too big bulk count string"),
    ],
)
def test_malformed_requests_get_redis_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as info:
        feed_chunked(data) if len(data) < 1000 else _feed_big(data)
    assert info.value.reply == f"-ERR Protocol error: {message}\r\n".encode()


def _feed_big(data: bytes) -> None:
    p = RequestParser()
    for i in range(0, len(data), 1024):
        p.feed(data[i : i + 1024])
        while p.next() is not None:
            pass


def test_bulk_limit_is_configurable() -> None:
    p = RequestParser(max_bulk=10)
    p.feed(b"*1\r\n$11\r\n")
    with pytest.raises(ProtocolError, match="invalid bulk length"):
        p.next()


def test_unauthenticated_clients_may_only_send_small_requests() -> None:
    p = RequestParser()
    p.authenticated = False
    p.feed(b"*11\r\n")
    with pytest.raises(ProtocolError, match="unauthenticated multibulk length"):
        p.next()
    p = RequestParser()
    p.authenticated = False
    p.feed(b"*2\r\n$4\r\nAUTH\r\n$20000\r\n")
    with pytest.raises(ProtocolError, match="unauthenticated bulk length"):
        p.next()


def test_large_bulk_arriving_slowly_is_scanned_once() -> None:
    p = RequestParser()
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = multibulk(b"SET", b"k", payload)
    for i in range(0, len(data), 4096):
        p.feed(data[i : i + 4096])
        cmd = p.next()
        if cmd is not None:
            assert cmd == [b"SET", b"k", payload]
            break
    else:
        pytest.fail("command never completed")
    assert p.pending == 0


@settings(max_examples=200, deadline=None)
@given(
    cmds=st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_multibulk_round_trip(cmds: list[list[bytes]], seed: int) -> None:
    data = b"".join(multibulk(*c) for c in cmds)
    assert feed_chunked(data, seed) == cmds


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), seed=st.integers(0, 2**16))
def test_arbitrary_bytes_give_commands_or_protocol_errors_only(data: bytes, seed: int) -> None:
    try:
        for cmd in feed_chunked(data, seed):
            assert isinstance(cmd, list) and all(isinstance(a, bytes) for a in cmd)
    except ProtocolError as exc:
        assert exc.reply.startswith(b"-ERR Protocol error: ")


def test_reply_encoding_resp2_and_resp3() -> None:
    value = {"a": 1, "b": [b"x", None], "c": 1.5, "d": True}
    assert (
        reply.encode(value, 2) == b"*8\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n*2\r\n$1\r\nx\r\n$-1\r\n"
        b"$1\r\nc\r\n$3\r\n1.5\r\n$1\r\nd\r\n:1\r\n"
    )
    assert (
        reply.encode(value, 3)
        == b"%4\r\n$1\r\na\r\n:1\r\n$1\r\nb\r\n*2\r\n$1\r\nx\r\n_\r\n$1\r\nc\r\n,1.5\r\n$1\r\nd\r\n#t\r\n"
    )
    assert reply.verbatim("hi", 3) == b"=6\r\ntxt:hi\r\n"
    assert reply.error("ERR bad\r\ninjected") == b"-ERR bad  injected\r\n"


FRAGMENTS = [
    b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
    b"*1\r\n$4\r\nPING\r\n",
    b"*1\r\n+PING\r\n",  # a simple string where Redis wants '$'
    b"*1\r\n:1\r\n",
    b"*1\r\n$-1\r\n",
    b"*2\r\n$3\r\nGET\r\n*1\r\n$1\r\na\r\n",  # nested array
    b"*1\r\n%1\r\n$1\r\na\r\n$1\r\nb\r\n",  # RESP3 map
    b"*0\r\n",
    b"*-1\r\n",
    b"*-10\r\n",
    b"*02\r\n",
    b"*1\r\n$03\r\nGET\r\n",
    b"*1\r\n$3\r\nGETxx",  # two bytes after a bulk that are not CRLF
    b"*1\rX$4\r\nPING\r\n",
    b"PING\r\n",
    b"\r\n",
    b"*3000000000\r\n",
    b"*1\r\n$2000000000\r\n",
    b"$4\r\nPING\r\n",
    b"*1\r\n$1\r\n\r\r\n",
]


def run_parser(data: bytes, seed: int, use_hiredis: bool) -> list[object]:
    rng = random.Random(seed)
    p = RequestParser(use_hiredis=use_hiredis, max_bulk=1000)
    out: list[object] = []
    i = 0
    try:
        while i < len(data):
            n = rng.choice([1, 3, 5, 64, 4096])
            p.feed(data[i : i + n])
            i += n
            while (cmd := p.next()) is not None:
                out.append(cmd)
    except ProtocolError as exc:
        out.append(exc.reply)
    return out


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_hiredis_fast_path_agrees_with_the_exact_parser(parts: list[bytes], seed: int) -> None:
    """The hiredis fast path must never accept, split or name an error differently from Redis's rules."""
    data = b"".join(parts)
    assert run_parser(data, seed, use_hiredis=True) == run_parser(data, seed, use_hiredis=False)


@pytest.mark.parametrize("data", [b"*2000000000\r\n", b"*1\r\n>2000000000\r\n", b"*1\r\n~2000000000\r\n"])
def test_huge_aggregate_headers_cost_nothing(data: bytes) -> None:
    """hiredis sizes aggregates up front; such input must never reach it (it would take the CPU)."""
    import time

    t0 = time.perf_counter()
    p = RequestParser()
    p.feed(data)
    with contextlib.suppress(ProtocolError):
        assert p.next() is None
    del p
    assert time.perf_counter() - t0 < 0.5
