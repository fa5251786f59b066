"""The read contract as data: docs/architecture.md's table, parsed.

Each row is a situation (its id in the first column); each cell says what a reader gets and how
many computations run. A front end's own column, where filled, overrides the shared "gets" and
"computed" cells for it; one starting with ``n/a`` says why the situation cannot arise there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
SECTION = "## The read contract"

#: the shared columns; every other column belongs to a family of front ends
SHARED = ("id", "situation", "gets", "computed")


@dataclass(frozen=True)
class Row:
    id: str
    situation: str
    gets: str
    computed: str
    #: the front-end columns' cells, by column name ("library", "Python server", "module")
    cells: dict[str, str]

    def cell(self, column: str) -> str:
        """What this front-end column says (empty: the shared cells hold)."""
        return self.cells[column]

    def not_applicable(self, column: str) -> str | None:
        """The reason, when the column's cell starts with ``n/a``."""
        cell = self.cells[column]
        return cell if cell.startswith("n/a") else None


def _cells(line: str) -> list[str]:
    inner = line.strip()
    if not (inner.startswith("|") and inner.endswith("|")):
        raise ValueError(f"not a table line: {line!r}")
    return [c.strip() for c in inner[1:-1].split("|")]


def read_table(doc: Path = DOC) -> tuple[list[str], list[Row]]:
    """The front-end column names and the rows, in the document's order."""
    lines = doc.read_text().splitlines()
    start = lines.index(SECTION)
    table: list[str] = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    header = _cells(table[0])
    if tuple(header[: len(SHARED)]) != SHARED:
        raise ValueError(f"the read contract's columns start {header[: len(SHARED)]}, not {SHARED}")
    columns = header[len(SHARED) :]
    rows = []
    for line in table[2:]:
        cells = _cells(line)
        if len(cells) != len(header):
            raise ValueError(f"row has {len(cells)} cells, the header {len(header)}: {line!r}")
        row_id, situation, gets, computed = cells[: len(SHARED)]
        own = dict(zip(columns, cells[len(SHARED) :], strict=True))
        rows.append(Row(row_id, situation, gets, computed, cells=own))
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"row ids repeat: {ids}")
    return columns, rows
