"""The app the server tests serve: keyspaces that compute, fail, hang, batch and parse templates."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from keymiss import Keymiss

app = Keymiss(store="memory", max_memory="64MB")


@app.keyspace("double:*")
def double(key: str) -> str:
    return str(2 * int(key.split(":", 1)[1]))


@app.keyspace("slow:*")
async def slow(key: str) -> str:
    await asyncio.sleep(0.3)
    return f"slow result for {key}"


@app.keyspace("block:*")
def block(key: str) -> str:
    time.sleep(1.0)  # a CPU-bound model in a worker thread
    return "blocked"


@app.keyspace("fail:*")
def fail(key: str) -> str:
    raise ValueError(f"cannot compute {key}")


@app.keyspace("hang:*", timeout=0.2)
async def hang(key: str) -> str:
    await asyncio.sleep(30)
    return "never"


@app.keyspace("qa{<tag>}_<context>_<question>", ttl=100)
async def qa(tag: str, context: str, question: str) -> dict[str, str]:
    return {"tag": tag, "context": context, "question": question}


@app.keyspace("batch:*", batch_size=16, batch_wait_ms=20)
def batch(keys: list[str]) -> list[str]:
    return [f"{k}:{len(keys)}" for k in keys]


@app.keyspace("big:*")
def big(key: str) -> bytes:
    return b"x" * (100 * 1024)


@app.keyspace("crawl:*")
async def crawl(key: str) -> str:
    await asyncio.sleep(1.5)  # a long model run
    return f"crawled {key}"


@app.keyspace("quick:*")
async def quick(key: str) -> str:
    await asyncio.sleep(0.05)  # a small model: 50 ms
    return f"quick {key}"


@app.keyspace("stuck:*", timeout=0.2, concurrency=2)
def stuck(key: str) -> str:
    time.sleep(60)  # a sync handler that never comes back in time: its thread stays busy
    return "never"


@app.keyspace("secret:*")
def secret(key: str) -> str:
    raise RuntimeError("token=s3cr3t in /srv/private/model.bin")


@app.keyspace("sysexit:*")
def sysexit(key: str) -> str:
    raise SystemExit("a handler must not stop the server")


@app.keyspace("cancelled:*")
async def cancelled(key: str) -> str:
    raise asyncio.CancelledError("a handler's own cancellation")


@app.keyspace("tothread:*", timeout=0.3)
async def tothread(key: str) -> str:
    await asyncio.to_thread(time.sleep, 60)  # a blocking call in the default executor, stuck
    return "never"


@app.keyspace("fresh:*", ttl=0.6, early_refresh=1.0)
async def fresh(key: str) -> str:
    """A hot answer refreshed before it expires (XFetch): its readers never wait at expiry."""
    await asyncio.sleep(0.1)
    return f"fresh at {time.time():.3f}"


_editions = 0


@app.keyspace("edition:*", ttl=0.3, stale=30)
async def edition(key: str) -> str:
    """Served stale for up to 30 s past its TTL while one refresh runs."""
    global _editions
    _editions += 1
    await asyncio.sleep(0.01 if _editions == 1 else 1.5)  # the refresh is the slow one
    return f"edition {_editions}"


def _model_version() -> str:
    """The version a test switches at run time by rewriting a file (read on every check)."""
    path = os.environ.get("KEYMISS_TEST_VERSION_FILE")
    return Path(path).read_text().strip() if path else "v1"


@app.keyspace("model:*", version=_model_version)
def model(key: str) -> str:
    """Values computed under a version: after a switch, none computed before is served."""
    return f"{key} under {_model_version()}"
