"""The app bench/cluster.py serves on every node: a 20 ms 'model'."""

import asyncio

from keymiss import Keymiss

app = Keymiss()


@app.keyspace("work:*")
async def work(key: str) -> str:
    await asyncio.sleep(0.02)
    return f"result of {key}"
