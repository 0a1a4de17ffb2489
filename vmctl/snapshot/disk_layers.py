"""Disk snapshots on qcow2 overlay chains: the current overlay becomes a read-only layer.

    before:  base <- disk0.qcow2 (the machine writes here)
    after:   base <- SNAP/disk0.qcow2 (read-only) <- disk0.qcow2 (new, empty: the machine goes on here)

The layer keeps its content forever (a restore or a clone builds a new overlay above it). The
move is a rename (same file system: both live in the state directory), so taking a disk
snapshot copies no data. Every step is undone if a later one fails.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..disk.qcow2.create import create_overlay
from ..disk.qcow2.ops import info, rebase
from ..errors import VmctlError


def freeze_overlay(overlay: Path, layer: Path) -> None:
    """Make `overlay`'s content the read-only `layer` and put a new empty overlay above it at
    `overlay`'s path. The image must not be open for writing elsewhere (the VMM closes it).

    Crash-safe in this order: `layer` is first a second name (hard link) of the overlay, the
    new overlay is made under a temporary name, then renamed over the old name in one step.
    A kill at any point leaves `overlay` a complete disk: the old one, or the new one above
    the layer (whose snapshot folder then has no meta.json: `vmctl snapshot delete` merges
    the layer back into it)."""
    os.link(overlay, layer)
    temporary = overlay.with_name(f".{overlay.name}.new")
    try:
        temporary.unlink(missing_ok=True)
        create_overlay(str(layer), str(temporary), absolute=True, durable=True)
        os.replace(temporary, overlay)
    except BaseException:
        temporary.unlink(missing_ok=True)
        layer.unlink(missing_ok=True)
        raise
    os.chmod(layer, 0o444)


def overlay_on(layer: Path, overlay: Path) -> None:
    """A fresh overlay at `overlay` over `layer` (a restore, or a clone's own disk)."""
    temporary = overlay.with_name(f".{overlay.name}.new")
    temporary.unlink(missing_ok=True)
    create_overlay(str(layer), str(temporary), absolute=True, durable=True)
    os.replace(temporary, overlay)


def backing_of(image: Path) -> str | None:
    try:
        return info(str(image)).get("backing-filename")
    except (OSError, VmctlError):
        return None


def merge_layer_into(child: Path, layer: Path) -> None:
    """Make `child` independent of `layer` (whose own backing it takes over), copying the data
    it read from `layer`: the guest sees the same disk, and `layer` can go."""
    parent = backing_of(layer)
    os.chmod(child, 0o644) if not os.access(child, os.W_OK) else None
    rebase(str(child), parent, absolute=True)
