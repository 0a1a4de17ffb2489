"""Human sizes: "512M", "2G", "1GiB", "4096" (bytes)."""

from __future__ import annotations

import re

from .errors import VmctlError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(I?B?)\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """Binary units: K/M/G/T with optional "iB"/"B" suffix all mean powers of 1024."""
    if isinstance(text, int):
        if text < 0:
            raise VmctlError(f"{what}: negative size {text}")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise VmctlError(f"{what}: cannot read size {text!r} (examples: 512M, 2G, 1GiB, 4096)")
    number, unit, _ = match.groups()
    return int(number) << _SHIFT[unit.upper()]


def format_size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def human_size(n: int) -> str:
    """Approximate, for people: 1.6G, 24.8M, 512B."""
    size = float(n)
    for unit in ("B", "K", "M"):
        if size < 1024:
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}G"
