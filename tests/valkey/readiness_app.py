"""An app whose workers take a moment to attach (a start hook standing for a model's load) and whose
one keyspace computes at once: what a client reads as soon as the server accepts it."""

from __future__ import annotations

import asyncio

from keymiss import Keymiss

app = Keymiss(sweep_interval=0)


async def load_model(km: Keymiss) -> None:
    await asyncio.sleep(0.5)  # the time a real model takes to load before its workers register


app.on_start(load_model)


@app.keyspace("quick:*")
def quick(key: str) -> str:
    return "value of " + key
