"""The RESP front end: any Redis client GETs through keymiss."""

from . import admin as _admin  # noqa: F401  (registers the connection and operator commands)
from .app import Server, load_app, run

__all__ = ["Server", "load_app", "run"]
