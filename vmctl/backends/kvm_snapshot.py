"""Snapshots, stop/start and clones of native (kvm) machines, on top of the VMM daemon.

- take: a running machine's VMM pauses the guest, freezes each overlay vmctl made into a
  read-only layer of the snapshot (the machine goes on over a new overlay) and, for a memory
  snapshot, saves the whole machine; a stopped machine's overlays are frozen in place.
- restore: the stopped machine's overlays are replaced by new ones over the snapshot's
  layers; from a memory snapshot the machine then continues the saved guest.
- clone: a new machine from a snapshot: the source's plan, its own overlays over the layers,
  its own TAP, MAC and address; the VMM tells the restored guest its new identity.
- restart (`vmctl start`): the stopped machine's VMM again, booting from its own disks.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from ..errors import VmctlError
from ..guest_contract import XFER_DIR, XFER_TAG
from ..plans import DiskPlan, KvmPlan, MountPlan, RestorePlan
from ..proc import pid_alive, wait_gone
from ..snapshot.disk_layers import backing_of, freeze_overlay, merge_layer_into, overlay_on
from ..snapshot.snapshot_file import SnapshotError, discard, read_snapshot
from ..snapshot.snapshot_store import Layer, SnapshotMeta, SnapshotStore
from ..state import CONSOLE, CONTROL, OUTCOME, MachineRecord, StateStore
from ..vmm.control import request
from .kvm import spawn

STOPPED = "stopped"  # marker file: stopped by `vmctl stop`, to be started again
VMM_EXIT_GRACE = 5.0  # seconds a failed save waits for a dying VMM (a healthy one costs this once)


def running(store: StateStore, record: MachineRecord) -> bool:
    return pid_alive(record.pid) and store.outcome(record.name) is None


def take(store: StateStore, record: MachineRecord, snapshots: SnapshotStore, name: str, memory: bool) -> SnapshotMeta:
    live = running(store, record)
    if memory and not live:
        raise VmctlError(f"{record.name}: not running: a memory snapshot saves a running guest "
                         f"(vmctl snapshot create {record.name} {name} saves its disks)")
    folder = snapshots.new_folder(name)
    try:
        if live:
            _hand_to_vmm(store.folder(record.name), folder)
            answer = request(store.folder(record.name) / CONTROL, "snapshot", timeout=600, folder=str(folder),
                             memory=memory)
            layers = [Layer(**layer) for layer in answer["layers"]]
            memory_bytes = int(answer.get("memory_bytes", 0))
        else:
            layers = []
            for index, disk in _own_disks(record.plan_as(KvmPlan)):
                layer = folder / f"disk{index}.qcow2"
                freeze_overlay(Path(disk.path), layer)
                layers.append(Layer.of(index, layer))
            memory_bytes = 0
        plan = dataclasses.replace(record.plan_as(KvmPlan), restore=None).to_json()
        meta = SnapshotMeta(name, record.name, record.backend, "memory" if memory else "disk", layers, plan,
                            memory_bytes=memory_bytes)
        snapshots.save(meta)
    except BaseException as error:
        if live:  # a VMM killed mid-save drops its socket before it has exited: let it finish dying
            wait_gone(record.pid, VMM_EXIT_GRACE)
        try:
            _remove_incomplete(store, folder)  # never a layer a machine's overlay still reads
        except VmctlError as problem:
            raise VmctlError(f"{error}; {problem}") from None
        raise
    return meta


def _hand_to_vmm(machine_folder: Path, folder: Path) -> None:
    """A sandboxed VMM runs as the owner of its machine folder (nobody): it writes the
    snapshot, so the new folder becomes its too."""
    owner = machine_folder.stat()
    if os.geteuid() == 0 and owner.st_uid != 0:
        os.chown(folder, owner.st_uid, owner.st_gid)


def _own_disks(plan: KvmPlan) -> list[tuple[int, DiskPlan]]:
    """The disks whose overlay vmctl made (the ones a snapshot freezes), by slot index."""
    return [(index, disk) for index, disk in enumerate(plan.disks) if disk.created and not disk.read_only]


def _layer_for(meta: SnapshotMeta, index: int) -> Path:
    for layer in meta.layers:
        if layer.index == index:
            return Path(layer.path)
    raise SnapshotError(f"snapshot {meta.name!r} has no layer for disk {index}")


def _check_usable(snapshots: SnapshotStore, meta: SnapshotMeta) -> None:
    snapshots.check_layers(meta)
    if meta.kind == "memory":
        read_snapshot(snapshots.folder(meta.name))  # header, checksums, memory file: refused here, in one line


def restore(store: StateStore, record: MachineRecord, snapshots: SnapshotStore, meta: SnapshotMeta) -> bool:
    """Put the stopped machine back to `meta`; True when it was started (memory snapshot)."""
    if meta.machine != record.name:
        raise VmctlError(f"snapshot {meta.name!r} is of machine {meta.machine!r}, not {record.name!r} "
                         f"(vmctl up --from-snapshot {meta.name} --name NEW makes a new machine from it)")
    if running(store, record):
        raise VmctlError(f"{record.name}: running: vmctl stop {record.name} first")
    _check_usable(snapshots, meta)
    plan = record.plan_as(KvmPlan)
    for index, disk in _own_disks(plan):
        overlay_on(_layer_for(meta, index), Path(disk.path))
    if meta.kind != "memory":
        return False
    record.plan = dataclasses.replace(plan, restore=RestorePlan(str(snapshots.folder(meta.name)), record.name))
    _start(store, record)
    return True


def _own_transfer_share(plan: KvmPlan, folder: Path) -> tuple[MountPlan, ...]:
    """The plan's shares with the transfer share moved to the clone's own folder: the
    source's folder may be gone (the pytest pattern removes it) and is not the clone's."""
    xfer = folder / XFER_DIR
    xfer.mkdir(mode=0o700, exist_ok=True)
    return tuple(dataclasses.replace(m, host=str(xfer)) if m.tag == XFER_TAG else m for m in plan.mounts)


def clone(store: StateStore, snapshots: SnapshotStore, meta: SnapshotMeta, name: str,
          spec_file: str | None = None) -> MachineRecord:
    """A new machine `name` from the snapshot (started; a memory snapshot continues its guest)."""
    _check_usable(snapshots, meta)
    plan = KvmPlan.from_json(meta.plan, f"snapshot {meta.name!r}: plan")
    for index, disk in enumerate(plan.disks):
        if not disk.read_only and not disk.created:
            raise VmctlError(f"snapshot {meta.name!r}: disk {index} ({disk.path}) is written in place by "
                             f"{meta.machine}: a clone cannot share it (give it overlay: true)")
    record = MachineRecord(name=name, backend="kvm", spec_file=spec_file)
    folder = store.create(record)
    try:
        disks = list(plan.disks)
        for index, disk in _own_disks(plan):
            own = folder / "disks" / f"disk{index}.qcow2"
            own.parent.mkdir(parents=True, exist_ok=True)
            overlay_on(_layer_for(meta, index), own)
            disks[index] = dataclasses.replace(disk, path=str(own))
        # The host ports are the source's; the MAC is a new one.
        network = dataclasses.replace(plan.network, forwards=(), mac=None)
        ssh = plan.ssh
        if ssh.key and Path(ssh.key).exists():  # the guest trusts the source's key: the clone keeps a copy
            (folder / "ssh").mkdir(mode=0o700, exist_ok=True)
            ssh = dataclasses.replace(ssh, key=str(shutil.copy2(ssh.key, folder / "ssh" / Path(ssh.key).name)))
        restore = RestorePlan(str(snapshots.folder(meta.name)), name) if meta.kind == "memory" else None
        # `snapshot`: what it came from (deleting that snapshot is refused)
        record.plan = dataclasses.replace(plan, disks=tuple(disks), network=network, ssh=ssh, restore=restore,
                                          snapshot=meta.name, mounts=_own_transfer_share(plan, folder))
        record.resources = {"disks": [d.path for d in disks if d.created]}
        store.save(record)
        spawn(store, record)
    except BaseException:
        store.delete(name)
        raise
    return record


def stop(store: StateStore, record: MachineRecord, backend, timeout: float) -> None:
    backend.stop(store, record, timeout)
    (store.folder(record.name) / STOPPED).touch()


def restart(store: StateStore, record: MachineRecord) -> None:
    """`vmctl start`: the VMM again on the machine's own disks (a clone boots them too)."""
    if running(store, record):
        raise VmctlError(f"{record.name}: already running")
    record.plan = dataclasses.replace(record.plan_as(KvmPlan), restore=None)
    _start(store, record)


def _start(store: StateStore, record: MachineRecord) -> None:
    folder = store.folder(record.name)
    for leftover in (OUTCOME, STOPPED):
        (folder / leftover).unlink(missing_ok=True)
    console = folder / CONSOLE
    if console.exists():  # the last run's READY must not count for this one
        console.replace(folder / f"{CONSOLE}.1")
    store.save(record)
    spawn(store, record)


def dependents(store: StateStore, snapshots: SnapshotStore, meta: SnapshotMeta) -> tuple[list[str], list[tuple[MachineRecord, Path]]]:
    """(what blocks deleting `meta`, the source machine's overlays that can be merged instead)."""
    layers = {str(Path(layer.path)) for layer in meta.layers}
    blocking: list[str] = []
    mergeable: list[tuple[MachineRecord, Path]] = []
    for other in snapshots.list():
        if other.name != meta.name and any(backing_of(Path(layer.path)) in layers for layer in other.layers):
            blocking.append(f"snapshot {other.name}")
    for name in store.names():
        record = store.load(name)
        if not isinstance(record.plan, KvmPlan):
            continue
        disks = [Path(d.path) for d in record.plan.disks]
        used = [disk for disk in disks if backing_of(disk) in layers]
        if not used:
            continue
        if name == meta.machine and not running(store, record):
            mergeable += [(record, disk) for disk in used]
        else:
            blocking.append(f"machine {name}" + (" (running)" if running(store, record) else ""))
    return blocking, mergeable


def _remove_incomplete(store: StateStore, folder: Path) -> int:
    """Remove an interrupted snapshot (VMM killed while saving). A machine may already run
    over a new overlay above a layer in here: the layer is merged back into that overlay
    first (the machine must be stopped for that). Returns the overlays merged."""
    merged = 0
    for machine in store.names():
        record = store.load(machine)
        for disk in record.plan.disks if isinstance(record.plan, KvmPlan) else ():
            backing = backing_of(Path(disk.path))
            if backing and Path(backing).parent == folder:
                if running(store, record):
                    raise VmctlError(f"snapshot {folder.name!r} is incomplete and the running machine {machine} "
                                     f"reads its disk layer: vmctl stop {machine}, then vmctl snapshot delete {folder.name}")
                merge_layer_into(Path(disk.path), Path(backing))
                merged += 1
    discard(folder)
    return merged


def delete(store: StateStore, snapshots: SnapshotStore, name: str) -> str:
    folder = snapshots.folder(name)
    if folder.is_dir() and name in snapshots.incomplete():
        merged = _remove_incomplete(store, folder)
        return "incomplete snapshot removed" + (f" ({merged} overlay(s) merged back)" if merged else "")
    meta = snapshots.load(name)
    blocking, mergeable = dependents(store, snapshots, meta)
    if blocking:
        raise VmctlError(f"snapshot {name!r}: {', '.join(blocking)} still read(s) its disk layers "
                         "(remove those first)")
    for _, overlay in mergeable:
        layer = Path(backing_of(overlay))
        merge_layer_into(overlay, layer)  # the machine's disk keeps what it read from the layer
    snapshots.remove(name)
    return f"{len(mergeable)} overlay(s) of {meta.machine} merged" if mergeable else "removed"
