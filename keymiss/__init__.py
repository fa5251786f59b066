"""keymiss: a compute-on-miss cache for expensive ML inference that speaks the Redis protocol."""

from keymiss.api import Keymiss
from keymiss.codecs import Codec, Value
from keymiss.engine.syncface import SyncKeymiss
from keymiss.errors import (
    BatchResultError,
    BusyError,
    CodecError,
    ComputeTimeoutError,
    ConfigError,
    HandlerError,
    KeyMismatchError,
    KeymissError,
    KeyspaceError,
    StoreError,
)
from keymiss.keyspace import Keyspace
from keymiss.sizes import parse_size
from keymiss.stores import Item, LocalStore, MemoryStore, Store, Write, open_store
from keymiss.stores.eviction import LRUPolicy, Policy
from keymiss.version import __version__

__all__ = [
    "BatchResultError",
    "BusyError",
    "Codec",
    "CodecError",
    "ComputeTimeoutError",
    "ConfigError",
    "HandlerError",
    "Item",
    "KeyMismatchError",
    "Keymiss",
    "KeymissError",
    "Keyspace",
    "KeyspaceError",
    "LRUPolicy",
    "LocalStore",
    "MemoryStore",
    "Policy",
    "Store",
    "StoreError",
    "SyncKeymiss",
    "Value",
    "Write",
    "__version__",
    "open_store",
    "parse_size",
]
