"""The RESP front end: any Redis client GETs through keymiss."""

# Importing the command modules fills the command table.
from . import edits, introspection, keys, session, strings, transactions  # noqa: F401
from .app import Server, load_app, run

__all__ = ["Server", "load_app", "run"]
