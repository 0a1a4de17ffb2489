"""Container disk snapshots' bookkeeping (vmctl/backends/container/layer_snapshots.py) on a
stopped container's folders: which folder is the upper, which are lower layers, what the
record and container.json say. The overlay mounts themselves are in the kvm tier
(tests/kvm/test_container_snapshots.py), as root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vmctl.backends.container import layer_snapshots
from vmctl.backends.container.layer_snapshots import delete, image_lower, recover, restore, stacked, take
from vmctl.errors import VmctlError
from vmctl.plans import ContainerRecord
from vmctl.state import MachineRecord, StateStore

pytestmark = pytest.mark.unit
IMAGE = "/cache/oci/l2:/cache/oci/l1"  # an OCI image's lowerdir value: colons inside


def stopped_container(store: StateStore, name: str = "c") -> MachineRecord:
    """A container as `vmctl stop` leaves it: its upper folder, no mount, an outcome."""
    record = MachineRecord(name=name, backend="container", plan=ContainerRecord(
        cpus=1, memory=64 << 20, runtime="crun", container_id=f"vmctl-{name}-1"))
    folder = store.create(record)
    (folder / "container.json").write_text(json.dumps({
        "machine": name, "container_id": f"vmctl-{name}-1", "runtime": "crun", "binary": "/usr/bin/crun",
        "lower": IMAGE, "network": "none"}))
    (folder / "rootfs" / "upper").mkdir(parents=True)
    (folder / "outcome.json").write_text(json.dumps({"exit_code": 0, "reason": "stopped", "crashed": False}))
    (folder / "stopped").touch()
    return record


def upper(store: StateStore, name: str = "c") -> Path:
    return store.folder(name) / "rootfs" / "upper"


def lower(store: StateStore, name: str = "c") -> str:
    return json.loads((store.folder(name) / "container.json").read_text())["lower"]


def test_stacked_and_image_lower_are_inverse():
    assert stacked(("/a", "/b"), IMAGE) == f"/a:/b:{IMAGE}"
    assert image_lower(f"/a:/b:{IMAGE}", ("/a", "/b"), Path("c.json")) == IMAGE
    assert image_lower(IMAGE, (), Path("c.json")) == IMAGE
    with pytest.raises(VmctlError, match=r"^c.json: lower '/x:/img' does not start with the machine's layers \['/a'\]$"):
        image_lower("/x:/img", ("/a",), Path("c.json"))


def test_create_freezes_the_upper_and_restore_goes_back(store, snapshots):
    record = stopped_container(store)
    (upper(store) / "file").write_text("one")
    os.chmod(upper(store), 0o700)
    first = take(store, record, snapshots, "first")
    layer = snapshots.folder("first") / "upper"
    assert (layer / "file").read_text() == "one" and list(upper(store).iterdir()) == []
    assert upper(store).stat().st_mode & 0o777 == 0o700  # the container's / keeps its mode
    assert store.load("c").plan.layers == (str(layer),) and lower(store) == f"{layer}:{IMAGE}"
    assert first.backend == "container" and [Path(x.path) for x in first.layers] == [layer]

    (upper(store) / "file").write_text("two")
    second = take(store, store.load("c"), snapshots, "second")
    assert lower(store) == f"{snapshots.folder('second') / 'upper'}:{layer}:{IMAGE}"
    assert len(second.layers) == 2

    (upper(store) / "junk").write_text("x")
    restore(store, store.load("c"), snapshots, first)
    assert list(upper(store).iterdir()) == [] and lower(store) == f"{layer}:{IMAGE}"


def test_delete_is_refused_while_a_later_snapshot_stands_on_it(store, snapshots):
    record = stopped_container(store)
    first = take(store, record, snapshots, "first")
    take(store, store.load("c"), snapshots, "second")
    with pytest.raises(VmctlError, match=r"^snapshot 'first': later snapshot\(s\) second stand on its layer"):
        delete(store, snapshots, first)
    assert snapshots.folder("first").is_dir()


def test_delete_of_a_layer_the_machine_stands_on_moves_it_into_the_machine(store, snapshots):
    record = stopped_container(store)
    (upper(store) / "file").write_text("one")
    meta = take(store, record, snapshots, "only")
    assert delete(store, snapshots, meta) == "removed (its layer stays under c, which stands on it)"
    kept = store.folder("c") / "rootfs" / "layers" / "only"
    assert not snapshots.folder("only").exists() and (kept / "file").read_text() == "one"
    assert store.load("c").plan.layers == (str(kept),) and lower(store) == f"{kept}:{IMAGE}"
    # a later snapshot stands on the kept layer; restoring it keeps it, and nothing else
    later = take(store, store.load("c"), snapshots, "later")
    assert [x.path for x in later.layers][1:] == [str(kept)]
    restore(store, store.load("c"), snapshots, later)
    assert kept.is_dir()


def test_a_running_container_is_refused_with_nothing_changed(store, snapshots):
    record = stopped_container(store)
    (store.folder("c") / "outcome.json").unlink()
    record.pid = os.getpid()  # alive: running
    with pytest.raises(VmctlError, match="^c: running: vmctl stop c first"):
        take(store, record, snapshots, "s")
    assert snapshots.list() == [] and snapshots.incomplete() == [] and upper(store).is_dir()


def test_a_failed_create_puts_the_upper_back(store, snapshots, monkeypatch):
    record = stopped_container(store)
    (upper(store) / "file").write_text("one")

    def broken(*args):
        raise VmctlError("disk full")

    monkeypatch.setattr(layer_snapshots.SnapshotStore, "save", broken)
    with pytest.raises(VmctlError, match="^disk full$"):
        take(store, record, snapshots, "s")
    assert (upper(store) / "file").read_text() == "one" and lower(store) == IMAGE
    assert store.load("c").plan.layers == () and not snapshots.folder("s").exists()


@pytest.mark.parametrize("written_since", [False, True])
def test_an_interrupted_create_is_undone(store, snapshots, written_since):
    """Killed after the upper moved into the snapshot and the record was saved, before meta.json."""
    record = stopped_container(store)
    (upper(store) / "file").write_text("one")
    folder = snapshots.new_folder("cut")
    (folder / "machine").write_text("c")
    os.rename(upper(store), folder / "upper")
    upper(store).mkdir()
    layer_snapshots._set_layers(store, record, (str(folder / "upper"),))
    if written_since:
        (upper(store) / "new").write_text("two")
    said = recover(store, folder)
    assert not folder.exists()
    if written_since:
        kept = store.folder("c") / "rootfs" / "layers" / "cut"
        assert said == "incomplete snapshot removed (its layer stays under c, which stands on it)"
        assert (kept / "file").read_text() == "one" and lower(store) == f"{kept}:{IMAGE}"
    else:
        assert said == "incomplete snapshot removed (c's upper layer put back)"
        assert (upper(store) / "file").read_text() == "one" and lower(store) == IMAGE


def test_recover_leaves_another_backends_interrupted_snapshot_alone(store, snapshots):
    from vmctl.plans import LibvirtRecord

    store.create(MachineRecord(name="vm", backend="libvirt", plan=LibvirtRecord(
        cpus=1, memory=64 << 20, uri="qemu:///system", domain="vmctl-vm", uuid="u")))
    folder = snapshots.new_folder("cut")
    (folder / "machine").write_text("vm")
    assert recover(store, folder) is None and folder.is_dir()
