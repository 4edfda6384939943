"""Byte sizes as users write them: ``512B``, ``64KB``, ``8MB``, ``5GB`` or plain integers."""

from __future__ import annotations

import math
import re

from distmerge.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1000,
    "KB": 1000,
    "M": 1000**2,
    "MB": 1000**2,
    "G": 1000**3,
    "GB": 1000**3,
    "T": 1000**4,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
# Larger than any disk or memory budget; a bigger value is a typo (or ``.inf``), not a plan.
MAX_SIZE = 1000**5
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, field: str = "size") -> int:
    """Parse a byte count; decimal units (KB = 1000 B) as storage vendors and mergekit use.

    Binary units are accepted spelled out (``KiB``, ``MiB``, ``GiB``).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{field}: expected a size such as 512MB or 5GB, got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{field}: {value!r} is not a size; write bytes or a unit, e.g. 512MB, 5GB")
        if value > MAX_SIZE:
            raise ConfigError(f"{field}: {value!r} bytes is more than {MAX_SIZE} (1 PB); a typo?")
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{field}: {value!r} is not a whole number of bytes; write e.g. 512MB")
        number, unit = float(value), ""
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ConfigError(
                f"{field}: {value!r} is not a size; write bytes or a unit, e.g. 512B, 64KB, 8MB, 5GB"
            )
        number, unit = float(match.group(1)), match.group(2).upper()
    if unit not in _UNITS:
        raise ConfigError(
            f"{field}: unknown unit {unit!r} in {value!r}; use B, KB, MB, GB, TB (or KiB, MiB, GiB)"
        )
    if unit in ("", "B") and not number.is_integer():
        raise ConfigError(f"{field}: {value!r} is not a whole number of bytes; write e.g. 512MB")
    if number * _UNITS[unit] > MAX_SIZE:
        raise ConfigError(f"{field}: {value!r} is more than 1 PB; a typo?")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{field}: size must be positive, got {value!r}")
    return size


def format_size(n: float) -> str:
    """Human-readable size with decimal units, for plans and reports."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
