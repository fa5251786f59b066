"""One benchmark, two source trees, rounds alternated: is a change slower than what it replaced?

Runs ``python <tree>/<script> <args>`` in the old tree and in this one, old then new, for
``--rounds`` rounds (the machine is shared and noisy: alternating gives both trees the same
weather), reads every markdown table row the script prints, and prints each numeric cell's median
per tree and the ratio new / old. Each run has its tree first on ``PYTHONPATH`` (its subprocesses
too), so each tree is measured whole, its C module included.

Run, with the old tree checked out and built beside this one::

    git worktree add /tmp/old <rev> && (cd /tmp/old && python setup.py build_ext --inplace -q)
    python bench/trees.py --old /tmp/old --rounds 3 -- bench/module.py --only hits --rounds 1
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

Row = tuple[str, ...]


def tables(text: str, key_columns: int | None = None) -> dict[tuple[Row, Row], list[float | None]]:
    """Each table row by (its table's header, its label cells) -> its numeric cells (None where a
    cell holds no number). The label is the first ``key_columns`` cells, or by default the leading
    cells that hold no number."""
    out: dict[tuple[Row, Row], list[float | None]] = {}
    header: Row = ()
    for line in text.splitlines():
        if not line.startswith("|"):
            header = ()
            continue
        cells = tuple(c.strip() for c in line.strip().strip("|").split("|"))
        if all(set(c) <= set("-: ") for c in cells):
            continue
        if not header:
            header = cells
            continue
        label_end = key_columns or next(
            (i for i, c in enumerate(cells) if NUMBER.fullmatch(c.replace(" ", ""))), len(cells)
        )
        label = cells[:label_end] if label_end else cells[:1]
        values: list[float | None] = []
        for c in cells[len(label) :]:
            m = NUMBER.search(c)
            values.append(float(m.group().replace(",", "")) if m else None)
        out[(header, label)] = values
    return out


def run(tree: Path, script: str, args: list[str], timeout: float) -> str:
    started = time.monotonic()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    )
    done = subprocess.run(
        [sys.executable, str(tree / script), *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{tree / script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  {tree}: {time.monotonic() - started:.0f}s", file=sys.stderr)
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--old", required=True, type=Path, help="the other tree (its module built)")
    parser.add_argument("--new", type=Path, default=HERE, help="default: this tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one run may take")
    parser.add_argument(
        "--key-columns", type=int, help="leading cells that name a row (default: those with no number)"
    )
    parser.add_argument("script", help="the bench script, relative to each tree (bench/module.py)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (after --)")
    a = parser.parse_args(argv)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    seen: dict[str, dict[tuple[Row, Row], list[list[float | None]]]] = {"old": {}, "new": {}}
    for r in range(a.rounds):
        print(f"round {r + 1} of {a.rounds}", file=sys.stderr)
        for name, tree in (("old", a.old), ("new", a.new)):
            for key, values in tables(run(tree.resolve(), a.script, args, a.timeout), a.key_columns).items():
                seen[name].setdefault(key, []).append(values)
    print(f"### {a.script} {' '.join(args)}: new tree / old tree, {a.rounds} alternated rounds (medians)\n")
    print(f"old: {a.old}  new: {a.new}; python {sys.version.split()[0]}\n")
    by_header: dict[Row, list[Row]] = {}
    for header, label in seen["new"]:
        if (header, label) in seen["old"]:
            by_header.setdefault(header, []).append(label)
    for header, labels in by_header.items():
        names = list(header[len(labels[0]) :]) if labels else []
        print(
            "| "
            + " | ".join(header[: len(labels[0])])
            + " | "
            + " | ".join(f"{n}: old, new, ×" for n in names)
            + " |"
        )
        print("| " + " | ".join("---" for _ in header[: len(labels[0])]) + " |" + " ---: |" * len(names))
        for label in labels:
            cells = []
            for i in range(len(names)):
                old = [v[i] for v in seen["old"][(header, label)] if i < len(v) and v[i] is not None]
                new = [v[i] for v in seen["new"][(header, label)] if i < len(v) and v[i] is not None]
                if not old or not new:
                    cells.append("")
                    continue
                o, n = statistics.median(old), statistics.median(new)
                cells.append(f"{o:,.3g}, {n:,.3g}, {n / o:.2f}" if o else f"{o:g}, {n:g}, -")
            print("| " + " | ".join(label) + " | " + " | ".join(cells) + " |")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
