"""The app the server tests serve: keyspaces that compute, fail, hang, batch and parse templates.

Gated handlers (``gate:<name>``, ``block:<name>``, an ``edition`` refresh) run until the test lets
them finish: each says it started by creating ``<name>.started`` in ``$KEYMISS_TEST_GATES`` and
returns once ``<name>.release`` is there (``ServerProcess.wait_started`` and ``release``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from keymiss import Keymiss
from tests.support import aeventually, eventually

app = Keymiss(store="memory", max_memory="64MB")


def _gate(name: str) -> tuple[Path, Path]:
    gates = Path(os.environ["KEYMISS_TEST_GATES"])
    (gates / f"{name}.started").touch()
    return gates / f"{name}.release", gates


async def released(name: str) -> None:
    """Say ``name`` started, then wait until the test releases it."""
    release, _ = _gate(name)
    await aeventually(release.exists, timeout=60, interval=0.005, message=f"release of {name!r}")


def released_sync(name: str) -> None:
    """``released`` for a sync handler, blocking its worker thread."""
    release, _ = _gate(name)
    eventually(release.exists, timeout=60, interval=0.005, message=f"release of {name!r}")


@app.keyspace("double:*")
def double(key: str) -> str:
    return str(2 * int(key.split(":", 1)[1]))


@app.keyspace("slow:*")
async def slow(key: str) -> str:
    await asyncio.sleep(0.3)  # long enough for many clients to ask while it runs
    return f"slow result for {key}"


@app.keyspace("gate:*")
async def gate(key: str) -> str:
    """A computation that runs until the test releases it."""
    await released(key.split(":", 1)[1])
    return f"gated result for {key}"


@app.keyspace("block:*")
def block(key: str) -> str:
    released_sync(key.split(":", 1)[1])  # a CPU-bound model in a worker thread, until released
    return "blocked"


@app.keyspace("fail:*")
def fail(key: str) -> str:
    raise ValueError(f"cannot compute {key}")


@app.keyspace("hang:*", timeout=0.2)
async def hang(key: str) -> str:
    await asyncio.Event().wait()  # never set: it hangs until its timeout cancels it
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


@app.keyspace("quick:*")
async def quick(key: str) -> str:
    await asyncio.sleep(0.05)  # a small model: 50 ms
    return f"quick {key}"


@app.keyspace("queue:*", concurrency=1)
async def queue(key: str) -> str:
    await asyncio.sleep(0.06)  # one at a time: readers of several keys wait their turn
    return f"queued {key}"


@app.keyspace("stuck:*", timeout=0.2, concurrency=2)
def stuck(key: str) -> str:
    threading.Event().wait(60)  # a sync handler that never comes back in time: its thread stays busy
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
    await asyncio.to_thread(threading.Event().wait, 60)  # a blocking call in the default executor, stuck
    return "never"


@app.keyspace("fresh:*", ttl=0.6, early_refresh=1.0)
async def fresh(key: str) -> str:
    """A hot answer refreshed before it expires (XFetch): its readers never wait at expiry."""
    await asyncio.sleep(0.1)  # the computation time XFetch weighs
    return f"fresh at {time.time():.3f}"


_editions = 0


@app.keyspace("edition:*", ttl=0.3, stale=30)
async def edition(key: str) -> str:
    """Served stale for up to 30 s past its TTL while one refresh runs (``edition<n>`` released)."""
    global _editions
    _editions += 1
    if _editions > 1:
        await released(f"edition{_editions}")  # the refresh runs until the test releases it
    return f"edition {_editions}"


def _model_version() -> str:
    """The version a test switches at run time by rewriting a file (read on every check)."""
    path = os.environ.get("KEYMISS_TEST_VERSION_FILE")
    return Path(path).read_text().strip() if path else "v1"


@app.keyspace("model:*", version=_model_version)
def model(key: str) -> str:
    """Values computed under a version: after a switch, none computed before is served."""
    return f"{key} under {_model_version()}"
