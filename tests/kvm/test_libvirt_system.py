"""The libvirt backend on a real libvirtd (qemu:///system). Remote hosts over qemu+ssh:// have
their own daemon and sshd in test_libvirt_remote.py.

The guest is a boot sector that prints a line to COM1 over and over: this host's /dev/kvm
cannot boot Linux (docs/libvirt.md), but QEMU under libvirt runs it, which shows the domain
running with our qcow2 overlay on the base image and its console log growing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from libvirt_guest import TICK, boot_sector, wait_for

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")

DAEMONS = {"virtlogd": "/run/virtlogd.pid", "libvirtd": "/run/libvirtd.pid"}


@pytest.fixture(scope="session")
def libvirtd():
    """A running libvirtd (and virtlogd); started here if needed, stopped afterwards only then."""
    for daemon in DAEMONS:
        if shutil.which(daemon) is None:
            pytest.skip(f"{daemon} is not installed (Debian: apt-get install libvirt-daemon-system "
                        f"qemu-system-x86 dnsmasq-base, or scripts/libvirt-setup)")
    started = []
    for daemon, pid_file in DAEMONS.items():
        if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
            os.makedirs("/var/log/libvirt", exist_ok=True)
            os.makedirs("/var/run/libvirt", exist_ok=True)
            subprocess.run([daemon, "-d"], check=True)
            started.append(pid_file)
    deadline = time.monotonic() + 30
    while True:
        try:
            libvirt.open("qemu:///system").close()
            break
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield "qemu:///system"
    for pid_file in reversed(started):
        try:
            os.kill(int(Path(pid_file).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


@pytest.fixture
def state(tmp_path, monkeypatch, libvirtd):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"
    conn = libvirt.open(libvirtd)
    try:
        leftovers = [d.name() for d in conn.listAllDomains(0) if d.name().startswith("vmctl-lv")]
    finally:
        conn.close()
    assert leftovers == []
    assert set(os.listdir(tmp_path / "state" / "machines")) <= {".lock"}


def ps(vmctl_cli) -> dict:
    result = vmctl_cli("ps", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def logs(vmctl_cli, name: str) -> bytes:
    ps(vmctl_cli)  # status syncs a remote console to the state folder
    result = vmctl_cli("logs", name)
    assert result.returncode == 0, result.stderr
    return result.stdout.encode()


def test_system_domain_with_overlay_runs_and_its_console_grows(tmp_path, state, vmctl_cli, libvirtd):
    base = boot_sector(tmp_path / "boot.raw")
    before = base.read_bytes()
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lv-sys:\n    backend: libvirt\n    memory: 64M\n    disks: [{base}]\n")
    up = vmctl_cli("up", str(spec), "--no-wait", timeout=300)
    assert up.returncode == 0, up.stderr
    row = ps(vmctl_cli)["lv-sys"]
    assert row["backend"] == "libvirt" and row["state"] == "running" and row["pid"]

    conn = libvirt.open(libvirtd)
    try:
        domain = conn.lookupByName("vmctl-lv-sys")
        assert domain.isActive() and domain.isPersistent()
        disk = ET.fromstring(domain.XMLDesc(0)).find("devices/disk")
        overlay = state / "machines/lv-sys/disks/vda.qcow2"
        assert disk.find("source").get("file") == str(overlay) and overlay.exists()
        assert disk.find("backingStore/source").get("file") == str(base)
    finally:
        conn.close()

    first = wait_for(lambda: logs(vmctl_cli, "lv-sys").count(TICK), "the first console line")
    wait_for(lambda: logs(vmctl_cli, "lv-sys").count(TICK) > first, "the console log to grow")

    down = vmctl_cli("down", "lv-sys", "--timeout", "2")
    assert down.returncode == 0, down.stderr
    assert ps(vmctl_cli)["lv-sys"]["state"] == "exited"
    assert vmctl_cli("rm", "lv-sys").returncode == 0
    assert not overlay.exists() and base.read_bytes() == before


def test_ephemeral_machine_runs_as_a_transient_domain(tmp_path, state, vmctl_cli, libvirtd):
    base = boot_sector(tmp_path / "boot.raw")
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lv-eph:\n    backend: libvirt\n    memory: 64M\n    ephemeral: true\n    disks: [{base}]\n")
    assert vmctl_cli("up", str(spec), "--no-wait", timeout=300).returncode == 0
    conn = libvirt.open(libvirtd)
    try:
        assert not conn.lookupByName("vmctl-lv-eph").isPersistent()
    finally:
        conn.close()
    wait_for(lambda: TICK in logs(vmctl_cli, "lv-eph"), "the console")
    down = vmctl_cli("down", "lv-eph", "--timeout", "1")
    assert down.returncode == 0 and "removed (ephemeral)" in down.stderr


def _nat_rules() -> str:
    return subprocess.run(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True).stdout


def test_local_network_is_a_vmctl_tap_handed_to_qemu_and_removed_with_the_machine(tmp_path, state, vmctl_cli, libvirtd):
    base = boot_sector(tmp_path / "boot.raw")
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lv-net:\n    backend: libvirt\n    memory: 64M\n    network: nat\n    disks: [{base}]\n")
    up = vmctl_cli("up", str(spec), "--no-wait", timeout=300)
    assert up.returncode == 0, up.stderr
    network = json.loads((state / "machines/lv-net/network.json").read_text())
    tap = network["tap"]
    try:
        conn = libvirt.open(libvirtd)
        try:
            nic = ET.fromstring(conn.lookupByName("vmctl-lv-net").XMLDesc(0)).find("devices/interface")
        finally:
            conn.close()
        assert nic.get("type") == "ethernet" and nic.find("target").get("dev") == tap
        flags = int(Path(f"/sys/class/net/{tap}/tun_flags").read_text(), 16)
        assert flags & 0x800  # IFF_PERSIST: it outlives our fd, QEMU opened it by name
        assert f"vmctl:{tap}" in _nat_rules()  # nat: the same MASQUERADE rule a native VM gets
        shown = subprocess.run(["ip", "-4", "-o", "addr", "show", tap], capture_output=True, text=True).stdout
        assert f"{network['host_ip']}/30" in shown
    finally:
        assert vmctl_cli("rm", "lv-net").returncode == 0
    assert not Path(f"/sys/class/net/{tap}").exists() and f"vmctl:{tap}" not in _nat_rules()
