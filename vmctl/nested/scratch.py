"""Temp dirs that a later run removes when the process that made them died uncleanly.

Each dir records its owner's pid. A run removes its own dir in a `finally`; a SIGKILLed
run cannot, so every new dir creation first sweeps same-prefix dirs whose owner is gone.
(QEMU itself dies with its parent: see l1_qemu.die_with_parent.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..proc import pid_alive

OWNER = ".owner-pid"


def make(prefix: str) -> Path:
    sweep(prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    (folder / OWNER).write_text(str(os.getpid()))
    return folder


def sweep(prefix: str) -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = int((folder / OWNER).read_text())
        except (OSError, ValueError):
            continue  # not ours, or still being created
        if not pid_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)

