"""What keeps the serving reader small: OpenVINO without its model converter, the C heap trimmed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from keymiss.qa.footprint import trim_heap

PROBE = """
import sys
from keymiss.qa.footprint import CONVERTER, import_openvino
ov = import_openvino()
assert CONVERTER not in sys.modules, "the converter was imported"
assert import_openvino() is ov and ov.Core().available_devices
import openvino.tools.ovc  # still importable by name: only the package's shortcut is left out
print("ok")
"""


def test_openvino_comes_without_its_model_converter_which_stays_importable() -> None:
    pytest.importorskip("openvino")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_trim_heap_runs_where_glibc_has_malloc_trim() -> None:
    import platform

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert trim_heap() is glibc
    assert trim_heap() is glibc  # again: nothing left to hand back is no error
