"""An app that states its memory budget and eviction policy, as an edge device would."""

from __future__ import annotations

from keymiss import Keymiss

app = Keymiss(max_memory="8MB", eviction="lru")


@app.keyspace("sq:*")
def sq(key: str) -> str:
    return str(int(key[3:]) ** 2)
