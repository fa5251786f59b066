"""``@km.cached``: a function's calls as reads of keys built from its arguments, in library mode.

The key is the whole call: positional, keyword and default arguments give one key; a hostile
argument cannot build another call's key; the function always gets the arguments parsed back
from the key, so a client's GET of ``fn.key(...)`` is the same read. The Python server and the
module front ends are in tests/server/test_cached_server.py and tests/valkey/test_cached_module.py.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import Counter
from pathlib import Path

import pytest

from keymiss import ConfigError, HandlerError, KeyMismatchError, Keymiss, Value


async def test_calls_go_through_the_cache_and_keys_are_built_from_arguments(km: Keymiss) -> None:
    calls: Counter[tuple[int, int]] = Counter()

    @km.cached("pow:{base}:{exp}", ttl=60)
    async def power(base: int, exp: int = 2) -> int:
        calls[base, exp] += 1
        return int(base**exp)

    assert inspect.iscoroutinefunction(power)
    assert power.key(3) == power.key(3, 2) == power.key(base=3) == power.key(exp=2, base=3) == "pow:3:2"
    assert await power(3) == 9
    assert await power(3, 2) == 9
    assert await power(exp=2, base=3) == 9
    assert calls == {(3, 2): 1}  # one key, one computation
    assert await km.get("pow:3:2") == 9  # what a Redis client reading the key gets
    assert await km.get("pow:2:10") == 1024  # a read of a key no call made yet computes it
    assert calls[2, 10] == 1
    assert power.keyspace.pattern == "pow:<base>:<exp>"
    assert await power.__wrapped__(2, 3) == 8  # the function itself, no cache
    assert power.__name__ == "power"


async def test_a_sync_function_stays_sync(km: Keymiss) -> None:
    calls: list[str] = []

    @km.cached("up:{text}")
    def upper(text: str) -> str:
        calls.append(text)
        return text.upper()

    assert not inspect.iscoroutinefunction(upper)
    # a sync caller (another thread here) starts keymiss on a loop thread of its own; the async
    # form, from this test's loop, is handed to that loop: one engine, one computation
    assert await asyncio.to_thread(upper, "abc") == "ABC"
    assert await upper.acall("abc") == "ABC"
    assert calls == ["abc"]
    assert km.loop is not asyncio.get_running_loop()
    await asyncio.to_thread(km.sync.close)  # closes keymiss on its loop and ends that thread


async def test_hostile_arguments_cannot_read_another_calls_value(km: Keymiss) -> None:
    @km.cached("pair:{a}:{b}")
    async def pair(a: str, b: str) -> str:
        return f"{a}|{b}"

    # without escaping both calls would build "pair:1:2:3" and share one value
    assert await pair("1:2", "3") == "1:2|3"
    assert await pair("1", "2:3") == "1|2:3"
    assert pair.key("1:2", "3") != pair.key("1", "2:3")
    # glob characters, braces (a hash tag would move the key's slot) and the escape itself
    hostile = "*?[x]\\{t}%41"
    key = pair.key(hostile, "")
    assert key == "pair:%2A%3F%5Bx%5D%5C%7Bt%7D%2541:"
    assert await pair(hostile, "") == f"{hostile}|"
    assert await km.get(key) == f"{hostile}|"
    await pair("a", "b")
    assert await km.forget(pair.key("*", "*")) == 0  # an escaped '*' matches only itself
    assert await km.exists(pair.key("a", "b")) == 1


async def test_keys_no_call_would_build_do_not_fit(km: Keymiss) -> None:
    calls: list[object] = []

    @km.cached("sq:{n}")
    async def square(n: int) -> int:
        calls.append(n)
        return n * n

    @km.cached("t:{x}:{y}")
    async def text(x: str, y: float) -> str:
        calls.append(x)
        return x

    # one call, one key: another way to write 12, or an escape written otherwise, is refused,
    # so forget(12) can never leave a copy behind under "sq:012"
    for key in ["sq:012", "sq:+12", "sq:1_2", "sq: 12", "sq:x", "t:%3a:1.0", "t:%41:1.0", "t:a:1", "t:%:1.0"]:
        with pytest.raises(KeyMismatchError, match="does not fit cached keyspace"):
            await km.get(key)
    assert await km.get("t:%3A:1.0") == ":"
    assert await km.get("sq:-12") == 144
    assert calls == [":", -12]


async def test_argument_types_come_from_annotations(km: Keymiss) -> None:
    got: list[tuple[object, ...]] = []

    @km.cached("mix:{i}:{f}:{b}:{s}")
    def mix(i: int, f: float, b: bool, s: str) -> list[object]:
        got.append((i, f, b, s))
        return [i, f, b, s]

    assert mix.key(1, 0.5, True, "x") == "mix:1:0.5:True:x"
    assert mix.key(1, 2, False, "x") == "mix:1:2.0:False:x"  # an int where a float goes
    assert await mix.acall(1, 2, False, "x") == [1, 2.0, False, "x"]
    assert got == [(1, 2.0, False, "x")] and type(got[0][1]) is float  # parsed back from the key
    for bad in [("1", 0.5, True, "x"), (True, 0.5, True, "x"), (1, 0.5, 1, "x"), (1, 0.5, True, 7)]:
        with pytest.raises(TypeError, match="keys of 'mix:"):
            mix.key(*bad)
    with pytest.raises(TypeError):
        mix.key(1, 0.5)  # a missing argument, as the function itself would say
    with pytest.raises(ValueError, match="UTF-8"):
        mix.key(1, 0.5, True, "\ud800")


async def test_arguments_outside_the_key(km: Keymiss) -> None:
    @km.cached("w:{word}")
    async def word(word: str, times: int = 1) -> str:
        return word * times

    assert await word("ab") == "ab"
    assert await word("ab", times=1) == "ab"
    with pytest.raises(TypeError, match="'times' is not part of the key"):
        await word("ab", times=3)  # would read word("ab")'s value


def test_templates_refused_when_decorated() -> None:
    km = Keymiss()

    def f(a: str, b: str = "") -> str:
        return a

    cases = {
        "x:{c}": "no parameter 'c'",
        "x:const": "names no parameter",
        "x:{a}{b}": "literal text between them",
        "x:{a!r}": "a parameter's name alone",
        "x:{a:>3}": "a parameter's name alone",
        "x:{a.b}": "a parameter's name alone",
        "x:<a>:{b}": "not <name>",
        "x:{a": "literal brace",
    }
    for template, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            km.cached(template)(f)

    def g(a: str, b: str) -> str:
        return a

    with pytest.raises(ConfigError, match="'b' is not in the key"):
        km.cached("g:{a}")(g)

    def h(*a: str) -> str:
        return ""

    with pytest.raises(ConfigError):
        km.cached("h:{a}")(h)

    def typed(a: list[int]) -> str:
        return ""

    with pytest.raises(ConfigError, match="str, int, float or bool"):
        km.cached("t:{a}")(typed)
    with pytest.raises(ConfigError, match="unknown keyspace option"):
        km.cached("x:{a}", tll=3)(f)
    with pytest.raises(ConfigError, match="computes one call"):
        km.cached("x:{a}", batch_size=4)(f)
    assert len(km.registry) == 0


async def test_hash_tag_and_empty_fields(km: Keymiss) -> None:
    @km.cached("user:{{{uid}}}:name:{part}")
    async def name(uid: str, part: str) -> str:
        return f"{uid}/{part}"

    assert name.keyspace.pattern == "user:{<uid>}:name:<part>"
    assert name.key("7", "first") == "user:{7}:name:first"
    assert name.key("a}b", "") == "user:{a%7Db}:name:"  # a '}' cannot end the hash tag early
    assert await name("", "") == "/"  # empty arguments are empty fields
    assert await km.get("user:{}:name:") == "/"


async def test_forget_drops_the_value_and_a_remembered_failure(km: Keymiss) -> None:
    runs: Counter[int] = Counter()

    @km.cached("f:{n}", error_ttl=60)
    async def flaky(n: int) -> int:
        runs[n] += 1
        if runs[n] == 1 and n < 0:
            raise ValueError("first run fails")
        return runs[n]

    assert await flaky(1) == 1
    assert await flaky.forget(1) == 1
    assert await km.exists(flaky.key(1)) == 0
    assert await flaky(1) == 2
    assert await flaky.forget(5) == 0  # nothing stored: nothing dropped
    with pytest.raises(HandlerError):
        await flaky(-1)
    with pytest.raises(HandlerError):
        await flaky(-1)  # remembered for error_ttl
    await flaky.forget(-1)
    assert await flaky(-1) == 2


async def test_forget_during_a_computation_keeps_its_value_out(km: Keymiss) -> None:
    release = asyncio.Event()

    @km.cached("slow:{n}")
    async def slow(n: int) -> int:
        await release.wait()
        return n

    reader = asyncio.ensure_future(slow(1))
    while km.engine.in_flight == 0:
        await asyncio.sleep(0.001)
    await slow.forget(1)
    release.set()
    assert await reader == 1  # the reader that asked before gets it
    assert await km.exists(slow.key(1)) == 0  # not stored after the forget


async def test_value_ttl_from_a_cached_function_and_options(tmp_path: Path) -> None:
    async with Keymiss(store=f"lmdb:{tmp_path / 'db'}") as km:

        @km.cached("q:{sym}", ttl=3600)
        async def quote(sym: str) -> Value:
            return Value({"sym": sym}, ttl=30 if sym == "hot" else None)

        assert await quote("hot") == {"sym": "hot"}
        assert await quote("cold") == {"sym": "cold"}
        assert 25_000 < await km.pttl("q:hot") <= 30_000
        assert await km.pttl("q:cold") > 3_500_000
        km.tune("q:<sym>", ttl=10)  # a config file's table: still the cached keyspace
        await quote.forget("cold")
        assert await quote("cold") == {"sym": "cold"}
        assert 0 < await km.pttl("q:cold") <= 10_000
        with pytest.raises(KeyMismatchError):
            await km.get("q:%zz")


def test_value_ttl_is_checked_where_it_is_built() -> None:
    assert Value("v").ttl is None and Value(b"v", ttl=1).ttl == 1
    for bad in [0, -1, float("nan"), float("inf"), True, "10", 366 * 86400]:
        with pytest.raises(ValueError, match="Value ttl"):
            Value("v", ttl=bad)  # type: ignore[arg-type]


async def test_values_of_one_batch_keep_their_own_ttls_and_a_bad_one_fails_its_call(km: Keymiss) -> None:
    @km.keyspace("b:*", batch_size=4, batch_wait_ms=50, ttl=600)
    def batch(keys: list[str]) -> list[object]:
        return [Value(k, ttl=5) if k.endswith("short") else k for k in keys]

    @km.keyspace("bad:*")
    def bad(key: str) -> Value:
        return Value(key, ttl=-1)

    assert await km.get_many(["b:short", "b:long"]) == ["b:short", "b:long"]
    assert 0 < await km.pttl("b:short") <= 5000
    assert await km.pttl("b:long") > 500_000
    with pytest.raises(HandlerError, match="Value ttl must be seconds from"):
        await km.get("bad:x")
    assert await km.exists("bad:x") == 0
