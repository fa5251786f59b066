"""An app whose keyspace names look like terminal markup, INFO separators or escape sequences:
``keymiss top``, INFO and the start-up log must show each as it is."""

from __future__ import annotations

from keymiss import Keymiss

app = Keymiss(store="memory", max_memory="16MB")

#: every name, as registered
NAMES = ("u:[abc]*", "u:[xyz]*", "k:[/]*", "[bold red]x:*", "[link=x]h:*", "a,b=c:*", "e\x1b[31mr:*")


def _register(pattern: str) -> None:
    @app.keyspace(pattern)
    def echo(key: str) -> str:
        return key


for _name in NAMES:
    _register(_name)
