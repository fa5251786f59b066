"""Start-up progress: what the QA start-up work (loading the reader, ingesting a corpus) is doing,
said while it runs. A first start spends seconds importing and loading the model before it listens;
a log that says nothing for that long looks like a hang.

Each step logs a line when it starts and one when it ends (with its time); while it runs, a line
every ``every`` seconds says how far it got (``n/total``) — or, when the log goes to a terminal, a
rich progress bar on stderr shows it instead of the repeated lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any


def _terminal_bar() -> Any:
    """A rich Progress on stderr when stderr is a terminal and rich is installed; else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


class StartProgress:
    """Steps of start-up work, each said as it goes (see the module's docstring)."""

    def __init__(self, log: logging.Logger, *, every: float = 2.0, bar: Any = None) -> None:
        self.log = log
        self.every = every
        self.bar = bar if bar is not None else _terminal_bar()

    @contextlib.asynccontextmanager
    async def step(self, what: str, total: int | None = None) -> AsyncIterator[Callable[[int], None]]:
        """Run one step; the body calls the yielded function with how many items it just did."""
        done = 0
        started = time.monotonic()
        self.log.info("%s%s …", what, f" ({total})" if total is not None else "")
        task = None
        if self.bar is not None:
            self.bar.start()
            task = self.bar.add_task(what, total=total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if task is not None:
                self.bar.update(task, completed=done)

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(self.every)
                elapsed = time.monotonic() - started
                if total:
                    self.log.info("%s: %d/%d (%d%%), %.0f s", what, done, total, 100 * done // total, elapsed)
                else:
                    self.log.info("%s: %.0f s so far", what, elapsed)

        beat = asyncio.create_task(heartbeat()) if task is None else None
        try:
            yield advance
        finally:
            if beat is not None:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
            if task is not None:
                self.bar.remove_task(task)
                self.bar.stop()
        counted = f"{done}/{total}, " if total is not None else ""
        self.log.info("%s: done (%s%.1f s)", what, counted, time.monotonic() - started)
