"""The app ``bench/resp_hits.py`` serves: the benchmark's keys (``key:…``) form a keyspace, so every
GET is a hit on a registered keyspace (the module's filter looks at each one)."""

from __future__ import annotations

from keymiss import Keymiss

app = Keymiss(max_memory="1GB")


@app.keyspace("key:*")
def value(key: str) -> str:
    return "xxx"
