"""Servers for the read contract, one of each per session: the shared Redis and the Redis
Cluster come from ``tests/conftest.py``; here, one module-loaded server per binary, loaded with a
declared keyspace and a worker grace (``before-worker``, ``dead-worker``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite(
    "tests.contract.scenarios", "tests.contract.frontends", "tests.contract.handlers"
)

from keymiss.valkey import protocol  # noqa: E402
from keymiss.valkey.modulepath import module_path  # noqa: E402

from ..redis_servers import RedisProcess  # noqa: E402
from ..valkey.conftest import valkey_binary  # noqa: E402

#: the module front ends: their server binaries
MODULE_BINARIES = {"redis-module": shutil.which("redis-server"), "valkey-module": valkey_binary()}
#: what the module servers are loaded with: a keyspace declared before any worker, and the worker grace
DECLARED = "cdecl:*"
GRACE_MS = 500


class ModuleServer:
    """A module-loaded server with one declared keyspace (``DECLARED``) and a worker grace."""

    def __init__(self, workdir: Path, binary: str) -> None:
        self.declared: str | None = DECLARED
        self.proc = RedisProcess(
            workdir,
            "--loadmodule",
            str(module_path()),
            protocol.OPT_GRACE,
            str(GRACE_MS),
            protocol.OPT_KEYSPACE,
            DECLARED,
            binary=binary,
            log=True,
        )

    @property
    def port(self) -> int:
        return self.proc.port


def _module_server(kind: str, factory: pytest.TempPathFactory) -> Iterator[ModuleServer]:
    binary = MODULE_BINARIES[kind]
    if binary is None:
        pytest.skip(f"no server binary for {kind}")
    server = ModuleServer(factory.mktemp(kind), binary)
    yield server
    server.proc.stop()


@pytest.fixture(scope="session")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleServer]:
    yield from _module_server("redis-module", tmp_path_factory)


@pytest.fixture(scope="session")
def valkey_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleServer]:
    yield from _module_server("valkey-module", tmp_path_factory)
