"""What keeps the serving reader small: OpenVINO without its model converter, the C heap trimmed,
the libraries' start-up-only pages handed back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from keymiss.qa.footprint import clean_mappings, page_out_libraries, trim_heap

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


SMAPS = """\
7f0000000000-7f0000002000 r--p 00000000 fd:01 11 /venv/openvino/libs/libopenvino.so.2641
Rss:                   8 kB
Anonymous:             0 kB
7f0000002000-7f0000009000 r-xp 00002000 fd:01 11 /venv/openvino/libs/libopenvino.so.2641
Rss:                  28 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000009000-7f000000a000 r--p 00009000 fd:01 11 /venv/openvino/libs/libopenvino.so.2641
Rss:                   4 kB
Anonymous:             4 kB
7f000000a000-7f000000b000 rw-p 0000a000 fd:01 11 /venv/openvino/libs/libopenvino.so.2641
Anonymous:             0 kB
7f000000b000-7f000000c000 r-xp 00000000 fd:01 12 /usr/lib/libc.so.6
Anonymous:             0 kB
7f000000c000-7f000000d000 rw-p 00000000 00:00 0
Anonymous:             4 kB
"""


def test_only_clean_read_only_mappings_of_the_named_libraries_are_chosen(tmp_path: Path) -> None:
    smaps = tmp_path / "smaps"
    smaps.write_text(SMAPS)
    # the relocated read-only page (copied on write) and the writable data stay; libc is not named
    assert clean_mappings(("libopenvino",), str(smaps)) == [
        (0x7F0000000000, 0x7F0000002000),
        (0x7F0000002000, 0x7F0000009000),
    ]
    assert clean_mappings(("tokenizers",), str(smaps)) == []


PAGED = """
import sys
from keymiss.qa.footprint import import_openvino, page_out_libraries
import numpy as np
ov = import_openvino()
from openvino import opset13 as ops
x = ops.parameter([1, 4], np.float32)
model = ov.Model([ops.relu(x)], [x])
compiled = ov.Core().compile_model(model, "CPU")
advised = page_out_libraries()
assert advised > 0, advised
# the code a pass needs faults back in: the model still runs, with the same result
out = compiled.create_infer_request().infer({0: np.array([[-1, 2, -3, 4]], np.float32)})
assert out[compiled.outputs[0]].tolist() == [[0, 2, 0, 4]]
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_PAGEOUT is Linux's")
def test_openvino_libraries_are_paged_out_and_a_model_still_runs_after() -> None:
    pytest.importorskip("openvino")
    out = subprocess.run([sys.executable, "-c", PAGED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_page_out_libraries_of_nothing_loaded_advises_nothing() -> None:
    assert page_out_libraries(("no-such-library-here",)) == 0
