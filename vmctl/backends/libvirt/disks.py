"""The disks of a libvirt machine: qcow2 overlays on the base images, and their chains.

Local URIs: overlays and blank disks are made with vmctl's own qcow2 library in the machine's
state folder (the same overlays the native backend uses). Remote URIs: the files must live on
the other host, so they are libvirt storage volumes in a `vmctl` directory pool there; a base
image must already exist on that host (same path), or be uploaded when `libvirt.upload` is set.
"""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...disk import open_disk
from ...disk.qcow2.create import create, create_overlay
from ...errors import VmctlError
from ...spec.model import DiskSpec, MachineSpec
from .connection import libvirt_module, message, not_found
from .domain_xml import DiskLayer, DiskPlan

POOL_NAME = "vmctl"
POOL_PATH = "/var/lib/libvirt/vmctl"
UPLOAD_CHUNK = 1 << 20


def target_name(index: int) -> str:
    """vda … vdz, vdaa … like the Linux virtio-blk driver names them."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def _check(spec: MachineSpec, index: int, disk: DiskSpec) -> None:
    if disk.image is not None and not disk.overlay and disk.size is not None:
        raise VmctlError(f"{spec.name}: disks[{index}]: `size` needs an overlay with backend libvirt")


def local_chain(path: str, machine: str) -> tuple[DiskLayer, ...]:
    """The file and every backing file below it, with formats, as our qcow2 reader sees them."""
    layers = []
    try:
        disk = open_disk(path, read_only=True, lock=False)
    except VmctlError as error:
        raise VmctlError(f"{machine}: {error}") from None
    try:
        node: Any = disk
        while node is not None:
            fmt = "qcow2" if hasattr(node, "header") else "raw"
            layers.append(DiskLayer(os.path.abspath(node.path), fmt))
            node = getattr(node, "backing", None)
    finally:
        disk.close()
    return tuple(layers)


def local_disks(spec: MachineSpec, folder: Path, root: str | None = None) -> tuple[DiskPlan, ...]:
    """The machine's disks as overlays in `folder`/disks; `root` (a reference root filesystem)
    comes first, as vda, through its own overlay."""
    plans = []
    disks_dir = folder / "disks"
    first = 0
    if spec.kernel is None and spec.image.startswith("oci:"):
        plans = oci_disks(spec, folder)
        first = len(plans)
    elif root is not None:
        disks_dir.mkdir(parents=True, exist_ok=True)
        own = disks_dir / "vda.qcow2"
        create_overlay(root, str(own), absolute=True)
        plans.append(DiskPlan("vda", (DiskLayer(str(own), "qcow2"),) + local_chain(root, spec.name)))
        first = 1
    for index, disk in enumerate(spec.disks):
        _check(spec, index, disk)
        target = target_name(first + index)
        own = disks_dir / f"{target}.qcow2"
        if disk.image is None:
            disks_dir.mkdir(parents=True, exist_ok=True)
            create(str(own), disk.size or 0)
            layers: tuple[DiskLayer, ...] = (DiskLayer(str(own), "qcow2"),)
        elif disk.overlay and not disk.read_only:
            disks_dir.mkdir(parents=True, exist_ok=True)
            try:
                create_overlay(str(disk.image), str(own), absolute=True, size=disk.size)
            except VmctlError as error:
                raise VmctlError(f"{spec.name}: disks[{index}]: {error}") from None
            layers = (DiskLayer(str(own), "qcow2"),) + local_chain(str(disk.image), spec.name)
        else:
            # Read-only, or written in place on request: the guest opens the image itself.
            layers = local_chain(str(disk.image), spec.name)
        plans.append(DiskPlan(target, layers, disk.read_only))
    return tuple(plans)


def oci_disks(spec: MachineSpec, folder: Path) -> list[DiskPlan]:
    """An OCI image's layers as read-only raw disks (vda…, bottom first, shared with every
    machine on them), then this machine's qcow2 upper (docs/images.md)."""
    from ..kvm_prepare import oci_parts

    layers, upper_base, _, _, _ = oci_parts(spec, folder)
    plans = [DiskPlan(target_name(index), (DiskLayer(str(path), "raw"),), True) for index, path in enumerate(layers)]
    (folder / "disks").mkdir(parents=True, exist_ok=True)
    upper = folder / "disks" / "upper.qcow2"
    create_overlay(str(upper_base), str(upper), absolute=True)
    plans.append(DiskPlan(target_name(len(layers)), (DiskLayer(str(upper), "qcow2"), DiskLayer(str(upper_base), "raw"))))
    return plans


@dataclass(frozen=True)
class RemoteVolume:
    path: str
    format: str
    capacity: int


class RemoteDisks:
    """Volumes on the libvirt host behind a remote URI."""

    def __init__(self, conn: Any, machine: str, upload: bool) -> None:
        self.conn, self.machine, self.upload = conn, machine, upload
        self.libvirt = libvirt_module()
        self.created: list[str] = []  # paths of the volumes made for this machine

    def pool(self) -> Any:
        try:
            pool = self.conn.storagePoolLookupByName(POOL_NAME)
        except self.libvirt.libvirtError as error:
            if not not_found(error):
                raise
            xml = ET.Element("pool", type="dir")
            ET.SubElement(xml, "name").text = POOL_NAME
            ET.SubElement(ET.SubElement(xml, "target"), "path").text = POOL_PATH
            pool = self.conn.storagePoolDefineXML(ET.tostring(xml, encoding="unicode"), 0)
            pool.build(0)
            pool.setAutostart(1)
        if not pool.isActive():
            pool.create(0)
        pool.refresh(0)
        return pool

    def find(self, path: str) -> RemoteVolume | None:
        """The volume at `path` on the remote host, looking through a transient pool on its
        folder when no pool holds it."""
        try:
            return self._describe(self.conn.storageVolLookupByPath(path))
        except self.libvirt.libvirtError as error:
            if not not_found(error):
                raise
        xml = ET.Element("pool", type="dir")
        ET.SubElement(xml, "name").text = f"vmctl-probe-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
        ET.SubElement(ET.SubElement(xml, "target"), "path").text = os.path.dirname(path)
        try:
            probe = self.conn.storagePoolCreateXML(ET.tostring(xml, encoding="unicode"), 0)
        except self.libvirt.libvirtError:
            return None  # the folder does not exist there (or another pool owns it: looked up above)
        try:
            return self._describe(probe.storageVolLookupByName(os.path.basename(path)))
        except self.libvirt.libvirtError as error:
            if not_found(error):
                return None
            raise
        finally:
            probe.destroy()  # a transient dir pool: only forgotten, the folder stays

    def _describe(self, volume: Any) -> RemoteVolume:
        root = ET.fromstring(volume.XMLDesc(0))
        fmt = root.find("target/format")
        return RemoteVolume(volume.path(), fmt.get("type", "raw") if fmt is not None else "raw", volume.info()[1])

    def base(self, image: Path, where: str) -> RemoteVolume:
        found = self.find(str(image))
        if found is not None:
            return found
        uri = self.conn.getURI()
        if not self.upload:
            raise VmctlError(f"{self.machine}: {where}: base image {image} does not exist on {uri} "
                             f"(copy it there, or set libvirt.upload: true)")
        return self._upload(image, where)

    def _upload(self, image: Path, where: str) -> RemoteVolume:
        chain = local_chain(str(image), self.machine)
        if len(chain) > 1:
            raise VmctlError(f"{self.machine}: {where}: {image} has a backing file; upload a flattened "
                             f"image (vmctl image convert) or copy the chain to the host")
        digest = hashlib.sha256()
        with open(image, "rb") as handle:
            for block in iter(lambda: handle.read(UPLOAD_CHUNK), b""):
                digest.update(block)
        # Named by content: machines sharing a base share the upload, and it is never redone.
        name = f"base-{digest.hexdigest()[:16]}-{image.name}"
        pool = self.pool()
        try:
            return self._describe(pool.storageVolLookupByName(name))
        except self.libvirt.libvirtError as error:
            if not not_found(error):
                raise
        size = image.stat().st_size
        volume = pool.createXML(_volume_xml(name, size, "raw"), 0)
        stream = self.conn.newStream(0)
        try:
            volume.upload(stream, 0, size, 0)
            with open(image, "rb") as handle:
                stream.sendAll(lambda _stream, nbytes, _opaque: handle.read(min(nbytes, UPLOAD_CHUNK)), None)
            stream.finish()
        except BaseException:
            stream.abort()
            volume.delete(0)
            raise
        pool.refresh(0)  # the pool now probes the uploaded bytes: raw or qcow2
        return self._describe(pool.storageVolLookupByName(name))

    def disks(self, spec: MachineSpec, domain: str) -> tuple[DiskPlan, ...]:
        plans = []
        for index, disk in enumerate(spec.disks):
            _check(spec, index, disk)
            target, where = target_name(index), f"disks[{index}]"
            name = f"{domain}-{target}.qcow2"
            if disk.image is None:
                path = self._create(name, disk.size or 0, None)
                layers: tuple[DiskLayer, ...] = (DiskLayer(path, "qcow2"),)
            else:
                base = self.base(disk.image, where)
                if disk.overlay and not disk.read_only:
                    path = self._create(name, disk.size or base.capacity, base)
                    layers = (DiskLayer(path, "qcow2"), DiskLayer(base.path, base.format))
                else:
                    layers = (DiskLayer(base.path, base.format),)
            plans.append(DiskPlan(target, layers, disk.read_only))
        return tuple(plans)

    def _create(self, name: str, size: int, base: RemoteVolume | None) -> str:
        volume = self.pool().createXML(_volume_xml(name, size, "qcow2", base), 0)
        self.created.append(volume.path())
        return volume.path()

    def delete(self, paths: list[str]) -> list[str]:
        """Delete volumes by path; returns the messages of those that could not be deleted."""
        problems = []
        for path in paths:
            try:
                self.conn.storageVolLookupByPath(path).delete(0)
            except self.libvirt.libvirtError as error:
                if not not_found(error):
                    problems.append(f"{path}: {message(error)}")
        return problems


def _volume_xml(name: str, size: int, fmt: str, base: RemoteVolume | None = None) -> str:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(size)
    ET.SubElement(ET.SubElement(volume, "target"), "format", type=fmt)
    if base is not None:
        backing = ET.SubElement(volume, "backingStore")
        ET.SubElement(backing, "path").text = base.path
        ET.SubElement(backing, "format", type=base.format)
    return ET.tostring(volume, encoding="unicode")
