"""GET hits over the wire: keymiss serve against redis-server, measured side by side.

Starts, on free loopback ports, ``redis-server`` (the baseline), a plain ``valkey-server`` (the
embedded binary without the module: what the module costs), ``keymiss serve`` with its default
front end (the embedded Valkey with the module, workers in process), and ``keymiss serve --server
python`` (memory store, and LMDB). The benchmark's keys form a registered keyspace
(``bench/hits_app.py``), so every GET is a hit the module's filter looks at. It preloads the same
100k keys into each, runs ``redis-benchmark -t get -r 100000 -c 50`` with ``-P 1`` and ``-P 16``
against each, and prints ops/s, p50/p99 and the ratio to redis-server.

Run: ``python bench/resp_hits.py`` (``--requests 200000`` for a shorter run). Needs ``redis-server``
and ``redis-benchmark`` (Debian: redis-server, redis-tools).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextmanager
def running(cmd: list[str], port: int) -> Iterator[int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        wait_port(port, proc)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def preload(port: int, keys: int, value: bytes) -> None:
    """SET key:%012d for every key the benchmark's -r will ask for, pipelined."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        batch = []
        for i in range(keys):
            key = b"key:%012d" % i
            batch.append(
                b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(key), key, len(value), value)
            )
            if len(batch) == 1000 or i == keys - 1:
                s.sendall(b"".join(batch))
                expected = 5 * len(batch)
                got = b""
                while len(got) < expected:
                    got += s.recv(65536)
                assert got == b"+OK\r\n" * len(batch), got[:100]
                batch = []


def bench(port: int, requests: int, pipeline: int, clients: int, keys: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "redis-benchmark",
            "-p",
            str(port),
            "-t",
            "get",
            "-n",
            str(requests),
            "-r",
            str(keys),
            "-c",
            str(clients),
            "-P",
            str(pipeline),
            "--csv",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    ).stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    row = rows[-1]
    return {
        "rps": float(row["rps"]),
        "p50": float(row["p50_latency_ms"]),
        "p99": float(row["p99_latency_ms"]),
    }


def _valkey_binary() -> str | None:
    from keymiss.valkey.serverconf import find_binary

    binary, _ = find_binary()
    return binary.path if binary else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipelines", default="1,16")
    args = parser.parse_args(argv)
    for tool in ("redis-server", "redis-benchmark"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install redis-server redis-tools)", file=sys.stderr)
            return 2
    pipelines = [int(p) for p in args.pipelines.split(",")]
    value = b"x" * 3
    results: dict[tuple[str, int], dict[str, float]] = {}
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    redis_version = re.search(r"v=(\S+)", version)
    with tempfile.TemporaryDirectory() as tmp:
        targets = {
            "redis-server": lambda port: [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ],
            "keymiss (default)": lambda port: [
                sys.executable,
                "-m",
                "keymiss",
                "--log-level",
                "WARNING",
                "serve",
                "--app",
                "bench.hits_app:app",
                "--port",
                str(port),
            ],
            "keymiss python memory": lambda port: [
                sys.executable,
                "-m",
                "keymiss",
                "--log-level",
                "WARNING",
                "serve",
                "--server",
                "python",
                "--app",
                "bench.hits_app:app",
                "--port",
                str(port),
                "--store",
                "memory",
                "--max-memory",
                "1GB",
            ],
            "keymiss python lmdb": lambda port: [
                sys.executable,
                "-m",
                "keymiss",
                "--log-level",
                "WARNING",
                "serve",
                "--server",
                "python",
                "--app",
                "bench.hits_app:app",
                "--port",
                str(port),
                "--store",
                f"lmdb:{tmp}/lmdb",
            ],
        }
        valkey = _valkey_binary()
        if valkey:
            targets["valkey-server (no module)"] = lambda port: [
                valkey,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
            ]
        for name, make in targets.items():
            port = free_port()
            with running(make(port), port):
                preload(port, args.keys, value)
                for p in pipelines:
                    results[(name, p)] = bench(port, args.requests, p, args.clients, args.keys)
                    print(f"  {name:16} -P {p:<3} {results[(name, p)]['rps']:>12,.0f} ops/s", file=sys.stderr)

    print(
        f"# GET hits over RESP: keymiss vs redis-server {redis_version.group(1) if redis_version else ''}\n"
    )
    print(
        f"redis-benchmark -t get -n {args.requests} -r {args.keys} -c {args.clients}; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} cores\n"
    )
    print("| server | -P | ops/s | p50 ms | p99 ms | × redis-server |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, p), r in sorted(
        results.items(), key=lambda kv: (kv[0][1], kv[0][0] != "redis-server", kv[0][0])
    ):
        ratio = r["rps"] / results[("redis-server", p)]["rps"]
        print(f"| {name} | {p} | {r['rps']:,.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
