"""An app for worker processes in tests: each computation is logged to $KEYMISS_TEST_CALLS."""

from __future__ import annotations

import asyncio
import os

from keymiss import Keymiss

app = Keymiss(sweep_interval=0)


@app.keyspace("slow:*", ttl=30)
async def slow(key: str) -> str:
    with open(os.environ["KEYMISS_TEST_CALLS"], "a") as f:  # noqa: ASYNC230 - a test's call log
        f.write(key + "\n")
    await asyncio.sleep(float(os.environ.get("KEYMISS_TEST_COMPUTE", "3")))
    return f"value of {key}"
