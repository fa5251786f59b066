"""A cached function on the Python server: a client's GET of ``fn.key(...)`` and the Python
call are one read of one key; a key no call would build is refused; the function's own TTL
(``Value``) is the key's; ``forget`` drops the value the server serves."""

from __future__ import annotations

import asyncio
from collections import Counter

from keymiss import Keymiss, Value
from keymiss.config import Settings
from keymiss.server.app import Server

from ..support import ReplyError, RespTestClient


async def test_a_cached_function_served_over_resp() -> None:
    km = Keymiss()
    calls: Counter[object] = Counter()

    @km.cached("sq:{n}", ttl=60)
    def square(n: int) -> int:  # a sync function: the server runs it in a handler thread
        calls[n] += 1
        return n * n

    @km.cached("pair:{a}:{b}", ttl=60)
    async def pair(a: str, b: str) -> Value:
        calls[a, b] += 1
        return Value(f"{a}|{b}", ttl=5)

    server = Server(km, Settings(port=0, store="memory", grace_seconds=1.0))
    await server.start()
    try:
        async with RespTestClient(server.port) as c:
            assert await c.call("GET", "sq:12") == b"144"  # JSON, as the int's codec writes it
            assert await asyncio.to_thread(square, 12) == 144  # a sync caller: the same key
            assert calls[12] == 1
            key = pair.key("1:2", "3")
            assert key == "pair:1%3A2:3"
            assert await c.call("GET", key) == b"1:2|3"
            assert await pair("1:2", "3") == "1:2|3"
            assert await c.call("GET", pair.key("1", "2:3")) == b"1|2:3"  # not the other call's
            assert 0 < await c.call("PTTL", key) <= 5000  # the value's own TTL, not the keyspace's
            assert await c.call("TTL", "sq:12") == 60
            wrong = await c.call("GET", "sq:012")
            assert isinstance(wrong, ReplyError) and "does not fit cached keyspace 'sq:{n}'" in str(wrong)
            assert await pair.forget("1:2", "3") == 1
            assert await c.call("EXISTS", key) == 0
            assert await c.call("GET", key) == b"1:2|3"
            assert calls["1:2", "3"] == 2
    finally:
        await server.shutdown()
