"""The bertqa keyspace end to end on a module-loaded cluster: contexts ingested into their shard,
``keymiss worker --model`` computing, ``redis-cli -c GET`` answering like the QA pipeline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from keymiss.valkey import protocol
from keymiss.valkey.modulepath import module_path

from ..redis_servers import HAVE_REDIS, RedisCluster3
from ..support import eventually
from ..valkey.conftest import binary
from .conftest import SHORT_CONTEXT, long_context, write_corpus
from .test_qa import _keymiss, pipeline_answer


def _cli(port: int, *args: str, cluster: bool = True) -> str:
    cmd = ["redis-cli", *(["-c"] if cluster else []), "-p", str(port), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout.strip()


@pytest.mark.parametrize("kind", ["redis", "valkey"])
def test_bertqa_on_a_cluster_with_contexts_in_their_shard(
    kind: str, tmp_path: Path, tiny_model: str, reference: Any
) -> None:
    if not HAVE_REDIS:
        pytest.skip("redis-cli is not installed")
    cluster = RedisCluster3(tmp_path / "cluster", "--loadmodule", str(module_path()), binary=binary(kind))
    worker = None
    try:
        long = long_context(40)
        corpus = write_corpus(
            tmp_path / "corpus.jsonl", {"PMC302072.xml:{8YG}:10": SHORT_CONTEXT, "long:{8YG}:2": long}
        )
        out = _keymiss("ingest", corpus, "--store", cluster.url, "--model", tiny_model)
        assert out.returncode == 0 and "2 added" in out.stdout, out.stdout + out.stderr
        port = cluster.nodes[0].port
        slot = int(_cli(port, "CLUSTER", "KEYSLOT", "{8YG}"))
        shard = next(
            n
            for n in cluster.nodes
            if _cli(n.port, "EXISTS", "keymiss:ctx:PMC302072.xml:{8YG}:10", cluster=False) == "1"
        )
        assert int(_cli(shard.port, "CLUSTER", "KEYSLOT", "keymiss:ctx:PMC302072.xml:{8YG}:10")) == slot

        worker = subprocess.Popen(
            [sys.executable, "-m", "keymiss", "worker", "--redis", cluster.url, "--model", tiny_model],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def registered() -> bool:
            assert worker.poll() is None, worker.stderr.read().decode()[-3000:]  # type: ignore[union-attr]
            return "workers=1" in _cli(shard.port, "INFO", protocol.INFO_SECTION, cluster=False)

        eventually(registered, timeout=120, interval=0.2, message="the worker registers")
        seed = "bertqa{8YG}_PMC302072.xml:{8YG}:10_Who performs viral transmission among adults"
        want = pipeline_answer(reference, "Who performs viral transmission among adults", SHORT_CONTEXT)
        assert _cli(port, "GET", seed) == want
        long_key = "bertqa{8YG}_long:{8YG}:2_what is snake_case in the host cells?"
        assert _cli(port, "GET", long_key) == pipeline_answer(
            reference, "what is snake_case in the host cells?", long
        )
        assert _cli(shard.port, "GET", seed, cluster=False) == want  # stored in the shard, a plain hit now
        assert "unknown context 'missing:{8YG}:1'" in _cli(port, "GET", "bertqa{8YG}_missing:{8YG}:1_who?")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        cluster.stop()
