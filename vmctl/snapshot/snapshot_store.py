"""Named snapshots of machines, kept apart from the machines so clones outlive their source.

    <state_dir>/snapshots/<SNAP>/meta.json       what it is: machine, kind, layers, plan (written last)
    <state_dir>/snapshots/<SNAP>/disk<N>.qcow2   read-only disk layers: the machine's overlays as they
                                                  were; the machine went on with new overlays above them
    <state_dir>/snapshots/<SNAP>/state, memory   a memory snapshot only (snapshot_file.py)

A directory without meta.json is an interrupted creation: listed as incomplete, never used,
removed by `delete`. Layers record their size and mtime; a layer that is gone or changed makes
the snapshot unusable, said in one line.
"""

from __future__ import annotations

import builtins
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import VmctlError
from ..paths import state_dir
from ..proc import write_json_atomic
from .snapshot_file import SnapshotError, sync_directory

META = "meta.json"
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass
class Layer:
    index: int  # the machine's disk index (its slot order)
    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, index: int, path: Path) -> "Layer":
        info = path.stat()
        return cls(index, str(path), info.st_size, info.st_mtime_ns)


@dataclass
class SnapshotMeta:
    name: str
    machine: str
    backend: str
    kind: str  # "disk" or "memory"
    layers: list[Layer]
    plan: dict  # the machine's recorded plan when it was taken (what clones start from)
    created: float = field(default_factory=time.time)
    memory_bytes: int = 0

    @classmethod
    def from_json(cls, data: dict) -> "SnapshotMeta":
        data = dict(data)
        data["layers"] = [Layer(**layer) for layer in data["layers"]]
        return cls(**data)


class SnapshotStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()) / "snapshots"

    def folder(self, name: str) -> Path:
        return self.root / name

    def new_folder(self, name: str) -> Path:
        """An empty folder for snapshot `name` (refused when the name is taken or not a plain name)."""
        if not name or not set(name) <= NAME_CHARS or name.startswith("."):
            raise VmctlError(f"snapshot name {name!r}: use letters, digits, '-', '_' and '.'")
        folder = self.folder(name)
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            raise VmctlError(f"snapshot {name!r} already exists (vmctl snapshot delete {name})") from None
        return folder

    def save(self, meta: SnapshotMeta) -> None:
        folder = self.folder(meta.name)
        write_json_atomic(folder / META, asdict(meta), indent=2)
        sync_directory(folder)

    def load(self, name: str) -> SnapshotMeta:
        folder = self.folder(name)
        path = folder / META
        if not folder.is_dir():
            known = ", ".join(m.name for m in self.list()) or "none"
            raise VmctlError(f"no snapshot named {name!r} (snapshots: {known})")
        try:
            return SnapshotMeta.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            raise SnapshotError(f"{folder}: incomplete snapshot (its creation was interrupted): "
                                f"vmctl snapshot delete {name}") from None
        except (ValueError, TypeError, KeyError) as error:
            raise SnapshotError(f"{path}: unreadable: {error}") from None

    def list(self) -> list[SnapshotMeta]:
        if not self.root.exists():
            return []
        found = []
        for folder in sorted(self.root.iterdir()):
            try:
                found.append(SnapshotMeta.from_json(json.loads((folder / META).read_text())))
            except (OSError, ValueError, TypeError, KeyError):
                continue
        return found

    def incomplete(self) -> builtins.list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not (p / META).exists())

    def check_layers(self, meta: SnapshotMeta) -> None:
        """Every disk layer still there and unchanged since the snapshot (else one line)."""
        for layer in meta.layers:
            path = Path(layer.path)
            try:
                info = path.stat()
            except FileNotFoundError:
                raise SnapshotError(f"{path}: disk layer of snapshot {meta.name!r} is missing") from None
            if (info.st_size, info.st_mtime_ns) != (layer.size, layer.mtime_ns):
                raise SnapshotError(f"{path}: disk layer of snapshot {meta.name!r} changed since it was taken "
                                    f"(size {info.st_size}, was {layer.size})")

    def remove(self, name: str) -> None:
        shutil.rmtree(self.folder(name))
