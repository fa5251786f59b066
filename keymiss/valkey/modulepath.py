"""Where the built Valkey / Redis module is: ``redis-server --loadmodule "$(keymiss redis-module)"``."""

from __future__ import annotations

from pathlib import Path

from keymiss.errors import ConfigError

__all__ = ["module_path"]


def module_path() -> Path:
    """The absolute path of the module file the package's install built (``keymiss/module``)."""
    path = (Path(__file__).parent / "module" / "keymiss.so").resolve()
    if not path.is_file():
        raise ConfigError(
            f"the keymiss server module is not built ({path} is missing): reinstall the package "
            "(pip install .) on a machine with gcc"
        )
    return path
