"""The libvirt backend on a real libvirtd (qemu:///system), and the same daemon reached as a
remote host over qemu+ssh:// through an sshd on loopback.

The guest is a boot sector that prints a line to COM1 over and over: this host's /dev/kvm
cannot boot Linux (docs/libvirt.md), but QEMU under libvirt runs it, which shows the domain
running with our qcow2 overlay on the base image and its console log growing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")

TICK = b"vmctl tiny guest tick"
DAEMONS = {"virtlogd": "/run/virtlogd.pid", "libvirtd": "/run/libvirtd.pid"}


def boot_sector(path: Path) -> Path:
    """A 1 MiB raw disk whose MBR prints TICK to COM1 (0x3f8), waits a little, and repeats."""
    message = TICK + b"\r\n\0"
    code = (bytes.fromhex("31c0 8ed8 baf803 be") + (0x7C00 + 25).to_bytes(2, "little")  # xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,msg
            + bytes.fromhex("ac 84c0 7403 ee ebf8"  # next: lodsb; test al,al; jz pause; out dx,al; jmp next
                            "b9ffff e2fe ebee"))  # pause: mov cx,0xffff; loop $; jmp back to mov si
    assert len(code) == 25
    path.write_bytes(((code + message).ljust(510, b"\0") + b"\x55\xaa").ljust(1 << 20, b"\0"))
    return path


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


def wait_for(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.2)
    return value


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


# -- the remote transport: sshd on loopback in front of the same libvirtd ----------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ssh_uri(tmp_path, libvirtd):
    """qemu+ssh://root@127.0.0.1:PORT/system through an sshd of the test's own, with keys and
    known_hosts in tmp_path (the `command=` wrapper keeps ssh out of ~/.ssh)."""
    if not os.path.exists("/usr/sbin/sshd") or shutil.which("ssh") is None:
        pytest.skip("sshd and ssh are needed (Debian: apt-get install openssh-server)")
    folder = tmp_path / "ssh"
    folder.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {folder}/host_key\n"
        f"AuthorizedKeysFile {folder}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {folder}/sshd.pid\n"
    )
    wrapper = folder / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec ssh -o UserKnownHostsFile={folder}/known_hosts -o StrictHostKeyChecking=no "
                       f"-o LogLevel=ERROR \"$@\"\n")
    wrapper.chmod(0o755)
    os.makedirs("/run/sshd", exist_ok=True)
    pool_existed = _pool_exists(libvirtd)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "sshd_config")],
                            stderr=open(folder / "sshd.log", "wb"))
    try:
        wait_for(lambda: _listening(port), "sshd to listen", 30)
        yield f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={folder}/client_key&command={wrapper}"
    finally:
        sshd.terminate()
        sshd.wait(10)
        if not pool_existed:
            _remove_pool(libvirtd)


def _pool_exists(uri: str) -> bool:
    conn = libvirt.open(uri)
    try:
        return "vmctl" in conn.listStoragePools() + conn.listDefinedStoragePools()
    finally:
        conn.close()


def _remove_pool(uri: str) -> None:
    """The `vmctl` pool the backend made on the 'remote' host: gone with its (empty) folder."""
    conn = libvirt.open(uri)
    try:
        pool = conn.storagePoolLookupByName("vmctl")
        pool.refresh(0)
        assert pool.listVolumes() == []  # every overlay and console log was removed
        pool.destroy()
        pool.delete(0)
        pool.undefine()
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
    finally:
        conn.close()


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def shared_folder():
    """A folder the remote libvirtd's QEMU user can read (tmp_path is private to root), as a
    base image folder on a real remote host would be."""
    folder = Path(tempfile.mkdtemp(prefix="vmctl-libvirt-test-", dir="/var/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def test_remote_uri_over_ssh(shared_folder, tmp_path, state, vmctl_cli, ssh_uri):
    base = boot_sector(shared_folder / "boot.raw")
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lv-remote:\n    backend: libvirt\n    memory: 64M\n    disks: [{base}]\n"
                    f"    libvirt: {{uri: '{ssh_uri}'}}\n")
    up = vmctl_cli("up", str(spec), "--no-wait", timeout=300)
    assert up.returncode == 0, up.stderr
    record = json.loads((state / "machines/lv-remote/machine.json").read_text())
    assert record["spec"]["remote"] and ps(vmctl_cli)["lv-remote"]["state"] == "running"

    conn = libvirt.open(ssh_uri)
    try:
        assert conn.getURI().startswith("qemu+ssh://")
        disk = ET.fromstring(conn.lookupByName("vmctl-lv-remote").XMLDesc(0)).find("devices/disk")
        overlay = disk.find("source").get("file")
        # On a remote host the overlay is a volume of the `vmctl` pool there, on the same base.
        assert overlay == "/var/lib/libvirt/vmctl/vmctl-lv-remote-vda.qcow2"
        assert conn.storageVolLookupByPath(overlay).name() == "vmctl-lv-remote-vda.qcow2"
        assert disk.find("backingStore/source").get("file") == str(base)
    finally:
        conn.close()
    wait_for(lambda: TICK in logs(vmctl_cli, "lv-remote"), "the remote console to reach `vmctl logs`")

    assert vmctl_cli("rm", "lv-remote", timeout=120).returncode == 0
    assert not os.path.exists(overlay)
    assert not os.path.exists("/var/lib/libvirt/vmctl/vmctl-lv-remote.console.log")


def test_remote_host_without_the_base_image_says_so(tmp_path, state, ssh_uri):
    from vmctl.backends.libvirt import LibvirtBackend
    from vmctl.errors import VmctlError
    from vmctl.spec import parse_spec
    from vmctl.state import StateStore

    base = boot_sector(tmp_path / "only-here.raw")
    spec = parse_spec({"name": "lv-nobase", "backend": "libvirt", "disks": [str(base)], "libvirt": {"uri": ssh_uri}}).machines[0]
    base.unlink()  # the spec was valid here; the remote host does not have the file
    backend = LibvirtBackend()
    try:
        with pytest.raises(VmctlError, match=rf"^lv-nobase: disks\[0\]: base image {base} does not exist on qemu\+ssh://"
                                             r".*\(copy it there, or set libvirt.upload: true\)$"):
            backend.start(StateStore(state), spec, None)
    finally:
        backend.close()


def test_upload_of_a_base_image_through_a_libvirt_stream(tmp_path, libvirtd):
    """What `libvirt.upload: true` does for a base missing on the remote host, here on the
    local libvirtd: the bytes arrive in the `vmctl` pool once, under a content-addressed name."""
    from vmctl.backends.libvirt.disks import RemoteDisks

    base = boot_sector(tmp_path / "upload-me.raw")
    pool_existed = _pool_exists(libvirtd)
    conn = libvirt.open(libvirtd)
    try:
        disks = RemoteDisks(conn, "lv-up", upload=True)
        first = disks._upload(base, "disks[0]")
        again = disks._upload(base, "disks[0]")
        assert first == again and first.path.startswith("/var/lib/libvirt/vmctl/base-")
        assert first.format == "raw" and first.capacity == base.stat().st_size
        assert Path(first.path).read_bytes() == base.read_bytes()
        assert disks.delete([first.path]) == [] and not os.path.exists(first.path)
    finally:
        conn.close()
        if not pool_existed:
            _remove_pool(libvirtd)
