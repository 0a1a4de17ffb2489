"""The YAML machine spec: parsing with positions, validation, defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import DiskSpec, MachineSpec, NetworkSpec, SpecFile, SshSpec

if TYPE_CHECKING:
    from .parse import load_spec, parse_spec

__all__ = ["DiskSpec", "MachineSpec", "NetworkSpec", "SshSpec", "SpecFile", "load_spec", "parse_spec"]


def __getattr__(name: str) -> Any:
    """The parser (PyYAML, difflib) is imported when a spec is read, not by every user of the
    model: `vmctl exec`, `ps` and the VMM never read one, and each module costs start-up time
    (seconds, in the nested host)."""
    if name in ("load_spec", "parse_spec"):
        from . import parse

        return getattr(parse, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
