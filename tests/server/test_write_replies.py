"""How the Python server reads a shared Redis's reply to a client's write, to decide whether it
changed its keys (and so supersedes their running computation): SET … GET with NX or XX, and a
reply that timed out (the write may have landed: a computed value must not be stored over it)."""

from __future__ import annotations

import pytest

from keymiss.server.passthrough import changed_by
from keymiss.stores.redisrecord import wrap_error

NIL = b"$-1\r\n"
OLD = b"$3\r\nold\r\n"


@pytest.mark.parametrize(
    ("args", "answer", "changed"),
    [
        ([b"SET", b"k", b"v", b"NX", b"GET"], OLD, False),  # NX refused: there was a value
        ([b"SET", b"k", b"v", b"NX", b"GET"], NIL, True),  # NX set it: there was none
        ([b"SET", b"k", b"v", b"XX", b"GET"], NIL, False),  # XX refused: there was none
        ([b"SET", b"k", b"v", b"XX", b"GET"], OLD, True),
        ([b"SET", b"k", b"v", b"GET"], NIL, True),
        ([b"SET", b"k", b"v", b"GET"], OLD, True),
        ([b"SET", b"k", b"v", b"XX"], NIL, False),
        ([b"SET", b"k", b"v"], b"+OK\r\n", True),
        ([b"SET", b"k", b"v"], b"-ERR syntax error\r\n", False),
    ],
)
def test_set_get_with_nx_or_xx_is_judged_by_what_it_did(
    args: list[bytes], answer: bytes, changed: bool
) -> None:
    assert changed_by(args, answer) is changed


def test_a_reply_that_timed_out_counts_as_a_change() -> None:
    from redis.exceptions import TimeoutError as RedisTimeoutError

    line = f"-{wrap_error(RedisTimeoutError('slow'), 1.0)}\r\n".encode()
    assert changed_by([b"SET", b"k", b"v"], line)
    assert changed_by([b"DEL", b"k"], line)
    assert not changed_by([b"DEL", b"k"], b"-BUSY something else\r\n")
