"""Memory snapshots of libvirt machines (`vmctl snapshot create --memory`): libvirt's save
image of the running guest plus vmctl's disk layers taken at the same instant.

    create:  virDomainSaveFlags(SNAP/domain.save)   the guest's RAM and device state; QEMU ends
             freeze each overlay into SNAP/disk<N>.qcow2, domain redefined on the new chain
             virDomainRestoreFlags(SNAP/domain.save, XML on the new chain)   the source goes on
    restore: new overlays over SNAP's layers, then virDomainRestoreFlags(SNAP/domain.save)
             with the domain's XML on them: the guest continues where it was saved, no boot

Why save/restore rather than libvirt's snapshot API with a memory state: libvirt 9.0 cannot
revert to an external snapshot, and an internal one (savevm) needs every disk to be qcow2 and
keeps the state inside the overlay. A save image is a file libvirt restores on every version.
The save image holds the domain XML of the moment it was saved; a restore passes that XML with
each disk's source and `<backingStore>` chain as the files have them now (`virDomainRestore`'s
`dxml`: libvirt checks the rest is the same machine).
"""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ...errors import VmctlError
from ...plans import LibvirtRecord
from ...snapshot.disk_layers import merge_layer_into, overlay_on
from ...snapshot.snapshot_store import SnapshotMeta, SnapshotStore
from ...state import CONSOLE, OUTCOME, MachineRecord, StateStore
from .connection import translated
from .disk_snapshots import SOURCE, Domains, freeze_into, own_overlays, with_chains

SAVE_IMAGE = "domain.save"


def retarget(saved_xml: str, current_xml: str, machine: str, overlays: list[Path]) -> str:
    """The save image's domain XML with each disk's source as in `current_xml` (by target
    device), and the overlays' chains as their files have them."""
    sources = {}
    for disk in ET.fromstring(current_xml).findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None:
            sources[target.get("dev")] = source.get("file")
    domain = ET.fromstring(saved_xml)
    for disk in domain.findall("devices/disk"):
        target, source = disk.find("target"), disk.find("source")
        if target is not None and source is not None and sources.get(target.get("dev")):
            source.set("file", sources[target.get("dev")] or "")
    return with_chains(ET.tostring(domain, encoding="unicode"), overlays, machine)


def _resume(domains: Domains, image: Path) -> None:
    """Start the domain from the save image, on the disks as they are now."""
    conn = domains.backend._conn(domains.rec.uri, domains.record.name)
    saved = conn.saveImageGetXMLDesc(str(image), 0)
    current = domains.xml()
    xml = retarget(saved, current, domains.record.name, [path for _, path in own_overlays(domains.store, domains.record, current)])
    with translated(domains.record.name, f"restoring domain {domains.rec.domain} from {image}"):
        conn.restoreFlags(str(image), xml, 0)  # the state it was saved in: running


def take(backend: Any, store: StateStore, record: MachineRecord, snapshots: SnapshotStore, name: str) -> SnapshotMeta:
    domains = Domains(backend, store, record)
    if not domains.running():
        raise VmctlError(f"{record.name}: not running: a memory snapshot saves a running guest "
                         f"(vmctl snapshot create {record.name} {name} saves its disks)")
    if not domains.rec.persistent:
        raise VmctlError(f"{record.name}: ephemeral (a transient domain): a memory snapshot stops it for a moment, "
                         f"which would remove it")
    overlays = own_overlays(store, record, domains.xml())
    folder = snapshots.new_folder(name)
    image = folder / SAVE_IMAGE
    domain = domains.domain()
    try:
        (folder / SOURCE).write_text(record.name)
        with translated(record.name, f"saving domain {domains.rec.domain} to {image}"):
            domain.saveFlags(str(image), None, 0)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    frozen: list[tuple[Path, Path]] = []
    try:  # the domain is shut off now: freeze the disks as the saved guest left them
        layers = freeze_into(folder, overlays, frozen)
        domains.sync_chains()
        image.chmod(0o444)
        meta = SnapshotMeta(name, record.name, "libvirt", "memory", layers, domains.rec.to_json(),
                            memory_bytes=image.stat().st_size)
        snapshots.save(meta)
    except BaseException as error:
        problem = _undo(domains, frozen, image, folder)
        if problem:
            raise VmctlError(f"{error}; {problem}") from None
        raise
    try:
        _resume(domains, image)
    except VmctlError as error:
        raise VmctlError(f"{error} (the snapshot {name!r} is complete; vmctl start {record.name} boots the machine "
                         f"afresh, vmctl snapshot restore {record.name} {name} continues the saved guest)") from None
    _running_again(backend, store, record)
    return meta


def _undo(domains: Domains, frozen: list[tuple[Path, Path]], image: Path, folder: Path) -> str | None:
    """A failed create after the save: the disks back as they were, the guest running again."""
    try:
        for overlay, layer in frozen:
            merge_layer_into(overlay, layer)
        if frozen:
            domains.sync_chains()
        _resume(domains, image)
    except VmctlError as error:
        return f"the source was left shut off ({error}); its save image stays in {folder}"
    shutil.rmtree(folder, ignore_errors=True)
    return None


def _running_again(backend: Any, store: StateStore, record: MachineRecord) -> None:
    rec = record.plan_as(LibvirtRecord)
    record.pid = backend._qemu_pid(rec.uri, rec.domain)
    store.save(record)


def restore(backend: Any, store: StateStore, record: MachineRecord, snapshots: SnapshotStore, meta: SnapshotMeta) -> None:
    """The stopped machine's disks back to the snapshot, and its saved guest running again."""
    domains = Domains(backend, store, record)
    domains.require_stopped("restored")
    domains.normalize()
    snapshots.check_layers(meta)
    image = snapshots.folder(meta.name) / SAVE_IMAGE
    if not image.is_file():
        raise VmctlError(f"{image}: missing: snapshot {meta.name!r} has no saved guest")
    overlays = dict(domains.overlays())
    for layer in meta.layers:
        if layer.index not in overlays:
            raise VmctlError(f"snapshot {meta.name!r}: disk {layer.index} is not an overlay of {record.name} any more")
        overlay_on(Path(layer.path), overlays[layer.index])
    domains.sync_chains()
    folder = store.folder(record.name)
    for leftover in (OUTCOME, "stopped"):
        (folder / leftover).unlink(missing_ok=True)
    if (folder / CONSOLE).exists():
        (folder / CONSOLE).replace(folder / f"{CONSOLE}.1")
    _resume(domains, image)
    _running_again(backend, store, record)
