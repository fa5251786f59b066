"""What a handler's error looks like to a client of the module front end: the same line the Python
server sends, at once, whatever the message holds."""

from __future__ import annotations

import asyncio

from keymiss import Keymiss, KeymissError
from keymiss.errors import error_line

from ..redis_servers import RedisProcess
from ..support import ReplyError, resp
from .conftest import running, url


def lone_surrogates_app() -> Keymiss:
    km = Keymiss()

    @km.keyspace("lone:*", timeout=30)
    async def lone(key: str) -> str:
        raise KeymissError("odd \ud800 text")

    @km.keyspace("batched:*", batch_size=4, batch_wait_ms=50, timeout=30)
    async def batched(keys: list[str]) -> list[str]:
        if any(k.endswith("bad") for k in keys):
            raise KeymissError("odd \udfff text")
        return [f"ok {k}" for k in keys]

    return km


def test_an_error_line_carries_what_utf8_cannot_as_question_marks() -> None:
    assert error_line(KeymissError("odd \ud800 text")) == "ERR odd ? text"
    undecodable = b"sur:\xff\xfe".decode("utf-8", "surrogateescape")
    assert error_line(KeymissError(f"key was {undecodable}")) == "ERR key was sur:??"
    assert error_line(KeymissError("two\r\nlines")) == "ERR two  lines"


async def test_a_message_with_a_lone_surrogate_reaches_the_reader_at_once(server: RedisProcess) -> None:
    async with running(lone_surrogates_app(), url(server)):
        reply = await asyncio.wait_for(resp(server.port, "GET", "lone:1"), 10)
        assert isinstance(reply, ReplyError) and str(reply) == "ERR odd ? text"
        # the keys answered in the same batch as the failing one are not lost with it
        replies = await asyncio.wait_for(
            asyncio.gather(*(resp(server.port, "GET", f"batched:{k}") for k in ("a", "b", "bad"))), 10
        )
        assert all(isinstance(r, ReplyError) and str(r) == "ERR odd ? text" for r in replies)
        assert await resp(server.port, "GET", "batched:c") == b"ok batched:c"
