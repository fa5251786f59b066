"""The embedded default app served by the README's main command (``--app keymiss.apps.examples:app``).

Its functions stand in for models, so the cache's behaviour shows without any weights on disk.
"""

from __future__ import annotations

import hashlib
import time

from keymiss.api import Keymiss

app = Keymiss(store="memory", max_memory="auto")


@app.keyspace("square:*", ttl=3600)
def square(key: str) -> str:
    """A slow 'model' in a worker thread: 200 ms per computation."""
    time.sleep(0.2)
    return str(int(key.split(":", 1)[1]) ** 2)


@app.keyspace("embed:*", batch_size=32, batch_wait_ms=5)
def embed(keys: list[str]) -> list[list[float]]:
    """A batched 'encoder': one call for all the misses that arrive together (50 ms per batch)."""
    time.sleep(0.05)
    return [[b / 255 for b in hashlib.sha256(k.encode()).digest()[:8]] for k in keys]


@app.keyspace("greet{<tag>}_<name>")
async def greet(tag: str, name: str) -> str:
    """A template keyspace: fields parsed out of the key."""
    return f"hello {name} (shard {tag})"
