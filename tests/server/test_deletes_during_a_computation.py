"""A client's delete while a key is being computed, on the Python server: the readers waiting get
the computed value, and it is not stored, whichever command deleted (the read contract's
del-during row). GETDEL of a key still being computed finds nothing to return, yet deletes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from .conftest import keyspace_info, start_server


@pytest.mark.parametrize("how", ["DEL", "UNLINK", "GETDEL"])
def test_a_delete_while_a_key_computes_wins_over_the_computed_value(tmp_path: Path, how: str) -> None:
    srv = start_server(tmp_path, front="python")
    r = redis.Redis(port=srv.port)
    reader = redis.Redis(port=srv.port)
    name = f"del{time.monotonic_ns()}"
    key = f"gate:{name}"
    got: list[bytes | None] = []
    t = threading.Thread(target=lambda: got.append(reader.get(key)))
    try:
        t.start()
        srv.wait_started(name)  # the computation runs until released
        assert r.execute_command(how, key) in (0, None)  # nothing stored yet to delete or return
        srv.release(name)
        t.join(10)
        assert got == [f"gated result for {key}".encode()]  # the reader asked before the delete
        assert r.exists(key) == 0  # not stored over the client's delete
        assert int(keyspace_info(r, "gate:*")["superseded"]) >= 1
    finally:
        srv.release(name)
        t.join(10)
        r.close()
        reader.close()
        srv.stop()
