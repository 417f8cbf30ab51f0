"""Parse and print memory sizes: every budget in tightfit goes through `parse_size`."""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
ACCEPTED_FORMS = (
    "a number of bytes (1500000000, 1.5e9) or a number with a unit: "
    "B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB or K/M/G/T (powers of 1024), e.g. '2GiB', '512MB'"
)


def parse_size(size: int | float | str) -> int:
    """Return `size` in bytes: accepts 2GiB, 512MB, 1.5e9, 4096 (see ACCEPTED_FORMS)."""
    if isinstance(size, bool):
        raise ValueError(f"invalid size {size!r}: expected {ACCEPTED_FORMS}")
    if isinstance(size, (int, float)):
        value, unit = float(size), ""
    elif isinstance(size, str):
        match = _PATTERN.match(size)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"invalid size {size!r}: expected {ACCEPTED_FORMS}")
        value, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise TypeError(f"invalid size {size!r} of type {type(size).__name__}: expected {ACCEPTED_FORMS}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid size {size!r}: must be a finite, non-negative amount; {ACCEPTED_FORMS}")
    return int(round(value * _UNITS[unit]))


def format_size(nbytes: int | float) -> str:
    """Human-readable binary size, e.g. 1536 -> '1.50 KiB'."""
    sign = "-" if nbytes < 0 else ""
    value = float(abs(nbytes))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
