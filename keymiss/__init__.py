"""keymiss: a compute-on-miss cache for expensive ML inference that speaks the Redis protocol."""

from .codecs import Codec
from .engine import Keymiss
from .errors import (
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
from .keyspace import Keyspace
from .sizes import parse_size
from .stores import Item, LocalStore, MemoryStore, Store, Write, open_store
from .stores.eviction import LRUPolicy, Policy

__version__ = "0.1.0"

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
    "Write",
    "__version__",
    "open_store",
    "parse_size",
]
