"""Start-up progress: a step says when it starts, how far it got while it runs, and when it ends;
on a terminal a bar replaces the repeated lines."""

from __future__ import annotations

import logging

import pytest

from keymiss.qa.progress import StartProgress

from ..support import aeventually


async def test_a_long_step_logs_its_progress_while_it_runs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="keymiss.test.progress")
    progress = StartProgress(logging.getLogger("keymiss.test.progress"), every=0.01)
    progress.bar = None  # a log, not a terminal
    async with progress.step("ingesting corpus.jsonl", 128) as advance:
        advance(64)
        await aeventually(lambda: "ingesting corpus.jsonl: 64/128 (50%)" in caplog.text, timeout=5)
        advance(64)
    lines = caplog.text.splitlines()
    assert "ingesting corpus.jsonl (128) …" in lines[0]
    assert "ingesting corpus.jsonl: done (128/128, " in lines[-1]


async def test_a_step_without_a_total_says_how_long_so_far(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="keymiss.test.progress")
    progress = StartProgress(logging.getLogger("keymiss.test.progress"), every=0.01)
    progress.bar = None
    async with progress.step("loading the QA reader"):
        await aeventually(lambda: "loading the QA reader: " in caplog.text and "so far" in caplog.text)
    assert "loading the QA reader: done (" in caplog.text


async def test_on_a_terminal_a_bar_shows_the_progress(caplog: pytest.LogCaptureFixture) -> None:
    from rich.console import Console
    from rich.progress import Progress

    caplog.set_level(logging.INFO, logger="keymiss.test.progress")
    console = Console(force_terminal=True, width=100, record=True)
    bar = Progress(console=console, auto_refresh=False)
    progress = StartProgress(logging.getLogger("keymiss.test.progress"), every=0.01, bar=bar)
    async with progress.step("ingesting corpus.jsonl", 10) as advance:
        advance(10)
        bar.refresh()
        shown = console.export_text()
        assert "ingesting corpus.jsonl" in shown and "100%" in shown
    assert "done (10/10" in caplog.text and "(100%)" not in caplog.text  # the bar, not the lines
