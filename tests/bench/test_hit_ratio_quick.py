"""``bench/hit_ratio.py --quick`` runs: every simulated policy and the default front end (a real
module-loaded server replayed through GET / TAKE / FILL) on a small trace, in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_quick_hit_ratio_run_prints_every_policy_and_the_front_end() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "hit_ratio.py"), "--quick", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(line for line in out.stdout.splitlines() if line.startswith("| trace | budget | lru"))
    for policy in ("gdsf", "gdsf-cost", "sieve", "s3fifo", "worth", "tinylfu", "static-best", "belady"):
        assert f" {policy} |" in header, header
    row = next(line for line in out.stdout.splitlines() if line.startswith("| zipf+scan | 5% |"))
    ratios = [float(c) for c in row.strip("|").split("|")[2:]]
    assert all(0 <= r <= 100 for r in ratios) and max(ratios) > 0, row
    if " frontend |" in header:  # a server binary is here: the front end was replayed for real
        assert ratios[header.strip("|").split("|")[2:].index(" frontend ")] > 0
        # and is held against GDSF simulated under the server's own bytes per key
        assert " gdsf-srv |" in header and " gdsf-cost-srv |" in header, header
        against = next(line for line in out.stdout.splitlines() if "frontend − gdsf-srv (pts)" in line)
        assert "frontend − gdsf-cost-srv (s)" in against and "worth − gdsf (pts)" in against, against
