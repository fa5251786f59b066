"""What keeps the serving reader's process small once start-up is over (``bench/qa_footprint.py``
measures it; docs/benchmarks.md, "The default serve's footprint", has the breakdown).

- ``import_openvino``: OpenVINO's package imports its model converter (``openvino.tools.ovc``,
  with the TensorFlow frontend library and telemetry) for ``openvino.convert_model``; keymiss
  builds its graphs itself and never converts, and the converter is ~10 MB of the idle process.
- ``trim_heap``: loading the tokenizer, reading and compiling the graph and the first forward
  passes free most of what they allocate, and glibc keeps freed pages inside its arenas (one per
  thread that allocated) instead of handing them back: ``malloc_trim`` returns them.
- ``page_out_libraries``: much of OpenVINO's code (the IR reader, the CPU plugin's graph
  transformations and kernel generators) runs only while a model is read and compiled; its pages
  are clean copies of the library files, and ``madvise(MADV_PAGEOUT)`` over the libraries'
  read-only mappings that hold no copied-on-write page hands them back. Pages a forward pass
  needs fault back in at the next question (about 26 MB of the ~50 MB, once: the first question
  takes ~40 ms longer). The kernel leaves pages that another process also maps, so the saving is
  there only where no other process has the same library files loaded.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Any

log = logging.getLogger("keymiss.qa")

#: imported by ``openvino/__init__.py`` inside ``try: ... except ImportError``: left out, the
#: package works as before, without ``openvino.convert_model``
CONVERTER = "openvino.tools.ovc"


def import_openvino() -> Any:
    """The ``openvino`` module. Imported here first, it comes without its model converter (the
    converter stays importable by name afterwards: only the package's ``convert_model`` shortcut
    is missing); imported before, by the application, it is returned as it is."""
    done = sys.modules.get("openvino")
    if done is not None:
        return done
    blocked = CONVERTER not in sys.modules
    if blocked:
        sys.modules[CONVERTER] = None  # type: ignore[assignment]  # the import system's "not here"
    try:
        import openvino
    finally:
        if blocked and CONVERTER in sys.modules and sys.modules[CONVERTER] is None:
            del sys.modules[CONVERTER]
    return openvino


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim(0)``, every arena).
    False where the C library has none (musl, macOS, Windows): nothing is trimmed there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own C library
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    released = bool(trim(0))
    log.debug("malloc_trim: %s", "pages handed back" if released else "nothing to hand back")
    return True


#: the libraries whose start-up-only code ``settle`` hands back: OpenVINO's runtime, plugins and
#: IR frontend (``libopenvino*``) and its Python binding, the tokenizers binding, numpy's core
#: and its OpenBLAS (what the C library, libpython and the system's libraries hold is left: other
#: processes map them too)
LIBRARIES = ("libopenvino", "_pyopenvino", "tokenizers", "_multiarray", "libscipy_openblas", "libgfortran")

#: ``MADV_PAGEOUT`` (Linux 5.4+); Python before 3.12 lacks the name
PAGEOUT = 21


def clean_mappings(
    names: tuple[str, ...] = LIBRARIES, maps: str = "/proc/self/smaps"
) -> list[tuple[int, int]]:
    """Address ranges of the read-only mappings of files whose name starts with one of ``names``
    and that hold no anonymous (copied-on-write) page: only clean copies of the files' pages."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    with open(maps) as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                current = None
                file = os.path.basename(fields[5]) if len(fields) > 5 else ""
                if "w" not in fields[1] and file.startswith(names):
                    lo, hi = fields[0].split("-")
                    current = (int(lo, 16), int(hi, 16))
            elif fields[0] == "Anonymous:" and current is not None:
                if int(fields[1]) == 0:
                    out.append(current)
                current = None
    return out


def page_out_libraries(names: tuple[str, ...] = LIBRARIES) -> int:
    """Hand back the resident, clean pages of the libraries named (see the module's docstring);
    the bytes of address space advised (0 where the system has no ``MADV_PAGEOUT``: off Linux,
    or a kernel before 5.4 refuses it)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    advised = 0
    for lo, hi in clean_mappings(names):
        if madvise(lo, hi - lo, PAGEOUT) != 0:
            log.debug("madvise(MADV_PAGEOUT) refused: %s", os.strerror(ctypes.get_errno()))
            return advised
        advised += hi - lo
    log.debug("paged out %d kB of library mappings", advised // 1024)
    return advised
