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
from libvirt_guest import BOOTS, TICK, boot_counter, boot_sector, wait_for

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


def _boots(vmctl_cli, name: str) -> list[bytes]:
    """The `vmctl boots: NN` counts on the console since the last (re)start."""
    return [line.split(BOOTS)[1][:2] for line in logs(vmctl_cli, name).splitlines() if BOOTS in line]


def _one_line_error(result, message: str) -> None:
    assert result.returncode != 0 and result.stderr == f"vmctl: error: {message}\n", result.stderr


def test_stop_start_and_snapshots_keep_and_restore_what_the_guest_wrote(tmp_path, state, vmctl_cli, libvirtd):
    """The guest counts its boots on its own disk (BIOS writes through QEMU into our overlay),
    then prints a dot per timer tick: stop/start keeps the count; a disk snapshot (live through
    libvirt's API, or of the shut-off domain) freezes it and restore goes back to it; a memory
    snapshot (a libvirt save image) restores the running guest without a boot."""
    base = boot_counter(tmp_path / "boot.raw", tmp_path)
    before = base.read_bytes()
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lv-snap:\n    backend: libvirt\n    memory: 64M\n    disks: [{base}]\n")
    overlay = state / "machines/lv-snap/disks/vda.qcow2"
    layer = {name: state / f"snapshots/{name}/disk0.qcow2" for name in ("mem", "live", "two")}

    def start(expected: bytes) -> None:
        started = vmctl_cli("start", "lv-snap", "--no-wait", timeout=300)
        assert started.returncode == 0, started.stderr
        assert ps(vmctl_cli)["lv-snap"]["state"] == "running"
        assert wait_for(lambda: _boots(vmctl_cli, "lv-snap"), "the boot count") == [expected]

    def stop() -> None:
        stopped = vmctl_cli("stop", "lv-snap", "--timeout", "1", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert ps(vmctl_cli)["lv-snap"]["state"] == "stopped"

    def snapshot(*args: str) -> str:
        result = vmctl_cli("snapshot", *args, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr

    def chain(top: Path = overlay) -> list[str]:
        info = subprocess.run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", str(top)],
                              capture_output=True, text=True, check=True)
        return [image["filename"] for image in json.loads(info.stdout)]

    def source() -> str:
        conn = libvirt.open(libvirtd)
        try:
            return ET.fromstring(conn.lookupByName("vmctl-lv-snap").XMLDesc(0)).find("devices/disk/source").get("file")
        finally:
            conn.close()

    def ticks() -> int:
        return logs(vmctl_cli, "lv-snap").count(b".")

    assert vmctl_cli("up", str(spec), "--no-wait", timeout=300).returncode == 0
    try:
        assert wait_for(lambda: _boots(vmctl_cli, "lv-snap"), "the first boot") == [b"01"]
        # memory: saved, disks frozen, and the guest goes on (no boot: the console keeps ticking)
        assert "mem: memory snapshot of lv-snap (1 disk layer(s)" in snapshot("create", "--memory", "lv-snap", "mem")
        assert ps(vmctl_cli)["lv-snap"]["state"] == "running" and (state / "snapshots/mem/domain.save").is_file()
        seen = ticks()
        wait_for(lambda: ticks() > seen, "the saved guest to go on")
        assert _boots(vmctl_cli, "lv-snap") == [b"01"]
        # live: libvirt switches QEMU to a new overlay above the frozen one
        assert "live: disk snapshot of lv-snap (1 disk layer(s))" in snapshot("create", "lv-snap", "live")
        assert source() == str(overlay.with_name(".vda.qcow2@live"))
        assert chain(Path(source()))[1:] == [str(layer["live"]), str(layer["mem"]), str(base)]
        assert ps(vmctl_cli)["lv-snap"]["state"] == "running"
        _one_line_error(vmctl_cli("snapshot", "restore", "lv-snap", "live"),
                        "lv-snap: running: vmctl stop lv-snap first (a libvirt machine's disks are restored "
                        "while it is shut off)")
        stop()
        conn = libvirt.open(libvirtd)
        try:
            domain = conn.lookupByName("vmctl-lv-snap")
            assert domain.isPersistent() and not domain.isActive()  # still defined, shut off
        finally:
            conn.close()
        start(b"02")  # the write of the first boot was kept
        assert source() == str(overlay)  # its usual name back
        assert chain() == [str(overlay), str(layer["live"]), str(layer["mem"]), str(base)]
        stop()

        assert "two: disk snapshot of lv-snap" in snapshot("create", "lv-snap", "two")
        assert chain()[:2] == [str(overlay), str(layer["two"])]
        listed = json.loads(vmctl_cli("snapshot", "list", "--json").stdout)
        assert [(s["name"], s["machine"], s["backend"], s["kind"]) for s in listed] == [
            ("live", "lv-snap", "libvirt", "disk"), ("mem", "lv-snap", "libvirt", "memory"),
            ("two", "lv-snap", "libvirt", "disk")]
        start(b"03")  # the machine goes on over a new overlay above the layer
        stop()
        snapshot("restore", "lv-snap", "two")
        start(b"03")  # back at count 2: this boot makes it 3 again
        stop()
        snapshot("restore", "lv-snap", "live")
        start(b"02")  # back at count 1
        stop()
        assert "lv-snap: restored to mem and started" in snapshot("restore", "lv-snap", "mem")
        assert ps(vmctl_cli)["lv-snap"]["state"] == "running"
        wait_for(lambda: ticks() > 0, "the restored guest to tick")
        assert _boots(vmctl_cli, "lv-snap") == []  # it continues: no boot
        stop()
        start(b"02")  # its disk as the memory snapshot froze it: count 1

        stop()
        _one_line_error(vmctl_cli("snapshot", "restore", "lv-snap", "nope"),
                        "no snapshot named 'nope' (snapshots: live, mem, two)")
        _one_line_error(vmctl_cli("snapshot", "delete", "live"),
                        "snapshot 'live': snapshot two still read(s) its disk layers (remove or stop those first)")
        _one_line_error(vmctl_cli("snapshot", "delete", "mem"),
                        "snapshot 'mem': snapshot live still read(s) its disk layers (remove or stop those first)")
        assert snapshot("delete", "two") == "two: removed\n"
        assert snapshot("delete", "live") == "live: removed\n"
        assert "1 overlay(s) of lv-snap merged" in snapshot("delete", "mem")
        assert chain() == [str(overlay), str(base)]
        assert subprocess.run(["qemu-img", "check", "-U", str(overlay)], capture_output=True).returncode == 0
        start(b"03")  # the merged overlay still holds count 2
        assert json.loads(vmctl_cli("snapshot", "list", "--json").stdout) == []
        assert os.listdir(state / "snapshots") == [] and os.listdir(overlay.parent) == ["vda.qcow2"]
    finally:
        assert vmctl_cli("rm", "lv-snap").returncode == 0
    assert base.read_bytes() == before
