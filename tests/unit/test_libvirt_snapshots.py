"""libvirt stop/start and disk snapshots on libvirt's `test:///default` driver: the domain is
real to libvirt (defined, started, shut off, redefined), the disks are real qcow2 files made
by vmctl, written here through vmctl's qcow2 library as a guest would."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmctl.backends.libvirt.disk_snapshots import Domains, delete, recover, restore, take, with_chains
from vmctl.disk import open_disk
from vmctl.disk.qcow2.create import create
from vmctl.errors import VmctlError
from vmctl.snapshot.disk_layers import backing_of, freeze_overlay

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")
pytestmark = pytest.mark.unit


def started(libvirt_machine, backend, store, name: str = "s1"):
    return backend.start(store, libvirt_machine(name, ["base.qcow2", {"size": "1M"}]), None)


def write(path: Path, data: bytes) -> None:
    with open_disk(str(path)) as disk:
        disk.pwrite(0, data)
        disk.flush()


def read(path: Path, size: int) -> bytes:
    with open_disk(str(path), read_only=True) as disk:
        return disk.read(0, size)


def chain_in_xml(backend, record) -> list[str]:
    """The first disk's source and its <backingStore> files, as the persistent definition says."""
    domain = backend._domain(record)
    disk = ET.fromstring(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find("devices/disk")
    files = [disk.find("source").get("file")]
    node = disk.find("backingStore")
    while node is not None and node.find("source") is not None:
        files.append(node.find("source").get("file"))
        node = node.find("backingStore")
    return files


def stop(backend, store, record) -> None:
    backend.stop(store, record, timeout=5)
    (store.folder(record.name) / "stopped").touch()  # what `vmctl stop` adds


def test_stop_shows_stopped_and_start_runs_the_same_domain_again(tmp_path, backend, store, libvirt_machine):
    record = started(libvirt_machine, backend, store)
    uuid = backend._domain(record).UUIDString()
    stop(backend, store, record)
    assert backend.status(store, record).state == "stopped"
    backend.restart(store, record)
    assert backend.status(store, record).state == "running"
    assert backend._domain(record).UUIDString() == uuid and not (store.folder("s1") / "stopped").exists()
    with pytest.raises(VmctlError, match="^s1: already running$"):
        backend.restart(store, record)
    backend.remove(store, record)


def test_start_defines_a_domain_undefined_outside_vmctl_again(tmp_path, backend, store, libvirt_machine):
    record = started(libvirt_machine, backend, store)
    stop(backend, store, record)
    backend._domain(record).undefine()
    backend.restart(store, record)
    domain = backend._domain(record)
    assert domain.isActive() and domain.isPersistent()
    backend.remove(store, record)


def test_snapshot_restore_delete_round_trip_on_a_stopped_domain(tmp_path, backend, store, snapshots, libvirt_machine):
    record = started(libvirt_machine, backend, store)
    overlay = store.folder("s1") / "disks" / "vda.qcow2"
    # A running domain is snapshotted by libvirt (external, disk-only), which this driver
    # refuses: the failed attempt leaves nothing (no snapshot folder, no new overlay).
    with pytest.raises(VmctlError, match="^s1: external snapshot of domain vmctl-s1: unsupported flags"):
        take(backend, store, record, snapshots, "before")
    assert snapshots.list() == [] and snapshots.incomplete() == []
    assert sorted(p.name for p in overlay.parent.iterdir()) == ["vda.qcow2", "vdb.qcow2"]
    stop(backend, store, record)
    write(overlay, b"one")
    meta = take(backend, store, record, snapshots, "before")
    layer = snapshots.folder("before") / "disk0.qcow2"
    assert [layer.index for layer in meta.layers] == [0, 1] and meta.backend == "libvirt"
    # The domain is redefined on the new chain: overlay -> frozen layer -> base.
    assert chain_in_xml(backend, record) == [str(overlay), str(layer), str(tmp_path / "base.qcow2")]
    assert backing_of(overlay) == str(layer) and read(overlay, 3) == b"one"

    write(overlay, b"two")
    restore(backend, store, record, snapshots, meta)
    assert read(overlay, 3) == b"one"
    backend.restart(store, record)
    with pytest.raises(VmctlError, match=r"^snapshot 'before': machine s1 \(running\) still read\(s\) its disk layers"):
        delete(backend, store, snapshots, meta)
    stop(backend, store, record)
    write(overlay, b"thr")
    assert delete(backend, store, snapshots, meta) == "2 overlay(s) of s1 merged"
    assert not snapshots.folder("before").exists() and read(overlay, 3) == b"thr"
    assert chain_in_xml(backend, record) == [str(overlay), str(tmp_path / "base.qcow2")]
    backend.remove(store, record)


def test_a_later_snapshot_blocks_deleting_an_earlier_one(tmp_path, backend, store, snapshots, libvirt_machine):
    record = started(libvirt_machine, backend, store)
    stop(backend, store, record)
    first = take(backend, store, record, snapshots, "first")
    take(backend, store, record, snapshots, "second")
    with pytest.raises(VmctlError, match=r"^snapshot 'first': snapshot second still read\(s\) its disk layers"):
        delete(backend, store, snapshots, first)
    assert snapshots.folder("first").is_dir()
    delete(backend, store, snapshots, snapshots.load("second"))
    delete(backend, store, snapshots, first)
    assert snapshots.list() == []
    backend.remove(store, record)


def test_a_failed_create_leaves_the_disks_and_the_domain_as_they_were(tmp_path, backend, store, snapshots, monkeypatch, libvirt_machine):
    record = started(libvirt_machine, backend, store)
    stop(backend, store, record)
    overlay = store.folder("s1") / "disks" / "vda.qcow2"
    write(overlay, b"abc")
    before = chain_in_xml(backend, record)
    from vmctl.backends.libvirt import disk_snapshots

    def broken(*args):
        raise VmctlError("disk full")

    monkeypatch.setattr(disk_snapshots.SnapshotStore, "save", broken)
    with pytest.raises(VmctlError, match="^disk full$"):
        take(backend, store, record, snapshots, "x")
    assert not snapshots.folder("x").exists() and chain_in_xml(backend, record) == before
    assert backing_of(overlay) == str(tmp_path / "base.qcow2") and read(overlay, 3) == b"abc"
    backend.remove(store, record)


def test_an_interrupted_create_is_merged_back(tmp_path, backend, store, snapshots, libvirt_machine):
    """A create killed after the overlay was frozen (no meta.json, domain not redefined)."""
    record = started(libvirt_machine, backend, store)
    stop(backend, store, record)
    overlay = store.folder("s1") / "disks" / "vda.qcow2"
    write(overlay, b"abc")
    folder = snapshots.new_folder("cut")
    (folder / "machine").write_text("s1")
    freeze_overlay(overlay, folder / "disk0.qcow2")
    assert snapshots.incomplete() == ["cut"]
    assert recover(backend, store, folder) == "incomplete snapshot removed (1 overlay(s) merged back)"
    assert not folder.exists() and read(overlay, 3) == b"abc"
    assert chain_in_xml(backend, record) == [str(overlay), str(tmp_path / "base.qcow2")]
    backend.remove(store, record)


def test_with_chains_rewrites_only_the_named_overlays(tmp_path):
    create(str(tmp_path / "base.qcow2"), 1 << 20)
    from vmctl.disk.qcow2.create import create_overlay

    create_overlay(str(tmp_path / "base.qcow2"), str(tmp_path / "top.qcow2"), absolute=True)
    xml = ("<domain><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           f"<source file='{tmp_path}/top.qcow2'/><backingStore/><target dev='vda'/></disk>"
           f"<disk type='file' device='disk'><source file='{tmp_path}/other.raw'/><target dev='vdb'/></disk>"
           "</devices></domain>")
    disks = ET.fromstring(with_chains(xml, [tmp_path / "top.qcow2"], "m")).findall("devices/disk")
    assert [child.tag for child in disks[0]] == ["driver", "source", "backingStore", "target"]
    store_ = disks[0].find("backingStore")
    assert store_.find("source").get("file") == str(tmp_path / "base.qcow2")
    assert store_.find("format").get("type") == "qcow2" and list(store_.find("backingStore")) == []
    assert disks[1].find("backingStore") is None


def test_after_a_live_snapshot_the_new_overlay_gets_its_usual_name_back(tmp_path, backend, store, snapshots, libvirt_machine):
    """What libvirt leaves after the live path (the test driver cannot do it): QEMU on
    `.vda.qcow2@live` over the layer, the old overlay's other name in the snapshot; the next
    start of the shut-off domain renames the overlay back and redefines the domain."""
    record = started(libvirt_machine, backend, store)
    overlay = store.folder("s1") / "disks" / "vda.qcow2"
    write(overlay, b"one")
    folder = snapshots.new_folder("live")
    (folder / "machine").write_text("s1")
    layer = folder / "disk0.qcow2"
    os.link(overlay, layer)
    hidden = overlay.with_name(".vda.qcow2@live")
    from vmctl.disk.qcow2.create import create_overlay

    create_overlay(str(layer), str(hidden), absolute=True)
    domains = Domains(backend, store, record)
    domain = ET.fromstring(domains.xml())
    domain.find("devices/disk/source").set("file", str(hidden))
    domains.sync_chains(ET.tostring(domain, encoding="unicode"))  # libvirt updates the persistent definition
    assert chain_in_xml(backend, record) == [str(hidden), str(layer), str(tmp_path / "base.qcow2")]
    write(hidden, b"two")
    stop(backend, store, record)
    backend.restart(store, record)
    assert chain_in_xml(backend, record) == [str(overlay), str(layer), str(tmp_path / "base.qcow2")]
    assert not hidden.exists() and read(overlay, 3) == b"two" and read(layer, 3) == b"one"
    backend.remove(store, record)


def test_a_save_images_xml_is_retargeted_to_the_disks_as_they_are_now(tmp_path):
    """A memory snapshot's save image names the overlay of its moment (maybe the name a live
    snapshot gave it); the restore passes it with today's source and chain per target."""
    from vmctl.backends.libvirt.memory_snapshots import retarget
    from vmctl.disk.qcow2.create import create_overlay

    create(str(tmp_path / "base.qcow2"), 1 << 20)
    create_overlay(str(tmp_path / "base.qcow2"), str(tmp_path / "layer.qcow2"), absolute=True)
    create_overlay(str(tmp_path / "layer.qcow2"), str(tmp_path / "vda.qcow2"), absolute=True)
    saved = ("<domain><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
             f"<source file='{tmp_path}/.vda.qcow2@live' index='3'/><backingStore/><target dev='vda'/>"
             "<alias name='virtio-disk0'/></disk></devices></domain>")
    current = (f"<domain><devices><disk type='file' device='disk'><source file='{tmp_path}/vda.qcow2'/>"
               "<target dev='vda'/></disk></devices></domain>")
    disk = ET.fromstring(retarget(saved, current, "m", [tmp_path / "vda.qcow2"])).find("devices/disk")
    assert disk.find("source").get("file") == str(tmp_path / "vda.qcow2")
    assert disk.find("backingStore/source").get("file") == str(tmp_path / "layer.qcow2")
    assert disk.find("backingStore/backingStore/source").get("file") == str(tmp_path / "base.qcow2")
    assert disk.find("alias").get("name") == "virtio-disk0"  # the rest is the saved machine's


def test_a_memory_snapshot_needs_a_running_domain(tmp_path, backend, store, snapshots, libvirt_machine):
    from vmctl.backends.libvirt.memory_snapshots import take as save

    record = started(libvirt_machine, backend, store)
    stop(backend, store, record)
    with pytest.raises(VmctlError, match="^s1: not running: a memory snapshot saves a running guest"):
        save(backend, store, record, snapshots, "m")
    assert snapshots.list() == [] and snapshots.incomplete() == []
    backend.remove(store, record)

