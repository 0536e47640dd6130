"""Sizes as people write them (512M, 10G, 1T) and as people read them."""

from __future__ import annotations

import re

from corral.errors import InvalidInput

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``512M``, ``10G``, ``1TiB`` or a plain byte count (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidInput(
            f"'{text}' is not a valid {what}.", hint="Write a number with K, M, G or T, e.g. 512M."
        )
    number, unit = match.groups()
    value = int(float(number) * _UNITS[unit.upper()])
    if value <= 0:
        raise InvalidInput(f"The {what} must be larger than zero.")
    return value


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
