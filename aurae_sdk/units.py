"""Quantities as people write them: `256M`, `1G`, `1.5Gi` bytes.

Suffixes are binary, as in docker, systemd and the kernel's own memory.max
(K = 1024): K/Ki, M/Mi, G/Gi, T/Ti, with an optional trailing B. A bare
number is bytes.
"""

from __future__ import annotations

import re

_BYTES = re.compile(r"\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?)?B?\s*", re.IGNORECASE)
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
BYTES_HELP = "bytes, or with a binary suffix: 512K, 256M, 1G, 2T"


def parse_bytes(value: int | str) -> int:
    """Bytes from an int or a text such as "256M"; ValueError (TypeError for a bool) says what
    is accepted."""
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not a size: give {BYTES_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative: give {BYTES_HELP}")
        return value
    match = _BYTES.fullmatch(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a size: give {BYTES_HELP}")
    unit = (match["unit"] or "").upper().removesuffix("I")
    number = float(match["number"]) if "." in match["number"] else int(match["number"])
    result = number * 1024 ** _POWERS[unit]
    if result != int(result):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(result)


def format_bytes(value: int) -> str:
    """The shortest exact form: 268435456 -> "256M", 1000 -> "1000"."""
    for unit in ("T", "G", "M", "K"):
        size = 1024 ** _POWERS[unit]
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return str(value)
