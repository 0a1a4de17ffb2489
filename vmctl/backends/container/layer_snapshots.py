"""Disk snapshots of containers: the overlayfs upper layer frozen into a read-only lower layer.

    before:  image <- rootfs/upper (the container writes here)
    after:   image <- SNAP/upper (a lower layer now) <- rootfs/upper (new, empty)

A container's root is one overlayfs mount: `lowerdir=L1:L2:...:image` (top first), its own
`upper`. A snapshot renames the upper folder into the snapshot (no data is copied) and puts
the frozen layers the machine stands on in its record (`ContainerRecord.layers`, top first);
the monitor mounts them at the next start. overlayfs cannot swap the layers of a live mount,
so the container must be stopped (`vmctl stop`) to take, restore or delete one.

- restore: a new empty upper above the snapshot's layers (the upper's files are dropped);
- delete: refused while a later snapshot stands on the layer; while the stopped machine
  does, the layer moves into the machine folder (`rootfs/layers/SNAP`): it stays the
  machine's (deleted with it), and the snapshot is gone.

An interrupted `create` (no meta.json) is undone by `recover`: the layer is the machine's
upper again, or, if the machine wrote a new upper since, a layer kept in its folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ...errors import VmctlError
from ...plans import ContainerRecord
from ...snapshot.snapshot_store import Layer, SnapshotMeta, SnapshotStore
from ...state import MachineRecord, StateStore
from .monitor import PLAN, paths
from .overlay_root import is_mounted

LAYER = "upper"  # a container snapshot's own layer: SNAP/upper
SOURCE = "machine"  # SNAP/machine: whose upper layer is being frozen (for an interrupted create)
KEPT = "layers"  # <machine>/rootfs/layers/<SNAP>: layers of deleted snapshots the machine stands on


def _stopped(store: StateStore, record: MachineRecord, what: str) -> None:
    from .backend import ContainerBackend

    status = ContainerBackend().status(store, record)
    if status.state == "running" or is_mounted(paths(store.folder(record.name))["rootfs"] / "merged"):
        raise VmctlError(f"{record.name}: running: vmctl stop {record.name} first (a container's layers "
                         f"change only while it is stopped: {what})")


def _set_layers(store: StateStore, record: MachineRecord, layers: tuple[str, ...]) -> None:
    """The machine's record and its container.json (what the monitor mounts) on `layers`."""
    old: ContainerRecord = record.plan_as(ContainerRecord)
    folder = store.folder(record.name)
    plan = json.loads((folder / PLAN).read_text())
    plan["lower"] = stacked(layers, image_lower(plan["lower"], old.layers, folder / PLAN))
    record.plan = dataclasses.replace(old, layers=layers)
    store.save(record)
    from ...proc import write_json_atomic

    write_json_atomic(folder / PLAN, plan, indent=2)


def stacked(layers: tuple[str, ...], image: str) -> str:
    """overlayfs' lowerdir value: the frozen layers (top first), then the image's."""
    return ":".join([*layers, image])


def image_lower(lower: str, layers: tuple[str, ...], where: Path) -> str:
    """The image's part of a lowerdir value that stacks `layers` above it."""
    prefix = "".join(f"{layer}:" for layer in layers)
    if not lower.startswith(prefix):
        raise VmctlError(f"{where}: lower {lower!r} does not start with the machine's layers {list(layers)}")
    return lower[len(prefix):]


def _fresh_upper(rootfs: Path, like: Path | None) -> None:
    """An empty upper (and work) folder; the root directory's owner and mode are `like`'s
    (overlayfs shows the upper's root as the container's /)."""
    upper = rootfs / "upper"
    if upper.exists():
        shutil.rmtree(upper)
    shutil.rmtree(rootfs / "work", ignore_errors=True)  # overlayfs wants its work dir to itself
    upper.mkdir(mode=0o755)
    if like is not None and like.exists():
        info = like.stat()
        os.chown(upper, info.st_uid, info.st_gid)
        os.chmod(upper, info.st_mode & 0o7777)


def take(store: StateStore, record: MachineRecord, snapshots: SnapshotStore, name: str) -> SnapshotMeta:
    _stopped(store, record, "vmctl snapshot create")
    rootfs = paths(store.folder(record.name))["rootfs"]
    upper = rootfs / "upper"
    if not upper.is_dir():
        raise VmctlError(f"{record.name}: {upper}: no upper layer (the container never ran?)")
    before = record.plan_as(ContainerRecord).layers
    folder = snapshots.new_folder(name)
    layer = folder / LAYER
    moved = False
    try:
        (folder / SOURCE).write_text(record.name)
        os.rename(upper, layer)
        moved = True
        _fresh_upper(rootfs, layer)
        _set_layers(store, record, (str(layer), *before))
        layers = (str(layer), *before)
        meta = SnapshotMeta(name, record.name, "container", "disk",
                            [Layer.of(index, Path(path)) for index, path in enumerate(layers)],
                            record.plan_as(ContainerRecord).to_json())
        snapshots.save(meta)
    except BaseException:
        if moved:  # the layer is the upper again, the record as it was
            shutil.rmtree(upper, ignore_errors=True)
            os.rename(layer, upper)
            if record.plan_as(ContainerRecord).layers != before:
                _set_layers(store, record, before)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return meta


def restore(store: StateStore, record: MachineRecord, snapshots: SnapshotStore, meta: SnapshotMeta) -> None:
    _stopped(store, record, "vmctl snapshot restore")
    snapshots.check_layers(meta)
    rootfs = paths(store.folder(record.name))["rootfs"]
    _fresh_upper(rootfs, Path(meta.layers[0].path))
    _set_layers(store, record, tuple(layer.path for layer in meta.layers))
    _prune_kept(store, record, snapshots)


def _prune_kept(store: StateStore, record: MachineRecord, snapshots: SnapshotStore) -> None:
    """Layers kept in the machine folder that neither the machine nor a snapshot stands on."""
    kept = paths(store.folder(record.name))["rootfs"] / KEPT
    if not kept.is_dir():
        return
    used = set(record.plan_as(ContainerRecord).layers)
    used.update(layer.path for meta in snapshots.list() for layer in meta.layers)
    for path in kept.iterdir():
        if str(path) not in used:
            shutil.rmtree(path)


def delete(store: StateStore, snapshots: SnapshotStore, meta: SnapshotMeta) -> str:
    own = meta.layers[0].path
    later = [other.name for other in snapshots.list()
             if other.name != meta.name and any(layer.path == own for layer in other.layers)]
    if later:
        raise VmctlError(f"snapshot {meta.name!r}: later snapshot(s) {', '.join(later)} stand on its layer "
                         f"(delete those first)")
    record = store.load(meta.machine) if store.exists(meta.machine) else None
    if record is None or not isinstance(record.plan, ContainerRecord) or own not in record.plan.layers:
        snapshots.remove(meta.name)
        return "removed"
    _stopped(store, record, "its layer moves into the machine")
    kept = paths(store.folder(record.name))["rootfs"] / KEPT
    kept.mkdir(exist_ok=True)
    target = kept / meta.name
    if target.exists():
        shutil.rmtree(target)
    os.rename(own, target)
    layers = tuple(str(target) if layer == own else layer for layer in record.plan.layers)
    _set_layers(store, record, layers)
    snapshots.remove(meta.name)
    return f"removed (its layer stays under {meta.machine}, which stands on it)"


def recover(store: StateStore, folder: Path) -> str | None:
    """Undo an interrupted `create` of a container snapshot in `folder` (no meta.json): what
    was done, or None when `folder` is not one."""
    layer = folder / LAYER
    try:
        machine = (folder / SOURCE).read_text().strip()
    except FileNotFoundError:
        return None
    record = store.load(machine) if store.exists(machine) else None
    if record is not None and not isinstance(record.plan, ContainerRecord):
        return None  # another backend's machine (libvirt writes the same file)
    if not layer.is_dir() or record is None:
        shutil.rmtree(folder)
        return "incomplete snapshot removed"
    _stopped(store, record, "an interrupted snapshot is undone")
    layers = record.plan_as(ContainerRecord).layers
    rootfs = paths(store.folder(machine))["rootfs"]
    upper = rootfs / "upper"
    if not upper.exists() or not any(upper.iterdir()):
        shutil.rmtree(upper, ignore_errors=True)
        os.rename(layer, upper)  # nothing written since: the layer is the upper again
        _set_layers(store, record, tuple(path for path in layers if path != str(layer)))
        shutil.rmtree(folder)
        return f"incomplete snapshot removed ({machine}'s upper layer put back)"
    (rootfs / KEPT).mkdir(exist_ok=True)
    target = rootfs / KEPT / folder.name
    os.rename(layer, target)
    if str(layer) in layers:
        _set_layers(store, record, tuple(str(target) if path == str(layer) else path for path in layers))
        what = f"its layer stays under {machine}, which stands on it"
    else:
        what = f"{machine} ran without it since: its files are kept in {target}"
    shutil.rmtree(folder)
    return f"incomplete snapshot removed ({what})"
