"""The one event-loop runner: uvloop when installed, closed by hand.

The loop is closed by hand rather than by ``asyncio.Runner``: on Python 3.11 the runner waits
without limit for the default executor, where an async handler's ``asyncio.to_thread`` call may be
stuck for good. Here that wait is bounded, and what is still stuck after it is abandoned with an
immediate exit (logs flushed first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from keymiss.runtime.exits import EXIT_ABANDONED

log = logging.getLogger("keymiss.server")

#: Seconds shutdown waits for the default executor's threads (``asyncio.to_thread``) to finish.
EXECUTOR_WAIT = 2.0


def new_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop, uvloop's when it is installed."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run_loop(main: Callable[[], Coroutine[Any, Any, int]], *, executor_wait: float | None = None) -> int:
    """Run ``main()`` to its end on a new loop and return its exit status. With ``executor_wait``,
    the default executor gets that many seconds to finish; past them the process exits at once
    with ``EXIT_ABANDONED``."""
    loop = new_loop()
    asyncio.set_event_loop(loop)
    stuck = False
    try:
        status = loop.run_until_complete(main())
        with contextlib.suppress(Exception):
            loop.run_until_complete(loop.shutdown_asyncgens())
        if executor_wait is not None:
            stuck = not loop.run_until_complete(_shutdown_executor(loop, executor_wait))
    finally:
        if stuck:
            log.error(
                "keymiss stopped, abandoning threads of the default executor still busy after %.0fs "
                "(an async handler's blocking call)",
                executor_wait,
            )
            logging.shutdown()
            os._exit(EXIT_ABANDONED)
        asyncio.set_event_loop(None)
        loop.close()
    return status


async def _shutdown_executor(loop: asyncio.AbstractEventLoop, seconds: float) -> bool:
    try:
        await asyncio.wait_for(asyncio.shield(loop.shutdown_default_executor()), seconds)
    except TimeoutError:
        return False
    return True
