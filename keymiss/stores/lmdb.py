"""A persistent, memory-mapped store on LMDB.

Why LMDB: reads are a B-tree walk in a shared memory map (no syscalls, no copies until the value is
handed out), several processes may read the same file, and a committed write transaction survives a
``kill -9`` of the writer because LMDB never overwrites live pages.

Each record is ``header | [full key] | [version tag] | value``. The header holds a magic, the codec
tag, the expiry, an insertion sequence number (the eviction order when ``max_disk`` is set) and a
CRC32 over the key, the header fields, the version tag of a computed value and the value: a record
that was truncated, copied from another key or written by something else is detected and read as a
miss, never interpreted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lmdb

from keymiss.errors import ReplyError, StoreError
from keymiss.sizes import format_size
from keymiss.stores.base import (
    PINNED_PREFIX,
    EvictHook,
    Item,
    LocalStore,
    StoreInfo,
    Write,
    superseded_version,
)
from keymiss.stores.lmdbrecord import (
    DATA_DB,
    HEADER,
    LONG_KEY_PREFIX,
    MAGIC,
    ORDER_DB,
    SEQ,
    db_key,
    encode_key,
    explain,
    pack,
    unpack,
)

log = logging.getLogger("keymiss.lmdb")


class LMDBStore(LocalStore):
    """Persistent store; reads run on the caller's thread, writes on one writer thread when durable."""

    def __init__(
        self,
        path: str,
        *,
        map_size: int = 256 * 1024**2,
        max_disk: int | None = None,
        durable: bool = True,
        clock: Callable[[], float] = time.time,
        on_evict: EvictHook | None = None,
        max_value: int = 64 * 1024**2,
    ) -> None:
        super().__init__(on_evict)
        self.path = path
        self.url = f"lmdb:{path}"
        self.max_disk = max_disk
        #: the largest value one key may hold: a value is read, checked and rewritten whole (SETBIT
        #: or APPEND on it copies it), so one client's 512 MB string must not hold every reader
        self.max_value = max_value
        self.durable = durable
        self.corrupt = 0
        self.clock = clock
        os.makedirs(path, exist_ok=True)
        if max_disk is not None:
            map_size = min(map_size, max_disk)
        try:
            self._env = lmdb.open(
                path,
                map_size=map_size,
                max_dbs=4,
                # durable writes are synced by hand after each commit (``_write_now``), so that
                # the commands of one EXEC can share one fsync (``begin_batch``)
                sync=False,
                metasync=False,
                readahead=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise StoreError(explain(exc, f"cannot open the LMDB store at {path!r}", path)) from exc
        stale = self._env.reader_check()  # reader slots left by killed processes
        if stale:
            log.info("cleared %d stale LMDB reader slot(s) in %s", stale, path)
        self._data = self._env.open_db(DATA_DB)
        self._order = self._env.open_db(ORDER_DB)
        self._max_key = self._env.max_key_size()
        self._resize_lock = threading.Lock()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="keymiss-lmdb-writer") if durable else None
        with self._env.begin(db=self._order) as txn:
            cur = txn.cursor()
            self._seq = SEQ.unpack(cur.key())[0] + 1 if cur.last() else 1
        self._sweep_after: bytes | None = None
        self._expired_seen: set[str] = set()
        self._closed = False
        self._data_file = os.path.join(path, "data.mdb")
        self._identity = self._file_identity()
        self._gone_logged = False
        self._batched = 0  # EXECs in progress whose writes share one fsync at their end
        self._loop: asyncio.AbstractEventLoop | None = None  # the writer's callers' (``_notify``)
        self._loop_thread = threading.get_ident()

    def db_key(self, kb: bytes) -> bytes:
        return db_key(kb, self._max_key)

    def _bad_record(self, key: str) -> None:
        self.corrupt += 1
        log.warning("ignoring a stored value for %r that is not a valid keymiss record", key[:200])

    # --- reads ---------------------------------------------------------------------------------
    def _read(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn`` in a read transaction; adopts a map another process has grown."""
        for _ in range(3):
            try:
                with self._resize_lock, self._env.begin(db=self._data) as txn:
                    return fn(txn)
            except lmdb.Error as exc:
                self._adopt_resize(exc, "LMDB read failed")
        raise StoreError("LMDB map keeps being resized by another process")

    def _adopt_resize(self, exc: lmdb.Error, doing: str) -> None:
        """Another process grew the map: adopt its size and let the caller try again. Any other
        LMDB error is a ``StoreError`` that says what to do."""
        if not isinstance(exc, lmdb.MapResizedError):
            raise StoreError(explain(exc, doing, self.path)) from exc
        with self._resize_lock:
            self._env.set_mapsize(0)

    def _live(self, key: str, kb: bytes, raw: bytes | None, now: float) -> Item | None:
        """The item a read record holds, or None: absent, not a valid record (counted), or expired
        (noted for the next sweep to purge, off the read path)."""
        if raw is None:
            return None
        parsed = unpack(kb, raw)
        if parsed is None:
            self._bad_record(key)
            return None
        item = parsed[1]
        if item.expires_at is not None and item.expires_at <= now:
            if len(self._expired_seen) < 10_000:
                self._expired_seen.add(key)
            return None
        return item

    def get_now(self, key: str) -> Item | None:
        kb = encode_key(key)
        return self._live(key, kb, self._read(lambda txn: txn.get(self.db_key(kb))), self.clock())

    async def get_many(self, keys: Sequence[str]) -> list[Item | None]:
        now = self.clock()
        raws = self._read(
            lambda txn: [(k, kb, txn.get(self.db_key(kb))) for k in keys for kb in (encode_key(k),)]
        )
        return [self._live(key, kb, raw, now) for key, kb, raw in raws]

    # --- writes --------------------------------------------------------------------------------
    @property
    def sync_writes(self) -> bool:  # type: ignore[override]
        # inside an EXEC's batch no write waits for the disk: they run inline, one fsync at the end
        return self._writer is None or self._batched > 0

    async def _write(self, fn: Any, *args: Any) -> Any:
        if self._writer is None:
            return self._write_now(fn, *args)
        if self._closed:
            raise StoreError("the LMDB store is closed")
        loop = self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        return await loop.run_in_executor(self._writer, self._write_now, fn, *args)

    def _notify(self, keys: list[str]) -> None:
        """On the writer thread, ``on_change`` is handed to the loop: it runs there before this
        write's own result (queued after it), so before the client's command sees it landed."""
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(super()._notify, keys)
        else:
            super()._notify(keys)

    def begin_batch(self) -> None:
        """Writes from now until ``end_batch`` are not synced one by one (an EXEC's commands)."""
        self._batched += 1

    async def end_batch(self) -> None:
        """One fsync for the batch's writes; the EXEC replies after it."""
        self._batched -= 1
        if self.durable and not self._batched and not self._closed:
            await self._write(lambda: None)  # runs after the batch's writes, then syncs

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._data_file)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _check_files(self) -> None:
        """Refuse writes once the store's files are gone (the directory was deleted or replaced while
        keymiss ran): LMDB would go on writing to the unlinked file, replying OK, and everything
        written would vanish at the next start. Redis answers a failing persistence with MISCONF."""
        if self._identity is not None and self._file_identity() == self._identity:
            return
        if not self._gone_logged:
            self._gone_logged = True
            log.error("the LMDB store's file %s is gone or replaced: refusing writes", self._data_file)
        raise ReplyError(
            f"MISCONF keymiss: the LMDB store's file {self._data_file} was removed or replaced while "
            "keymiss ran; writes are refused so that none is silently lost. Restore it or restart keymiss."
        )

    def _write_now(self, fn: Any, *args: Any) -> Any:
        """Run a write transaction, growing the map (or evicting under ``max_disk``) when it is full."""
        if self._closed:
            raise StoreError("the LMDB store is closed")
        self._check_files()
        for _ in range(64):
            try:
                result = fn(*args)
                if self.durable and not self._batched:
                    self._env.sync(True)  # on disk before the reply, as sync=True would be
                return result
            except lmdb.MapFullError:
                self._make_room()
            except lmdb.Error as exc:
                self._adopt_resize(exc, "LMDB write failed")
        raise StoreError("LMDB store is full and nothing more can be evicted")

    def _make_room(self) -> None:
        size = self._env.info()["map_size"]
        if self.max_disk is None or size < self.max_disk:
            new = size * 2 if self.max_disk is None else min(size * 2, self.max_disk)
            with self._resize_lock:
                self._env.set_mapsize(new)
            log.info("LMDB map grown to %s", format_size(new))
            return
        with self._env.begin(write=True) as txn:
            entries = txn.stat(self._data)["entries"]
            if entries == 0:
                raise StoreError(f"value does not fit in max_disk={format_size(self.max_disk)}")
            victims = max(16, entries // 50)
            cur = txn.cursor(self._order)
            n = 0
            gone: list[bytes] = []
            while n < victims and cur.first():
                gone.append(cur.value())
                txn.delete(gone[-1], db=self._data)
                cur.delete()
                n += 1
        self.evictions += n
        if self.on_evict is not None:
            for raw in gone:
                self.on_evict(raw.decode("utf-8", "surrogateescape"))

    def fits(self, key: str, size: int) -> bool:
        if size > self.max_value:
            return False
        return self.max_disk is None or len(encode_key(key)) + size <= self.max_disk // 2

    def _set(self, writes: Sequence[Write], nx: bool, xx: bool, keep_ttl: bool) -> list[bool]:
        now = self.clock()
        results: list[bool] = []
        seq = self._seq
        with self._env.begin(write=True, db=self._data) as txn:
            for w in writes:
                kb = encode_key(w.key)
                if not self.fits(w.key, len(w.value)):
                    # it could never fit beside the B-tree's pages: decline it rather than evict
                    # the whole cache trying
                    results.append(False)
                    continue
                dbk = self.db_key(kb)
                raw = txn.get(dbk)
                old = None if raw is None else unpack(kb, raw)
                alive = old is not None and (old[1].expires_at is None or old[1].expires_at > now)
                if ((nx or w.nx) and alive and not (old is not None and superseded_version(old[1], w))) or (
                    xx and not alive
                ):
                    results.append(False)
                    continue
                if keep_ttl and alive and old is not None:
                    expires_at = old[1].expires_at
                else:
                    expires_at = None if w.ttl is None else now + w.ttl
                if old is not None:
                    txn.delete(SEQ.pack(old[2]), db=self._order)
                txn.put(dbk, pack(kb, dbk, w.value, w.codec, expires_at, seq, w.version))
                if not w.key.startswith(PINNED_PREFIX):  # keymiss's own records are never evicted
                    txn.put(SEQ.pack(seq), dbk, db=self._order)
                seq += 1
                results.append(True)
        self._seq = seq
        return results

    def _delete(self, keys: Iterable[str]) -> int:
        n = 0
        now = self.clock()
        with self._env.begin(write=True, db=self._data) as txn:
            for key in keys:
                kb = encode_key(key)
                dbk = self.db_key(kb)
                raw = txn.get(dbk)
                if raw is None:
                    continue
                old = unpack(kb, raw)
                if old is not None:
                    txn.delete(SEQ.pack(old[2]), db=self._order)
                    if old[1].expires_at is None or old[1].expires_at > now:
                        n += 1
                txn.delete(dbk)
        return n

    def _set_expiry(self, key: str, expires_at: float | None) -> bool:
        now = self.clock()
        with self._env.begin(write=True, db=self._data) as txn:
            kb = encode_key(key)
            dbk = self.db_key(kb)
            raw = txn.get(dbk)
            old = None if raw is None else unpack(kb, raw)
            if old is None or (old[1].expires_at is not None and old[1].expires_at <= now):
                return False
            item = old[1]
            txn.put(dbk, pack(kb, dbk, item.value, item.codec, expires_at, old[2], item.version))
        return True

    def _sweep(self, limit: int) -> int:
        now_ms = self.clock() * 1000
        n = 0
        noted, self._expired_seen = self._expired_seen, set()
        with self._env.begin(write=True, db=self._data) as txn:
            for key in noted:  # keys a read found expired: purge exactly those first
                kb = encode_key(key)
                dbk = self.db_key(kb)
                raw = txn.get(dbk)
                old = None if raw is None else unpack(kb, raw)
                if old is not None and old[1].expires_at is not None and old[1].expires_at * 1000 <= now_ms:
                    txn.delete(SEQ.pack(old[2]), db=self._order)
                    txn.delete(dbk)
                    n += 1
            cur = txn.cursor()
            found = cur.set_range(self._sweep_after) if self._sweep_after else cur.first()
            seen = 0
            while found and seen < limit:
                raw = cur.value()
                seen += 1
                if len(raw) >= HEADER.size:
                    magic, _c, _f, _crc, exp, seq = HEADER.unpack_from(raw)
                    if magic == MAGIC and exp and exp <= now_ms:
                        txn.delete(SEQ.pack(seq), db=self._order)
                        found = cur.delete()  # moves to the next record
                        n += 1
                        continue
                found = cur.next()
            self._sweep_after = cur.key() if found else None
        self.expired += n
        return n

    async def sweep(self, limit: int = 10_000) -> int:
        """Purge keys reads found expired, then walk up to ``limit`` records for the rest."""
        result: int = await self._write(self._sweep, limit)
        return result

    async def flush(self) -> None:
        def drop() -> None:
            with self._env.begin(write=True) as txn:
                txn.drop(self._data, delete=False)
                txn.drop(self._order, delete=False)

        await self._write(drop)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        self._env.close()

    # --- introspection -------------------------------------------------------------------------
    def _len(self) -> int:
        """Keys but keymiss's own records (which the order index leaves out, as SCAN does)."""
        n: int = self._read(lambda txn: txn.stat(self._order)["entries"])
        return n

    def _scan_from(self, cursor: int, count: int) -> tuple[list[str], int]:
        """By insertion order (the order index): a rewritten key gets a later sequence number, so a
        key present for the whole scan is met at least once; the cursor is the next number."""
        keys: list[str] = []
        now = self.clock()
        nxt = 0
        with self._resize_lock, self._env.begin(db=self._order) as txn:
            cur = txn.cursor(db=self._order)
            found = cur.set_range(SEQ.pack(cursor))
            seen = 0
            while found and seen < count:
                seq, dbk = SEQ.unpack(cur.key())[0], cur.value()
                raw = txn.get(dbk, db=self._data)
                parsed = (
                    None if raw is None else unpack(None if dbk.startswith(LONG_KEY_PREFIX) else dbk, raw)
                )
                if parsed is not None and (parsed[1].expires_at is None or parsed[1].expires_at > now):
                    keys.append(parsed[0].decode("utf-8", "surrogateescape"))
                nxt = seq + 1
                seen += 1
                found = cur.next()
        return keys, (nxt if found else 0)

    def _scan_start(self) -> Any:
        return b""

    def _scan_step(self, state: Any, count: int) -> tuple[list[str], Any, bool]:
        keys: list[str] = []
        now = self.clock()
        last = state
        with self._resize_lock, self._env.begin(db=self._data) as txn:
            cur = txn.cursor()
            found = cur.set_range(state) if state else cur.first()
            if found and state and cur.key() == state:
                found = cur.next()
            while found and len(keys) < count:
                dbk, raw = cur.key(), cur.value()
                last = dbk
                parsed = unpack(None if dbk.startswith(LONG_KEY_PREFIX) else dbk, raw)
                if parsed is not None and (parsed[1].expires_at is None or parsed[1].expires_at > now):
                    keys.append(parsed[0].decode("utf-8", "surrogateescape"))
                found = cur.next()
        return keys, last, not found

    def info(self) -> StoreInfo:
        if self._closed:  # the environment is gone: nothing to read, nothing to fail on
            return StoreInfo(store=self.url, max_bytes=self.max_disk or 0, extra={"closed": True})
        env_info = self._env.info()
        stat = self._env.stat()
        used = (env_info["last_pgno"] + 1) * stat["psize"]
        return StoreInfo(
            store=self.url,
            used_bytes=used,
            max_bytes=self.max_disk or env_info["map_size"],
            keys=self._len(),
            evictions=self.evictions,
            expired=self.expired,
            eviction_policy="oldest" if self.max_disk else "none",
            extra={
                "used_human": format_size(used),
                "map_size": env_info["map_size"],
                "corrupt": self.corrupt,
                "durable": self.durable,
            },
        )
