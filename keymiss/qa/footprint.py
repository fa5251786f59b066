"""What keeps the serving reader's process small once start-up is over (``bench/qa_footprint.py``
measures it; docs/benchmarks.md, "The default serve's footprint", has the breakdown).

- ``import_openvino``: OpenVINO's package imports its model converter (``openvino.tools.ovc``,
  with the TensorFlow frontend library and telemetry) for ``openvino.convert_model``; keymiss
  builds its graphs itself and never converts, and the converter is ~10 MB of the idle process.
- ``trim_heap``: loading the tokenizer, reading and compiling the graph and the first forward
  passes free most of what they allocate, and glibc keeps freed pages inside its arenas (one per
  thread that allocated) instead of handing them back: ``malloc_trim`` returns them.
"""

from __future__ import annotations

import ctypes
import logging
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
