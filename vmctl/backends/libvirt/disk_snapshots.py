"""Disk snapshots of libvirt machines: vmctl's qcow2 chains, with the domain redefined on them.

The same model as native machines (vmctl/snapshot/disk_layers.py): each overlay vmctl made
for the machine (`<state>/machines/<name>/disks/*.qcow2`) becomes a read-only layer of the
snapshot and the machine goes on over a new overlay. The domain XML spells out every disk's
whole backing chain, so after any change to the files the persistent definition is redefined
with the chain read back from the files (`sync_chains`; `vmctl start` does it too, so a domain
never starts on a chain its files do not have).

- Shut off: the overlay is frozen in place (`freeze_overlay`: the layer is the old file under
  the snapshot's name, a new overlay takes the old path), then the domain is redefined.
- Running: libvirt's own external disk-only snapshot (`virDomainSnapshotCreateXML` with
  DISK_ONLY | REUSE_EXT | ATOMIC | NO_METADATA). The layer is first a second name (hard link)
  of the running overlay in the snapshot folder, and the new overlay is made by vmctl on that
  name (`.vda.qcow2@SNAP` next to the old one); libvirt switches QEMU to it and updates the
  persistent definition. The next operation on the shut-off domain (`normalize`) gives the
  new overlay its usual name back, so both paths end in the same layout.

Restore and delete need the domain shut off: libvirt 9.0 (Debian 12) cannot revert to an
external snapshot (that came with 9.9), so vmctl does both on the files; docs/libvirt.md.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ...disk.qcow2.create import create_overlay
from ...errors import VmctlError
from ...plans import LibvirtRecord
from ...snapshot.disk_layers import backing_of, freeze_overlay, merge_layer_into, overlay_on
from ...snapshot.snapshot_store import Layer, SnapshotMeta, SnapshotStore
from ...state import MachineRecord, StateStore
from .connection import libvirt_module, translated
from .disks import local_chain

DOMAIN_XML = "domain.xml"
SOURCE = "machine"  # SNAP/machine: whose overlays are being frozen (to undo an interrupted create)
LIVE_MARK = "@"  # `.vda.qcow2@SNAP`: the overlay a running domain went on with at snapshot SNAP


def canonical(path: Path) -> Path:
    """An overlay's usual name: `.vda.qcow2@SNAP` -> `vda.qcow2`."""
    if path.name.startswith(".") and LIVE_MARK in path.name:
        return path.with_name(path.name[1:].rsplit(LIVE_MARK, 1)[0])
    return path


def own_overlays(store: StateStore, record: MachineRecord, xml_text: str) -> list[tuple[int, Path]]:
    """(disk index, path) of the writable qcow2 overlays vmctl made for the machine."""
    disks_dir = store.folder(record.name) / "disks"
    found = []
    for index, disk in enumerate(ET.fromstring(xml_text).findall("devices/disk[@device='disk']")):
        source, driver = disk.find("source"), disk.find("driver")
        path = Path(source.get("file", "")) if source is not None else None
        if (path is None or path.parent != disks_dir or disk.find("readonly") is not None
                or driver is None or driver.get("type") != "qcow2"):
            continue
        found.append((index, path))
    return found


def with_chains(xml_text: str, overlays: list[Path], machine: str) -> str:
    """The domain XML with each overlay's `<backingStore>` chain as its files have it now."""
    domain = ET.fromstring(xml_text)
    wanted = {str(path) for path in overlays}
    for disk in domain.findall("devices/disk"):
        source = disk.find("source")
        if source is None or source.get("file") not in wanted:
            continue
        for old in disk.findall("backingStore"):
            disk.remove(old)
        parent = ET.Element("backingStore", type="file")
        chain = local_chain(source.get("file", ""), machine)[1:]
        top = parent
        for layer in chain:
            ET.SubElement(top, "format", type=layer.format)
            ET.SubElement(top, "source", file=layer.path)
            top = ET.SubElement(top, "backingStore", type="file")
        top.attrib.clear()  # the chain ends here: an empty <backingStore/>
        disk.insert(list(disk).index(source) + 1, parent if chain else ET.Element("backingStore"))
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


class Domains:
    """The machine's domain through the backend's connection."""

    def __init__(self, backend: Any, store: StateStore, record: MachineRecord) -> None:
        self.backend, self.store, self.record = backend, store, record
        self.rec: LibvirtRecord = record.plan_as(LibvirtRecord)
        if self.rec.remote:
            raise VmctlError(f"{record.name}: disk snapshots are for machines on a local libvirt "
                             f"({self.rec.uri} keeps the overlays on the other host)")

    def domain(self) -> Any | None:
        return self.backend._domain(self.record)

    def running(self) -> bool:
        domain = self.domain()
        return domain is not None and bool(domain.isActive())

    def xml(self) -> str:
        """The persistent definition (what the next start uses), else the saved domain.xml."""
        domain = self.domain()
        if domain is not None and domain.isPersistent():
            return domain.XMLDesc(libvirt_module().VIR_DOMAIN_XML_INACTIVE)
        return (self.store.folder(self.record.name) / DOMAIN_XML).read_text()

    def overlays(self) -> list[tuple[int, Path]]:
        return own_overlays(self.store, self.record, self.xml())

    def normalize(self) -> None:
        """Shut off: an overlay taken on by a live snapshot gets its usual name back (its old
        holder is a layer now, kept under the snapshot's name), then the domain is redefined."""
        xml = self.xml()
        renamed = False
        domain = ET.fromstring(xml)
        for disk in domain.findall("devices/disk"):
            source = disk.find("source")
            path = Path(source.get("file", "")) if source is not None else None
            if source is None or path is None or canonical(path) == path or path.parent != self.disks_dir:
                continue
            if path.exists() or not canonical(path).exists():  # else renamed already (a kill before the redefine)
                os.replace(path, canonical(path))
            source.set("file", str(canonical(path)))
            renamed = True
        for leftover in self.disks_dir.glob(f".*{LIVE_MARK}*"):  # earlier tops: layers now, under their snapshot's name
            leftover.unlink()
        if renamed:
            self.sync_chains(ET.tostring(domain, encoding="unicode"))

    @property
    def disks_dir(self) -> Path:
        return self.store.folder(self.record.name) / "disks"

    def sync_chains(self, xml: str | None = None) -> None:
        """Redefine the domain with its overlays' chains read from the files."""
        xml = xml or self.xml()
        new = with_chains(xml, [path for _, path in own_overlays(self.store, self.record, xml)], self.record.name)
        folder = self.store.folder(self.record.name)
        temporary = folder / f".{DOMAIN_XML}.new"
        temporary.write_text(new)
        os.replace(temporary, folder / DOMAIN_XML)
        domain = self.domain()
        if domain is not None and domain.isPersistent():
            conn = self.backend._conn(self.rec.uri, self.record.name)
            with translated(self.record.name, f"redefining domain {self.rec.domain}"):
                conn.defineXML(new)

    def require_stopped(self, what: str) -> None:
        if self.running():
            raise VmctlError(f"{self.record.name}: running: vmctl stop {self.record.name} first "
                             f"(a libvirt machine's disks are {what} while it is shut off)")


def take(backend: Any, store: StateStore, record: MachineRecord, snapshots: SnapshotStore, name: str) -> SnapshotMeta:
    domains = Domains(backend, store, record)
    if domains.running():
        return _take_live(domains, snapshots, name)
    domains.normalize()
    overlays = domains.overlays()
    if not overlays:
        raise VmctlError(f"{record.name}: no disk of its own to snapshot (read-only and `overlay: false` disks "
                         f"are not part of a snapshot)")
    folder = snapshots.new_folder(name)
    frozen: list[tuple[Path, Path]] = []
    try:
        (folder / SOURCE).write_text(record.name)
        layers = freeze_into(folder, overlays, frozen)
        domains.sync_chains()
        meta = SnapshotMeta(name, record.name, "libvirt", "disk", layers, domains.rec.to_json())
        snapshots.save(meta)
    except BaseException:
        for overlay, layer in frozen:  # each overlay takes its layer's data back: the same disk
            merge_layer_into(overlay, layer)
        if frozen:
            domains.sync_chains()
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise
    return meta


def freeze_into(folder: Path, overlays: list[tuple[int, Path]], frozen: list[tuple[Path, Path]]) -> list[Layer]:
    """Each overlay's content becomes the read-only layer folder/diskN.qcow2 under it; `frozen`
    collects (overlay, layer) as it goes, so that a failure can merge them back."""
    layers = []
    for index, overlay in overlays:
        layer = folder / f"disk{index}.qcow2"
        freeze_overlay(overlay, layer)
        frozen.append((overlay, layer))
        layers.append(Layer.of(index, layer))
    return layers


def _take_live(domains: Domains, snapshots: SnapshotStore, name: str) -> SnapshotMeta:
    """libvirt's external disk-only snapshot of the running domain onto overlays vmctl made."""
    libvirt = libvirt_module()
    domain = domains.domain()
    live = domain.XMLDesc(0)
    overlays = own_overlays(domains.store, domains.record, live)
    if not overlays:
        raise VmctlError(f"{domains.record.name}: no disk of its own to snapshot (read-only and `overlay: false` "
                         f"disks are not part of a snapshot)")
    folder = snapshots.new_folder(name)
    made: list[Path] = []
    switched = False
    try:
        (folder / SOURCE).write_text(domains.record.name)
        spec = ET.Element("domainsnapshot")
        ET.SubElement(spec, "name").text = name
        disks = ET.SubElement(spec, "disks")
        own = dict(overlays)
        for index, disk in enumerate(ET.fromstring(live).findall("devices/disk[@device='disk']")):
            target = disk.find("target")
            entry = ET.SubElement(disks, "disk", name=target.get("dev", "") if target is not None else "")
            if index not in own:
                entry.set("snapshot", "no")
                continue
            layer = folder / f"disk{index}.qcow2"
            os.link(own[index], layer)  # the running overlay's content is this layer from the switch on
            made.append(layer)
            new = domains.disks_dir / f".{canonical(own[index]).name}{LIVE_MARK}{name}"
            create_overlay(str(layer), str(new), absolute=True, durable=True)
            made.append(new)
            entry.set("snapshot", "external")
            entry.set("type", "file")
            ET.SubElement(entry, "driver", type="qcow2")
            ET.SubElement(entry, "source", file=str(new))
        flags = (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                 | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        with translated(domains.record.name, f"external snapshot of domain {domains.rec.domain}"):
            domain.snapshotCreateXML(ET.tostring(spec, encoding="unicode"), flags)
        switched = True
        layers = []
        for index, _ in overlays:
            layer = folder / f"disk{index}.qcow2"
            os.chmod(layer, 0o444)
            layers.append(Layer.of(index, layer))
        meta = SnapshotMeta(name, domains.record.name, "libvirt", "disk", layers, domains.rec.to_json())
        snapshots.save(meta)
    except BaseException as error:
        if switched:  # QEMU already writes the new overlays: the folder is their layer
            raise VmctlError(f"{error}; snapshot {name!r} is incomplete: vmctl stop {domains.record.name}, "
                             f"then vmctl snapshot delete {name}") from None
        for path in made:
            path.unlink(missing_ok=True)
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise
    return meta


def restore(backend: Any, store: StateStore, record: MachineRecord, snapshots: SnapshotStore,
            meta: SnapshotMeta) -> None:
    domains = Domains(backend, store, record)
    domains.require_stopped("restored")
    domains.normalize()
    snapshots.check_layers(meta)
    overlays = dict(domains.overlays())
    by_index = {layer.index: Path(layer.path) for layer in meta.layers}
    if set(by_index) - set(overlays):
        raise VmctlError(f"snapshot {meta.name!r}: disk(s) {sorted(set(by_index) - set(overlays))} of it are not "
                         f"overlays of {record.name} any more")
    for index, layer in by_index.items():
        overlay_on(layer, overlays[index])
    domains.sync_chains()


def delete(backend: Any, store: StateStore, snapshots: SnapshotStore, meta: SnapshotMeta) -> str:
    """Refused while another snapshot, or a machine other than the stopped source, reads a
    layer; the stopped source's overlays take the layers' data first (a qcow2 rebase)."""
    layers = {layer.path for layer in meta.layers}
    blocking = [f"snapshot {other.name}" for other in snapshots.list()
                if other.name != meta.name and any(backing_of(Path(layer.path)) in layers for layer in other.layers)]
    merge: list[Path] = []
    source = None
    for name in store.names():
        record = store.load(name)
        if not isinstance(record.plan, LibvirtRecord) or record.plan.remote:
            continue
        domains = Domains(backend, store, record)
        used = [path for _, path in domains.overlays() if backing_of(path) in layers]
        if not used:
            continue
        if name == meta.machine and not domains.running():
            domains.normalize()
            used = [path for _, path in domains.overlays() if backing_of(path) in layers]
            merge, source = used, domains
        else:
            blocking.append(f"machine {name}" + (" (running)" if domains.running() else ""))
    if blocking:
        raise VmctlError(f"snapshot {meta.name!r}: {', '.join(blocking)} still read(s) its disk layers "
                         f"(remove or stop those first)")
    for overlay in merge:
        merge_layer_into(overlay, Path(backing_of(overlay) or ""))
    if source is not None:
        source.sync_chains()
    snapshots.remove(meta.name)
    return f"{len(merge)} overlay(s) of {meta.machine} merged" if merge else "removed"


def recover(backend: Any, store: StateStore, folder: Path) -> str | None:
    """Undo an interrupted `create` (no meta.json): the layers in `folder` that the stopped
    libvirt machine's overlays stand on are merged back into them. None: not a libvirt
    machine's snapshot folder."""
    try:
        machine = (folder / SOURCE).read_text().strip()
    except FileNotFoundError:
        return None
    merged = 0
    for name in [machine] if store.exists(machine) else []:
        record = store.load(name)
        if not isinstance(record.plan, LibvirtRecord) or record.plan.remote:
            return None
        domains = Domains(backend, store, record)
        used = [path for _, path in domains.overlays() if (backing_of(path) or "").startswith(f"{folder}/")]
        if not used:
            continue
        domains.require_stopped("merged back")
        domains.normalize()
        used = [path for _, path in domains.overlays() if (backing_of(path) or "").startswith(f"{folder}/")]
        for overlay in used:
            merge_layer_into(overlay, Path(backing_of(overlay) or ""))
        domains.sync_chains()
        merged += len(used)
    import shutil

    shutil.rmtree(folder)
    return "incomplete snapshot removed" + (f" ({merged} overlay(s) merged back)" if merged else "")
