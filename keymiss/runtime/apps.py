"""Loading the app a front end serves, uvicorn style (``module:attr``)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from keymiss import api
from keymiss.engine.cache import Keymiss
from keymiss.errors import ConfigError


def load_app(spec: str | None) -> Keymiss:
    """Import ``module:attr`` (uvicorn style, from the current directory); no spec: an empty app."""
    if not spec:
        return api.Keymiss()
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import app module {module_name!r}: {exc}") from exc
    try:
        obj: Any = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, Keymiss) and callable(obj):
        obj = obj()
    if not isinstance(obj, Keymiss):
        raise ConfigError(f"{spec} is a {type(obj).__name__}, not a keymiss.Keymiss")
    return obj
