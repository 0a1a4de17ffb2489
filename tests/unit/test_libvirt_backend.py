"""The libvirt backend against libvirt's own `test:///default` driver: define, start, list,
stop, undefine; transient domains for ephemeral machines; and the one-line errors."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET

import pytest

from vmctl.backends import get_backend
from vmctl.backends.libvirt.backend import LibvirtBackend
from vmctl.backends.libvirt.connection import libvirt_module
from vmctl.errors import VmctlError
from vmctl.guest_contract import exit_code_in
from vmctl.state import StateStore

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")

TEST_URI = "test:///default"  # the driver the libvirt_machine fixture uses


def domains(backend: LibvirtBackend) -> dict[str, object]:
    return {d.name(): d for d in backend._conn(TEST_URI, "test").listAllDomains(0)}


def test_backend_is_registered():
    assert isinstance(get_backend("libvirt"), LibvirtBackend)


def test_define_start_list_stop_undefine(tmp_path, backend, store, libvirt_machine):
    spec = libvirt_machine("t1")
    record = backend.start(store, spec, None)
    folder = store.folder("t1")
    overlay = folder / "disks" / "vda.qcow2"
    assert overlay.exists() and (folder / "domain.xml").exists()
    listed = domains(backend)
    assert "vmctl-t1" in listed and listed["vmctl-t1"].isPersistent() and listed["vmctl-t1"].isActive()
    described = ET.fromstring(listed["vmctl-t1"].XMLDesc(0))
    assert described.findtext("uuid") == record.plan.uuid and described.findtext("vcpu") == "1"
    assert described.find("devices/disk/source").get("file") == str(overlay)
    assert described.findtext("os/kernel") == str(tmp_path / "bzImage")
    assert backend.status(store, record).state == "running"

    with pytest.raises(VmctlError, match="t1: a libvirt domain named vmctl-t1 already exists"):
        backend.start(StateStore(tmp_path / "other"), spec, None)

    backend.stop(store, record, timeout=5)
    status = backend.status(store, record)
    assert status.state == "exited" and "vmctl-t1" in domains(backend)  # defined, shut off
    backend.remove(store, record)
    assert "vmctl-t1" not in domains(backend)
    assert not folder.exists() and not overlay.exists()
    assert (tmp_path / "base.qcow2").exists()  # the base is never touched


def test_ephemeral_machine_is_a_transient_domain(tmp_path, backend, store, libvirt_machine):
    record = backend.start(store, libvirt_machine("eph", ephemeral=True), None)
    domain = domains(backend)["vmctl-eph"]
    assert domain.isActive() and not domain.isPersistent()
    assert backend.status(store, record).state == "running"
    backend.stop(store, record, timeout=5)
    assert "vmctl-eph" not in domains(backend)  # libvirt forgot it as it stopped
    assert backend.status(store, record).state == "exited"
    backend.remove(store, record)
    assert not store.folder("eph").exists()


def test_a_failed_start_leaves_nothing(tmp_path, backend, store, libvirt_machine):
    spec = libvirt_machine("bad", network="nat", libvirt={"uri": TEST_URI, "network": "no-such-net"})
    with pytest.raises(VmctlError, match=r"^bad: no libvirt network named 'no-such-net' on test:///default"):
        backend.start(store, spec, None)
    assert "vmctl-bad" not in domains(backend) and not store.folder("bad").exists()


def test_a_domain_undefined_behind_our_back_is_dead(tmp_path, backend, store, libvirt_machine):
    record = backend.start(store, libvirt_machine("gone"), None)
    domain = domains(backend)["vmctl-gone"]
    domain.destroy()
    domain.undefine()
    status = backend.status(store, record)
    assert status.state == "dead" and "undefined outside vmctl" in status.detail
    backend.remove(store, record)
    assert not store.folder("gone").exists()


def test_unreachable_uri_is_one_line_naming_the_libvirt_machine(backend, store, libvirt_machine):
    spec = libvirt_machine("far", libvirt={"uri": "qemu+tcp://127.0.0.1:1/system"})
    with pytest.raises(VmctlError) as caught:
        backend.start(store, spec, None)
    text = str(caught.value)
    assert text.startswith("far: cannot reach libvirt at qemu+tcp://127.0.0.1:1/system: ") and "\n" not in text
    assert not store.folder("far").exists()


def test_a_missing_libvirtd_says_how_to_start_it(tmp_path, backend, store, libvirt_machine):
    spec = libvirt_machine("nod", libvirt={"uri": f"qemu:///system?socket={tmp_path}/no-libvirt-sock"})
    with pytest.raises(VmctlError, match=r"^nod: libvirtd is (not running|not installed)"):
        backend.start(store, spec, None)


def test_missing_libvirt_python_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "libvirt", None)  # what `import libvirt` sees when it is absent
    with pytest.raises(VmctlError, match=r"libvirt-python: pip install 'vmctl\[libvirt\]'.*libvirt-dev"):
        libvirt_module()


def test_exit_code_comes_from_the_console_marker():
    assert exit_code_in(b"boot\r\nVMCTL-READY\r\nout\nVMCTL-EXIT 3\r\n") == 3
    assert exit_code_in(b"no marker\n") is None
