"""One value's size on the LMDB store is bounded (``max_value``): a value there is read, checked and
rewritten whole, so a client's SETBIT at offset 2^32-1 once built a 512 MB string, copied it
several times (2.4 GB RSS) and held every other client for seconds."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from .conftest import start_server


def test_a_huge_setbit_or_setrange_on_lmdb_is_refused_at_once_and_others_are_served(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--store", f"lmdb:{tmp_path}/db?max_value=1MB", front="python")
    r = redis.Redis(port=srv.port)
    try:
        for cmd in (("SETBIT", "bk", 4294967295, 1), ("SETRANGE", "bk2", 536870911, "x")):
            t0 = time.monotonic()
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                r.execute_command(*cmd)
            assert time.monotonic() - t0 < 2.0  # refused before any byte of it is built
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.set("big", b"x" * (1024 * 1024 + 1))
        r.set("ok", b"y" * (512 * 1024))
        r.append("ok", b"z" * 1000)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            r.append("ok", b"z" * (600 * 1024))
        assert r.strlen("ok") == 512 * 1024 + 1000  # the refused APPEND changed nothing
        assert r.exists("bk", "bk2", "big") == 0
        assert r.ping()
    finally:
        r.close()
        srv.stop()


def test_an_unknown_or_bad_max_value_is_a_clear_error(tmp_path: Path) -> None:
    from keymiss.errors import ConfigError
    from keymiss.stores import open_store

    with pytest.raises(ConfigError, match="max_value"):
        open_store(f"lmdb:{tmp_path}/db?max_value=lots")
