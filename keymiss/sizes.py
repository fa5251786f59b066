"""Human memory sizes, read the way Redis reads ``maxmemory`` (``1mb`` = 2**20, ``1m`` = 10**6)."""

from __future__ import annotations

import os
import re

from keymiss.errors import ConfigError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")

#: Share of the machine's available RAM that ``max_memory="auto"`` claims. An edge device states its
#: capability as free RAM; a quarter leaves room for the model, the interpreter and the OS.
AUTO_FRACTION = 0.25


def available_memory() -> int:
    """Bytes the kernel reports as available (MemAvailable), falling back to free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # pragma: no cover - exotic platforms
        return 1024**3


def parse_size(value: int | float | str | None, *, what: str = "size") -> int:
    """Turn ``"256MB"``, ``"1.5gb"``, ``"auto"`` or a number of bytes into bytes."""
    if value is None:
        raise ConfigError(f"{what} is required")
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size, not {value!r}")
    if isinstance(value, int | float):
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {value!r}")
        return int(value)
    text = value.strip().lower()
    if text == "auto":
        return max(1024**2, int(available_memory() * AUTO_FRACTION))
    m = _SIZE.match(text)
    if not m or m.group(2) not in _UNITS:
        raise ConfigError(f"{what}: cannot read {value!r} as a size (examples: 256MB, 1gb, 500m, auto)")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return size


def format_size(n: int) -> str:
    """Short human form used in logs and INFO (``256.0MB``)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1024
    return f"{size:.1f}GB"  # pragma: no cover
