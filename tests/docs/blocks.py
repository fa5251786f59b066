"""The fenced code blocks of README.md and docs/*.md, found the way a reader sees them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[2]
#: a fenced block: its indent, its language tag, its body, up to a fence of the same indent
FENCE = re.compile(r"^( *)```([^\n`]*)\n(.*?)^\1```[ \t]*$", re.S | re.M)


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence
    lang: str
    body: str  # with the fence's indent taken off every line

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.body.splitlines() if line.strip()), "")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks() -> list[Block]:
    out = []
    for path in doc_files():
        text = path.read_text()
        for m in FENCE.finditer(text):
            indent = len(m.group(1))
            body = "\n".join(
                line[indent:] if line[:indent].isspace() else line for line in m.group(3).splitlines()
            )
            out.append(
                Block(
                    str(path.relative_to(ROOT)),
                    text.count("\n", 0, m.start()) + 1,
                    m.group(2).strip().lower(),
                    body + "\n",
                )
            )
    return out
