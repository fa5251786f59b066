"""The pure-Python RESP front end: any Redis client GETs through keymiss, over any store (the LMDB
store's home: larger than RAM, no load step)."""

# Importing the command modules fills the command table.
from keymiss.runtime.apps import load_app  # kept here, where earlier releases had it
from keymiss.server import bits, edits, introspection, keys, moves, session, strings, transactions  # noqa: F401
from keymiss.server.app import Server, run

__all__ = ["Server", "load_app", "run"]
