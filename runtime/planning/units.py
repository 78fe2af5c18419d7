"""Byte sizes as flags take them (`parse_bytes`: 80GB, 16GiB) and as the plan prints them
(`format_bytes`)."""

from __future__ import annotations

import math
import re
from typing import Optional

from runtime.errors import RuntimeInputError

GiB = 1 << 30

_UNITS = {"": 1, "b": 1,
          "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str, flag: str = "--device-memory") -> int:
    """'80GB' -> 80 * 10**9, '16GiB' -> 16 * 2**30, '1.5TB', '512MiB', '1000000' (bytes).

    Decimal units (kB/KB, MB, GB, TB; a bare K/M/G/T means the same) and binary ones (KiB, MiB,
    GiB, TiB), case-insensitive, spaces allowed. Errors name the flag and its value.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise RuntimeInputError(f"{flag} {text!r}: expected a size such as 80GB, 16GiB, 1.5TB or "
                                f"a number of bytes")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value) or value < 1:
        raise RuntimeInputError(f"{flag} {text!r}: the size must be at least one byte")
    return int(value)


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"
