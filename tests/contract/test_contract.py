"""The read contract (docs/architecture.md), every row against every front end.

The table is the spec: its rows are read from the document, each runs its scenario
(``scenarios.py``) on each front end (``frontends.py``). A row without a scenario, or a scenario
without a row, fails ``test_every_row_has_a_scenario``. A front end's cell starting with ``n/a``
is skipped with that reason; a cell that fails today because a fix is pending is listed, once, in
``PENDING`` (strict: the fix makes it pass, and the entry must go).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _pytest.mark.structures import ParameterSet

from .frontends import Frontend, Library, Module, PythonServer
from .scenarios import SCENARIOS
from .table import read_table

COLUMNS, ROWS = read_table()

#: each front end, and the table column that speaks for it
FRONTENDS = {
    "memory": "library",
    "lmdb": "library",
    "redis": "library",
    "redis-near": "library",
    "redis-cluster": "library",
    "python": "Python server",
    "redis-module": "module",
    "valkey-module": "module",
}

MODULES = ("redis-module", "valkey-module")

#: cells failing today because their fix is pending: (row, front end) -> the fix. Remove an entry
#: when its fix lands (strict: the cell then passes, and the XPASS fails the run until it goes).
PENDING: dict[tuple[str, str], str] = {}

_ids = itertools.count()


def _params() -> list[ParameterSet]:
    out = []
    for r in ROWS:
        for fe in FRONTENDS:
            reason = PENDING.get((r.id, fe))
            marks = [pytest.mark.xfail(strict=True, reason=f"pending fix: {reason}")] if reason else []
            out.append(pytest.param(r.id, fe, id=f"{r.id}-{fe}", marks=marks))
    return out


async def _frontend(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Frontend:
    if name == "memory":
        return Library(name, "memory")
    if name == "lmdb":
        return Library(name, f"lmdb:{tmp_path / 'lmdb'}")
    if name in ("redis", "redis-near"):
        port = request.getfixturevalue("redis_standalone").port
        return Library(
            name, f"redis://127.0.0.1:{port}" + ("?near_cache=4MB" if name == "redis-near" else "")
        )
    if name == "redis-cluster":
        return Library(name, request.getfixturevalue("redis_cluster").url)
    if name == "python":
        return PythonServer()
    server = request.getfixturevalue(name.replace("-", "_"))
    return Module(name, server.port, server.declared)


@pytest.fixture
async def frontend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Frontend]:
    row_id, name = request.node.callspec.params["row_id"], request.node.callspec.params["fe"]
    row = next(r for r in ROWS if r.id == row_id)
    reason = row.not_applicable(FRONTENDS[name])
    if reason:
        pytest.skip(reason)
    fe = await _frontend(name, request, tmp_path)
    yield fe
    for gate_owner in getattr(fe, "holders", []):
        gate_owner.release()
    await fe.close()


@pytest.mark.parametrize(("row_id", "fe"), _params())
async def test_row(row_id: str, fe: str, frontend: Frontend) -> None:
    await SCENARIOS[row_id](frontend, f"c{next(_ids)}x")


def test_every_row_has_a_scenario() -> None:
    rows = [r.id for r in ROWS]
    assert sorted(set(rows) - set(SCENARIOS)) == [], "rows without a scenario"
    assert sorted(set(SCENARIOS) - set(rows)) == [], "scenarios without a row"


def test_every_front_end_has_a_column() -> None:
    assert set(FRONTENDS.values()) == set(COLUMNS)
    assert set(PENDING) <= {(r.id, fe) for r in ROWS for fe in FRONTENDS}
