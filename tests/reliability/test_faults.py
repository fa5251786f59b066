"""Crashes, poisoned stores, vanishing clients and floods: every scenario asserts its pass criteria."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import redis

from keymiss.stores.lmdb import LMDBStore

from ..server.conftest import both_fronts, start_server
from ..support import RawClient, eventually

WRITER = textwrap.dedent(
    """
    import asyncio, random, sys
    from keymiss.stores.lmdb import LMDBStore

    async def main():
        store = LMDBStore(sys.argv[1], map_size=256 * 1024)  # small: the map grows under the kills
        rng = random.Random(int(sys.argv[2]))
        i = int(sys.argv[3])
        while True:
            key = f"k{i}"
            await store.set(key, (key * rng.randint(1, 400)).encode(), codec=1)
            print(key, flush=True)
            i += 1

    asyncio.run(main())
    """
)


def test_lmdb_survives_50_kills_at_random_points(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    rng = random.Random(11)
    acked: list[str] = []
    for round_ in range(50):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, path, str(round_), str(len(acked))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        target = rng.randint(1, 40)
        for _ in range(target):
            line = proc.stdout.readline()
            assert line, "writer died on its own"
            acked.append(line.strip())
        time.sleep(rng.random() * 0.01)  # land the kill anywhere, also inside a write: chance is the point
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    store = LMDBStore(path)
    try:
        for key in acked:
            item = store.get_now(key)
            assert item is not None, key
            assert item.value.startswith(key.encode()) and item.codec == 1
        assert store.corrupt == 0
    finally:
        asyncio.run(store.close())


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_poisoned_redis_values_are_never_unpickled(tmp_path: Path, redis_standalone: Any) -> None:
    marker = tmp_path / "pwned"
    direct = redis.Redis(port=redis_standalone.port)
    node = start_server(tmp_path, "--store", f"redis://127.0.0.1:{redis_standalone.port}/0")
    try:
        payload = pickle.dumps(_Marker(str(marker)))
        direct.set("double:41", payload)  # written behind keymiss's back
        direct.set("double:42", os.urandom(64))
        r = redis.Redis(port=node.port)
        assert r.get("double:41") == payload  # served as-is, as Redis would; never interpreted
        assert len(r.get("double:42")) == 64
        assert r.get("double:43") == b"86"
        assert not marker.exists()
        r.close()
    finally:
        node.stop()
        direct.close()


def test_leader_client_disconnect_does_not_cancel_the_computation(tmp_path: Path) -> None:
    node = start_server(tmp_path)
    try:
        name = f"leader{time.monotonic_ns()}"
        key = f"gate:{name}"
        leader = RawClient(node.port)
        leader.send_raw(f"GET {key}\r\n".encode())
        node.wait_started(name)
        leader.close()  # the client that started the computation goes away, while it runs
        node.release(name)
        r = redis.Redis(port=node.port, socket_timeout=5)
        assert r.get(key) == f"gated result for {key}".encode()
        assert r.get(key) == f"gated result for {key}".encode()
        stats = {v["pattern"]: v for k, v in r.info("keymiss").items() if k.startswith("keyspace_")}
        assert stats["gate:*"]["computations"] == 1
        r.close()
        assert "Traceback" not in node.log
    finally:
        node.stop()


def _flood(port: int, first: int, count: int, batch: int, tally: dict[str, int]) -> None:
    """Pipelines of GETs for distinct keys of a 50 ms keyspace, read back reply by reply."""
    with RawClient(port, timeout=30) as c:
        for start in range(first, first + count, batch):
            c.send_raw(b"".join(b"GET quick:flood%d\r\n" % n for n in range(start, start + batch)))
            for reply in c.replies_bytes(batch):
                if reply.startswith(b"-BUSY"):
                    tally["busy"] += 1
                elif reply.startswith(b"$"):
                    tally["ok"] += 1
                else:
                    tally["other"] += 1


def test_unique_key_flood_gets_busy_fast_and_hot_keys_keep_hitting(tmp_path: Path) -> None:
    """A flood of distinct keys against a 50 ms keyspace: at most 8 computations run, the rest get
    -BUSY at once (thousands of requests a second are answered), hot keys keep hitting, memory stays
    bounded."""
    import psutil

    node = start_server(tmp_path, "--max-in-flight", "8")
    try:
        rss = psutil.Process(node.proc.pid)
        hot = redis.Redis(port=node.port, socket_timeout=5)
        for i in range(20):
            hot.set(f"hot:{i}", "v")
        baseline = rss.memory_info().rss
        tally = {"busy": 0, "ok": 0, "other": 0}
        # 64 connections: more concurrent misses than the 8 computations allowed
        threads = [
            threading.Thread(target=_flood, args=(node.port, i * 100, 100, 20, tally)) for i in range(64)
        ]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        hits = asked = 0
        peak_in_flight = 0
        while any(t.is_alive() for t in threads) and time.monotonic() - t0 < 60:
            hits += hot.get(f"hot:{asked % 20}") == b"v"
            asked += 1
            if asked % 10 == 0:
                peak_in_flight = max(peak_in_flight, hot.info("keymiss")["keymiss_in_flight"])
        for t in threads:
            t.join(30)
        rate = 6400 / (time.monotonic() - t0)
        assert tally["other"] == 0 and tally["busy"] + tally["ok"] == 6400
        assert tally["busy"] > 0 and tally["ok"] >= 8
        assert rate > 1000, rate  # refused at once, not queued behind the 50 ms computations
        assert peak_in_flight <= 8
        assert asked > 20 and hits / asked >= 0.9
        assert rss.memory_info().rss < baseline + 32 * 1024**2
        assert hot.info("keymiss")["keymiss_in_flight"] == 0
        hot.close()
    finally:
        node.stop()


@both_fronts
def test_malformed_input_leaves_no_traceback_and_pings_still_answer(tmp_path: Path, front: str) -> None:
    node = start_server(tmp_path, front=front)
    corpus = [
        b"*-10\r\n",
        b"*3000000000\r\n",
        b"*1\r\n$blabla\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$2000000000\r\n",
        b"*1\r\nx\r\n",
        b'SET "a\r\n',
        b"\x00" * 70_000,
        b"PING\nPING\r\nPING\n",
        b"*1\r\n$4\r\nPING\n\n",
        b"*2\r\n$3\r\nGET\r\n*1\r\n$1\r\na\r\n",
        b"\xff\xfe\r\n",
        b"*1\r\n%1\r\n",
    ]
    try:
        for payload in corpus:
            with RawClient(node.port) as c:
                for i in range(0, len(payload), 4096):
                    c.send_raw(payload[i : i + 4096])
                with contextlib.suppress(TimeoutError, ConnectionError):
                    c.reply_bytes(timeout=1.0)  # an error line, or nothing for ignored input
            r = redis.Redis(port=node.port, socket_timeout=2)
            assert r.ping()
            r.close()
        assert "Traceback" not in node.log
    finally:
        node.stop()


def test_slowloris_clients_are_closed_and_memory_stays_bounded(tmp_path: Path) -> None:
    import psutil

    node = start_server(tmp_path, "--request-seconds", "2")
    proc = psutil.Process(node.proc.pid)
    try:
        hot = redis.Redis(port=node.port, socket_timeout=5)
        hot.set("hot", "v")
        baseline = proc.memory_info().rss
        socks = []
        for _ in range(200):  # each declares a 1 MB bulk, then trickles
            s = RawClient(node.port)
            s.send_raw(b"*3\r\n$3\r\nSET\r\n$4\r\nslow\r\n$1048576\r\n" + b"x" * 100)
            socks.append(s)
        t0 = time.monotonic()
        hits = closed = 0

        def all_closed() -> bool:
            """One more byte from every slow client (a hot hit beside them): are all closed yet?"""
            nonlocal hits, closed
            hits += hot.get("hot") == b"v"
            closed = 0
            for s in socks:
                try:
                    s.send_raw(b"x")
                except OSError:
                    closed += 1
            return closed == len(socks)

        with contextlib.suppress(AssertionError):  # the assertion below says how many were not
            eventually(all_closed, timeout=8, interval=0.1)
        assert closed == len(socks), f"{closed} of {len(socks)} slow clients closed"
        assert time.monotonic() - t0 < 6  # within the 2 s request limit plus the watchdog's tick
        assert proc.memory_info().rss < baseline + 32 * 1024**2
        assert hits > 10 and hot.get("hot") == b"v"
        assert hot.info("stats")["slow_request_disconnections"] == len(socks)
        hot.close()
        for s in socks:
            s.close()
    finally:
        node.stop()


def test_memory_store_rss_stays_near_its_budget() -> None:
    script = textwrap.dedent(
        """
        import random, psutil, asyncio
        from keymiss.stores.memory import MemoryStore
        budget = 64 * 1024**2
        store = MemoryStore(budget, eviction="tinylfu")
        base = psutil.Process().memory_info().rss
        rng = random.Random(1)
        written = 0
        i = 0
        while written < 10 * budget:
            size = int(rng.lognormvariate(9, 1.3)) % 400_000
            store.set_now(f"k{i}", rng.randbytes(size))
            written += size
            i += 1
            assert store.used_bytes <= budget
        print(psutil.Process().memory_info().rss - base)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.strip())
    assert grown < 64 * 1024**2 + 30 * 1024**2, grown
