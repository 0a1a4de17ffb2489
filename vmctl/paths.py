"""Where vmctl keeps its cache (built images) and its state (running machines)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$VMCTL_CACHE_DIR, else $XDG_CACHE_HOME/vmctl, else ~/.cache/vmctl."""
    explicit = os.environ.get("VMCTL_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "vmctl"


def state_dir() -> Path:
    """$VMCTL_STATE_DIR, else $XDG_STATE_HOME/vmctl, else ~/.local/state/vmctl."""
    explicit = os.environ.get("VMCTL_STATE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "vmctl"
