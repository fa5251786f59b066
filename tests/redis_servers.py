"""Real redis-server processes on free loopback ports: standalone, and a 3-master cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from .support import eventually

HAVE_REDIS = shutil.which("redis-server") is not None and shutil.which("redis-cli") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 40000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for a cluster node")


def _ping(port: int) -> bool:
    out = subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, timeout=5)
    return out.stdout.strip() == "PONG"


class RedisProcess:
    """One redis-server, stopped by pid."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        port: int | None = None,
        binary: str = "redis-server",
        env: dict[str, str] | None = None,
        log: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra
        self.binary = binary
        self.env = env
        self.log = workdir / "server.log" if log else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra,
        ]
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if self.log:
            out.close()  # type: ignore[union-attr]
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.binary} on {self.port} exited with {proc.returncode}")
            return _ping(self.port)

        try:
            eventually(up, timeout=20, interval=0.05, ignore=(subprocess.SubprocessError,))
        except AssertionError:
            raise RuntimeError(f"redis-server on {self.port} did not start") from None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class RedisCluster3:
    """Three masters made with ``redis-cli --cluster create``; ready when cluster_state:ok."""

    def __init__(
        self, workdir: Path, *extra: str, binary: str = "redis-server", replicas: int = 0, log: bool = False
    ) -> None:
        self.nodes = []
        for i in range(3 * (1 + replicas)):
            port = free_cluster_port()
            self.nodes.append(
                RedisProcess(
                    workdir / f"n{i}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "2000",
                    *extra,
                    port=port,
                    binary=binary,
                    log=log,
                )
            )
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addrs,
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        try:
            eventually(self._ready, timeout=30, interval=0.2)
        except AssertionError:
            raise RuntimeError("cluster never reached cluster_state:ok") from None

    def _ready(self) -> bool:
        states = [
            subprocess.run(
                ["redis-cli", "-p", str(n.port), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            for n in self.nodes
        ]
        return all("cluster_state:ok" in s for s in states) and self._replicas_in_sync()

    def _replicas_in_sync(self) -> bool:
        """Every replica has synced with its master (one that never did cannot take over)."""
        for n in self.nodes:
            info = subprocess.run(
                ["redis-cli", "-p", str(n.port), "info", "replication"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
