"""LMDB-specific guarantees: crash safety, poisoned records, long keys, growth and the disk budget."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest

from keymiss import Keymiss
from keymiss.stores.lmdb import LMDBStore
from keymiss.stores.lmdbrecord import DATA_DB

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from keymiss.stores.lmdb import LMDBStore

    async def main():
        store = LMDBStore(sys.argv[1], map_size=1024 * 1024)
        i = 0
        while True:
            key = f"k{i}"
            await store.set(key, (key * 50).encode(), codec=1)
            print(key, flush=True)  # printed only after the write was acknowledged
            i += 1

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("kill_after", [1, 37, 400])
@pytest.mark.reliability
async def test_every_acknowledged_write_survives_kill_9(tmp_path: Path, kill_after: int) -> None:
    path = str(tmp_path / "db")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
    acked: list[str] = []
    assert proc.stdout is not None
    try:
        while len(acked) < kill_after:
            line = proc.stdout.readline()
            assert line, "writer died early"
            acked.append(line.strip())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    store = LMDBStore(path)
    try:
        for key in acked:
            item = store.get_now(key)
            assert item is not None, key
            assert item.value == (key * 50).encode() and item.codec == 1
        assert store.corrupt == 0
    finally:
        await store.close()


def _raw_put(path: str, key: bytes, value: bytes) -> None:
    env = lmdb.open(path, max_dbs=4)
    db = env.open_db(DATA_DB)
    with env.begin(write=True, db=db) as txn:
        txn.put(key, value)
    env.close()


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.mark.reliability
async def test_poisoned_records_are_misses_and_never_executed(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    marker = tmp_path / "pwned"
    url = f"lmdb:{path}"
    app = Keymiss(store=url)
    calls: list[str] = []

    @app.keyspace("p:*")
    def p(key: str) -> str:
        calls.append(key)
        return f"fresh:{key}"

    assert await app.get("p:source") == "fresh:p:source"
    await app.close()

    env = lmdb.open(path, max_dbs=4)
    with env.begin(db=env.open_db(DATA_DB)) as txn:
        good = txn.get(b"p:source")
    env.close()
    _raw_put(path, b"p:random", os.urandom(64))
    _raw_put(path, b"p:pickle", pickle.dumps(_Marker(str(marker))))
    _raw_put(path, b"p:truncated", good[:-3])
    _raw_put(path, b"p:copied", good)  # a valid record, but for another key

    app = Keymiss(store=url)
    app.add_keyspace("p:*", p)
    for key in ("p:random", "p:pickle", "p:truncated", "p:copied"):
        assert await app.get(key) == f"fresh:{key}"
    assert not marker.exists()
    assert app.store.info().extra["corrupt"] == 4
    assert sorted(calls) == sorted(["p:source", "p:random", "p:pickle", "p:truncated", "p:copied"])
    await app.close()


async def test_long_and_empty_keys(tmp_path: Path) -> None:
    store = LMDBStore(str(tmp_path / "db"))
    long_a = "q" * 3000 + "a"
    long_b = "q" * 3000 + "b"
    await store.set(long_a, b"A")
    await store.set(long_b, b"B")
    await store.set("", b"empty")
    assert (store.get_now(long_a) or None) and store.get_now(long_a).value == b"A"  # type: ignore[union-attr]
    assert store.get_now(long_b).value == b"B"  # type: ignore[union-attr]
    assert store.get_now("").value == b"empty"  # type: ignore[union-attr]
    cursor, keys = 0, []
    while True:
        cursor, chunk = await store.scan(cursor, None, 2)
        keys.extend(chunk)
        if cursor == 0:
            break
    assert sorted(keys) == sorted([long_a, long_b, ""])
    assert await store.delete([long_a]) == 1
    assert store.get_now(long_a) is None
    await store.close()


@pytest.mark.parametrize("durable", [True, False])
@pytest.mark.reliability
async def test_map_grows_instead_of_failing(tmp_path: Path, durable: bool) -> None:
    store = LMDBStore(str(tmp_path / "db"), map_size=256 * 1024, durable=durable)
    value = os.urandom(64 * 1024)
    for i in range(100):  # 6.4 MB into a 256 KB map
        assert await store.set(f"k{i}", value)
    assert store.info().extra["map_size"] > 6 * 1024**2
    assert all(store.get_now(f"k{i}") is not None for i in range(100))
    await store.close()


@pytest.mark.reliability
async def test_max_disk_evicts_oldest_instead_of_failing(tmp_path: Path) -> None:
    store = LMDBStore(str(tmp_path / "db"), map_size=512 * 1024, max_disk=2 * 1024**2)
    value = os.urandom(32 * 1024)
    for i in range(300):  # ~9.6 MB through a 2 MB disk budget
        assert await store.set(f"k{i:04d}", value)
    info = store.info()
    assert info.evictions > 0
    assert info.extra["map_size"] <= 2 * 1024**2
    assert store.get_now("k0299") is not None  # the newest stays
    assert store.get_now("k0000") is None  # the oldest went first
    await store.close()


async def test_value_larger_than_max_disk_is_declined_and_evicts_nothing(tmp_path: Path) -> None:
    store = LMDBStore(str(tmp_path / "db"), map_size=256 * 1024, max_disk=256 * 1024)
    await store.set("small", b"still works")
    assert not await store.set("huge", os.urandom(1024 * 1024))  # it could never fit
    assert store.get_now("small") is not None and store.get_now("huge") is None
    assert store.evictions == 0
    await store.close()


async def test_another_process_reads_while_this_one_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    store = LMDBStore(path)
    await store.set("shared", b"hello from writer", codec=1)
    reader = textwrap.dedent(
        f"""
        from keymiss.stores.lmdb import LMDBStore
        s = LMDBStore({path!r})
        print(s.get_now("shared").value.decode())
        """
    )
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", reader], capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "hello from writer", out.stderr
    await store.set("shared", b"second")  # the writer still works while/after the reader attached
    assert store.get_now("shared").value == b"second"  # type: ignore[union-attr]
    await store.close()


@pytest.mark.reliability
async def test_stale_reader_slot_is_cleared_on_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reader killed mid-transaction leaves its slot behind while other processes keep the
    environment open (LMDB only resets the table when the first process opens it); keymiss clears
    such slots on start so they cannot pin old pages forever."""
    path = str(tmp_path / "db")
    store = LMDBStore(path)
    await store.set("k", b"v")
    await store.close()
    holder = textwrap.dedent(
        f"""
        import lmdb, sys
        env = lmdb.open({path!r}, max_dbs=4)
        txn = env.begin() if sys.argv[1] == "txn" else None
        print("ready", flush=True)
        sys.stdin.read()  # holds the environment (and the transaction) until the test is done
        """
    )
    keeper, victim = (
        subprocess.Popen(
            [sys.executable, "-c", holder, role], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for role in ("keep", "txn")
    )
    try:
        for proc in (keeper, victim):
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        with caplog.at_level(logging.INFO, logger="keymiss.lmdb"):
            store = LMDBStore(path)
        assert "cleared 1 stale LMDB reader slot" in caplog.text
        assert store.get_now("k") is not None
        await store.close()
    finally:
        for proc in (keeper, victim):
            proc.kill()
            proc.wait(10)


async def test_sequence_continues_after_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    store = LMDBStore(path, max_disk=4 * 1024**2)
    for i in range(10):
        await store.set(f"a{i}", b"v")
    await store.close()
    store = LMDBStore(path, max_disk=4 * 1024**2)
    await store.set("b0", b"v")
    await store.set("a0", b"w")  # overwrite moves a0 to the back of the eviction order
    assert await store.dbsize() == 11
    await store.close()


async def test_expired_key_read_is_purged_by_next_sweep(tmp_path: Path) -> None:
    from ..conftest import FakeClock

    clock = FakeClock()
    store = LMDBStore(str(tmp_path / "db"), clock=clock)
    await store.set("gone", b"v", ttl=1)
    await store.set("stays", b"v")
    clock.advance(2)
    assert store.get_now("gone") is None
    assert await store.dbsize() == 2  # still on disk until the sweep
    assert await store.sweep(limit=0) == 1  # purged from the read's note, without a walk
    assert await store.dbsize() == 1
    await store.close()


async def test_max_disk_eviction_spares_keymiss_records(tmp_path: Path) -> None:
    store = LMDBStore(str(tmp_path / "db"), map_size=512 * 1024, max_disk=2 * 1024**2)
    assert await store.set("keymiss:ctx:doc:{t}:1", b"context tokens")
    value = os.urandom(32 * 1024)
    for i in range(300):
        assert await store.set(f"k{i:04d}", value)
    assert store.info().evictions > 0
    assert store.get_now("keymiss:ctx:doc:{t}:1") is not None
    await store.close()


async def test_writes_are_refused_with_misconf_once_the_store_directory_is_deleted(tmp_path: Path) -> None:
    """LMDB keeps writing to the unlinked file and replies OK; everything would vanish on restart."""
    import shutil

    from keymiss.errors import ReplyError

    store = LMDBStore(str(tmp_path / "gone"), durable=False)
    try:
        assert await store.set("k", b"v")
        shutil.rmtree(tmp_path / "gone")
        with pytest.raises(ReplyError, match=r"^MISCONF keymiss: the LMDB store.s file"):
            await store.set("k2", b"v2")
        with pytest.raises(ReplyError, match=r"^MISCONF"):
            await store.delete(["k"])
        assert (await store.get("k")).value == b"v"  # type: ignore[union-attr]  # reads still answer
    finally:
        await store.close()


def test_a_damaged_store_file_is_named_as_such_at_open(tmp_path: Path) -> None:
    from keymiss.errors import StoreError

    path = tmp_path / "dmg"
    store = LMDBStore(str(path), durable=False)
    asyncio.run(store.set("k", b"v"))
    asyncio.run(store.close())
    data = path / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[: 2 * 4096] = b"\xff" * (2 * 4096)  # both meta pages
    data.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="looks damaged") as info:
        LMDBStore(str(path), durable=False)
    assert "move" in str(info.value) and "LMDB said" in str(info.value)


def test_lmdb_failures_say_what_to_do() -> None:
    from keymiss.stores.lmdbrecord import explain

    text = explain(
        lmdb.CorruptedError("MDB_CORRUPTED: Located page was wrong type"), "LMDB read failed", "/x"
    )
    assert "looks damaged" in text and "restore it from a copy" in text
    text = explain(lmdb.DiskError("Input/output error"), "LMDB write failed", "/nonexistent-dir")
    assert "full or failing" in text and "max_disk" in text
