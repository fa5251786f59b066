"""Every code block of README.md and docs/*.md runs as written.

- ``python``: run as a script in an empty directory (the repository importable);
- ``js``: run with Node.js (skipped where there is none);
- ``sh``, ``bash``, ``shell``, ``console``: run in a sandbox: an empty directory, ``keymiss`` on the
  PATH (this checkout's), and a ``keymiss serve --app keymiss.apps.examples:app`` started for the
  run, whose port stands in for 6380. A ``sh`` block is one bash script; a ``console`` block's
  commands are its ``$ `` lines, each of which must exit 0;
- ``toml``: parsed, and a ``[keymiss]`` table loaded as keymiss's settings; ``json``: parsed;
- ``text`` and blocks without a language are data or pictures, not code.

A block that cannot run here (it installs packages, runs a benchmark for minutes, starts servers
that run until stopped, or needs a model loaded) is named in ``NOT_RUN`` with the reason, and what
covers it instead where something does. A block of a language the runner does not know fails: add
a way to run it, or a ``NOT_RUN`` entry.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from keymiss.valkey import protocol

from ..server.conftest import ServerProcess, start_server
from .blocks import ROOT, Block, blocks

#: (file, a regular expression its first line matches) -> why the block is not run here
NOT_RUN: dict[tuple[str, str], str] = {
    (
        "README.md",
        r"^python3 -m venv \.venv && ",
    ): "a fresh machine's install (network, minutes): CI's own job",
    ("README.md", r"^\$ redis-cli -p 6380 GET \"bertqa"): "the bertqa server loads a model first (15-30 s): "
    "tests/qa/test_qa.py::test_default_serve_answers_demo_corpus asks the same question, and "
    "test_the_readme_info_sample_is_the_modules holds the INFO lines to the module's fields",
    ("README.md", r"^redis-server --loadmodule"): "starts a server and a worker that run until stopped "
    "(tests/valkey runs the module and workers in both servers)",
    ("README.md", r"^redis-cli ACL SETUSER kmworker"): "a worker that runs until stopped: "
    "tests/valkey/test_module_workers.py::test_the_readme_worker_acl_recipe_serves_without_noperm_noise "
    "runs this recipe as written",
    ("docs/benchmarks.md", r"^(\.venv/bin/pip install [^&]*&& )?\.venv/bin/python bench/"): "a benchmark: "
    "minutes of CPU (its results and command are in docs/benchmarks.md)",
    ("docs/benchmarks.md", r"^git worktree add "): "builds an earlier commit to compare with (minutes)",
}
#: languages whose blocks are data or pictures
NOT_CODE = {"", "text"}
SHELLS = {"sh", "bash", "shell", "console"}
TIMEOUT = 60


def not_run(block: Block) -> str | None:
    for (path, pattern), why in NOT_RUN.items():
        if block.path == path and re.search(pattern, block.first_line):
            return why
    return None


ALL = blocks()
RUN = [b for b in ALL if b.lang not in NOT_CODE and not_run(b) is None]


def test_every_not_run_entry_names_a_block() -> None:
    """The allowlist stays small: an entry no block matches any more is removed."""
    for path, pattern in NOT_RUN:
        assert any(b.path == path and re.search(pattern, b.first_line) for b in ALL), (path, pattern)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], ServerProcess]]:
    """A directory, an environment whose ``keymiss`` is this checkout's, and a server of the
    examples app (``square:*``, ``embed:*``, ``greet{<tag>}_<name>``)."""
    home = tmp_path_factory.mktemp("docs")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "keymiss"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m keymiss "$@"\n')
    shim.chmod(0o755)
    e = env()
    e["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    srv = start_server(home, app="keymiss.apps.examples:app", front="auto")
    yield home, e, srv
    srv.stop()


def run(cmd: list[str], cwd: Path, e: dict[str, str], block: Block) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, (
        f"{block.where} ({block.lang}) exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    )
    return out


@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_the_block_runs_as_written(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(block.body)
        run([sys.executable, str(script)], tmp_path, env(), block)
    elif block.lang in ("js", "javascript"):
        node = shutil.which("node")
        if node is None:
            pytest.skip("no Node.js here")
        script = tmp_path / "block.js"
        script.write_text(block.body)
        run([node, str(script)], tmp_path, env(), block)
    elif block.lang == "toml":
        doc = tomllib.loads(block.body)
        if "keymiss" in doc:
            from keymiss.config import load_settings

            path = tmp_path / "keymiss.toml"
            path.write_text(block.body)
            load_settings(str(path), {})
    elif block.lang == "json":
        json.loads(block.body)
    elif block.lang in SHELLS:
        home, e, srv = request.getfixturevalue("sandbox")
        body = block.body.replace("6380", str(srv.port))
        if block.lang == "console":
            commands = [line[2:] for line in body.splitlines() if line.startswith("$ ")]
            assert commands, f"{block.where}: a console block without a '$ ' command"
        else:
            commands = [body]
        for command in commands:
            run(["bash", "-e", "-c", command], home, e, block)
    else:
        pytest.fail(f"{block.where}: no way to run a {block.lang!r} block: add one, or a NOT_RUN entry")


def test_the_readme_info_sample_is_the_modules() -> None:
    """The README's sample ``INFO keymiss`` shows the module's fields, by name and in order."""
    sample = next(b for b in ALL if b.path == "README.md" and "INFO keymiss" in b.first_line + b.body)
    lines = [line for line in sample.body.splitlines() if line.startswith("keymiss_")]
    section = [line.split(":", 1)[0].removeprefix("keymiss_") for line in lines if "keyspace_" not in line]
    assert tuple(section) == protocol.INFO_FIELDS
    keyspace = next(line for line in lines if line.startswith("keymiss_keyspace_0:"))
    fields = tuple(protocol.parse_info_keyspace(keyspace.split(":", 1)[1]))
    assert fields == protocol.INFO_KEYSPACE_FIELDS


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["ingest", "--help"], ("lmdb:PATH", "redis://", "redis+cluster://")),
        (
            ["serve", "--help"],
            (
                "--max-clients",
                "keymiss's own connections",
                "--demo",
                "on Redis 7.0, --redis-server, closed as it connects",
            ),
        ),
        (["top", "--help"], ("--password", "--user", "q or Ctrl-C")),
    ],
)
def test_the_help_says_it(command: list[str], said: tuple[str, ...]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keymiss", *command], capture_output=True, text=True, env=env(), timeout=30
    )
    text = " ".join(out.stdout.split())  # argparse wraps lines
    assert out.returncode == 0 and all(s in text for s in said), out.stdout
