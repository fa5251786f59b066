"""The engine tests' app: a memory store, closed after each test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keymiss import Keymiss


@pytest.fixture
async def km() -> AsyncIterator[Keymiss]:
    app = Keymiss(store="memory", max_memory="64MB")
    yield app
    await app.close()
