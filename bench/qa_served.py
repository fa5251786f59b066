"""Served QA misses for ``bench/qa.py``: ``keymiss serve --model`` in a subprocess, many clients.

Each server is the default front end (embedded Valkey, the module, keymiss's worker) with the
contexts ingested at start. A round asks every (context, question) pair once, with a suffix that
makes every key of the round a miss; the caller alternates these rounds with the pipeline's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def qa_key(ctx: str, question: str) -> str:
    return f"bertqa{{{ctx.split('{')[1].split('}')[0]}}}_{ctx}_{question}"


class Served:
    """One ``keymiss serve --model`` process with the bench's contexts."""

    def __init__(self, model: str, backend: str, contexts: dict[str, str], workdir: str) -> None:
        corpus = os.path.join(workdir, "contexts.jsonl")
        with open(corpus, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"key": k, "text": t}) + "\n" for k, t in contexts.items())
        self.port = free_port()
        self.log_path = os.path.join(workdir, f"serve-{backend}.log")
        cmd = [sys.executable, "-m", "keymiss", "serve", "--model", model, "--corpus", corpus]
        cmd += ["--port", str(self.port), "--qa-backend", backend, "--max-clients", "256"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.backend = backend
        self.first = next(iter(contexts))

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the reader is loaded and the contexts are in (a warm-up question is answered)."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keymiss serve exited: {self.log()[-2000:]}")
            try:
                r = redis.Redis(port=self.port, socket_timeout=60)
                r.get(qa_key(self.first, "What warms the reader up?"))
                r.close()
                return
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"keymiss serve not ready in {timeout}s: {self.log()[-2000:]}")

    def path(self) -> str:
        """What the server says it runs (its startup log line)."""
        import re

        m = re.search(r"QA reader: .* on (\w+) \(.*\), ([\w-]+) \(", self.log())
        return f"{m.group(1)} {m.group(2)}" if m else self.backend

    def round(self, pairs: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
        """Every pair asked once by ``concurrency`` clients, each on its own connection."""
        return asyncio.run(_round(self.port, pairs, concurrency))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _round(port: int, pairs: list[tuple[str, str]], concurrency: int) -> dict[str, Any]:
    import redis.asyncio as aredis

    clients = [aredis.Redis(port=port, socket_timeout=300) for _ in range(concurrency)]
    todo = list(enumerate(pairs))
    answers: list[str] = [""] * len(pairs)
    latencies: list[float] = []

    async def client(r: Any) -> None:
        while todo:
            i, (ctx, q) = todo.pop()
            t0 = time.perf_counter()
            value = await r.get(qa_key(ctx, q))
            latencies.append(time.perf_counter() - t0)
            answers[i] = value.decode() if value is not None else ""

    for r in clients:
        await r.ping()
    t0 = time.perf_counter()
    await asyncio.gather(*(client(r) for r in clients))
    elapsed = time.perf_counter() - t0
    for r in clients:
        await r.aclose()
    return {"answers": answers, "time": elapsed, "lat": latencies}
