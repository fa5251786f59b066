"""A cached function in module mode (Redis 7.0 and Valkey 9): the worker registers its keyspace,
a client's GET of ``fn.key(...)`` is computed by the function with the arguments parsed back from
the key, the function's own TTL (``Value``) reaches the server in FILL's ``PX``, and ``forget``
through a Keymiss whose store is that server drops the value there."""

from __future__ import annotations

from collections import Counter

from keymiss import Keymiss, Value

from ..redis_servers import RedisProcess
from ..support import ReplyError, RespTestClient
from .conftest import running, url


async def test_a_cached_function_served_by_the_module(server: RedisProcess) -> None:
    # the store is the server itself, as `keymiss serve` configures its workers' Keymiss
    km = Keymiss(store=url(server), sweep_interval=0)
    calls: Counter[object] = Counter()

    @km.cached("sq:{n}", ttl=60)
    def square(n: int) -> int:
        calls[n] += 1
        return n * n

    @km.cached("pair:{a}:{b}", ttl=60, version="v1")
    async def pair(a: str, b: str) -> Value:
        calls[a, b] += 1
        return Value(f"{a}|{b}", ttl=5)

    async with running(km, url(server)), RespTestClient(server.port) as c:
        assert await c.call("GET", "sq:12") == b"144"
        empty = await c.call("GET", "sq:")  # an empty field is no int: refused, not computed
        assert isinstance(empty, ReplyError) and "is not an int" in str(empty)
        key = pair.key("1:2", "3")
        assert await c.call("GET", key) == b"1:2|3"
        assert await c.call("GET", pair.key("1", "2:3")) == b"1|2:3"
        assert 0 < await c.call("PTTL", key) <= 5000  # FILL's PX: the value's own TTL
        assert 50_000 < await c.call("PTTL", "sq:12") <= 60_000
        wrong = await c.call("GET", "sq:012")
        assert isinstance(wrong, ReplyError) and "does not fit cached keyspace 'sq:{n}'" in str(wrong)
        assert await pair("1:2", "3") == "1:2|3"  # the Python call reads the module's value
        assert calls["1:2", "3"] == 1
        assert await pair.forget("1:2", "3") == 1
        assert await c.call("EXISTS", key) == 0
        assert await c.call("GET", key) == b"1:2|3"  # computed again
        assert calls["1:2", "3"] == 2
        assert calls[12] == 1


async def test_a_worker_takes_over_a_cache_warmed_at_import(server: RedisProcess) -> None:
    import asyncio

    km = Keymiss(store=url(server), sweep_interval=0)
    calls: Counter[int] = Counter()

    @km.cached("inner:{n}", ttl=60)
    def inner(n: int) -> int:
        calls[n] += 1
        return n + 1

    @km.cached("outer:{n}", ttl=60)
    def outer(n: int) -> int:
        return int(inner(n)) * 10

    assert await asyncio.to_thread(inner, 0) == 1  # warmed at import, on the sync face's thread
    async with running(km, url(server)), RespTestClient(server.port) as c:
        assert km.loop is asyncio.get_running_loop()
        assert await c.call("GET", "outer:5") == b"60"
        assert await c.call("GET", "inner:5") == b"6"
        assert await c.call("GET", "inner:0") == b"1"  # stored by the warming, in the server
        assert calls == {0: 1, 5: 1}
    # running() closed the worker and km on this loop: no connection of another loop was left
