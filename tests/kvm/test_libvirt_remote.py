"""The libvirt backend on a second host reached over qemu+ssh://, so multi-host is shown, not assumed.

The "remote host" is built here: a mount namespace of the test's own with a private /run,
/var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and /etc/libvirt, its own virtlogd
and libvirtd, and an sshd (generated host and client keys, loopback, a spare port) whose
sessions land on that libvirtd. Files differ between the two hosts: a folder of base images
(`only_here`) is an empty tmpfs over there, and everything the backend makes there (the
`vmctl` pool, overlays, console logs) is invisible here. The guest is the boot sector of
test_libvirt_system.py (this host's /dev/kvm cannot boot Linux), which prints a line to COM1
over and over.
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
from dataclasses import dataclass
from pathlib import Path

import pytest
from libvirt_guest import TICK, boot_sector, wait_for

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")

POOL = "/var/lib/libvirt/vmctl"

# Runs inside `unshare --mount --propagation private`: $1 the test's folder (visible on both
# hosts), $2 the folder that exists only here. Ends as sshd; the daemons write pid files to $1.
REMOTE_HOST = r"""
set -eu
F=$1 HIDDEN=$2
mount -t tmpfs vmctl-remote-run /run
mkdir -p /run/libvirt /run/sshd /run/lock
for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt "$HIDDEN"; do
  mount -t tmpfs vmctl-remote "$d"
done
# The host's libvirt settings, without its domains, networks and pools (nothing autostarts).
cp -a /etc/libvirt "$F/etc-libvirt"
find "$F/etc-libvirt" \( -name '*.xml' -path '*/qemu/*' -o -path '*/autostart/*' -o -path '*/storage/*.xml' \) \
  -delete
mount --bind "$F/etc-libvirt" /etc/libvirt
virtlogd -d -p "$F/virtlogd.pid"
libvirtd -d -p "$F/libvirtd.pid"
exec /usr/sbin/sshd -D -e -f "$F/sshd_config"
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _open(uri: str):
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError:
        return None


@dataclass(frozen=True)
class RemoteHost:
    uri: str  # qemu+ssh://root@127.0.0.1:PORT/system?keyfile=…&command=…
    folder: Path  # its keys, sshd config, pid files, log (on this host)


@pytest.fixture(scope="module")
def folders():
    """Base image folders: `shared` exists on both hosts, `only_here` on this one only. Under
    /var/tmp, 0755: the remote QEMU runs as libvirt's QEMU user, which must read the base."""
    root = Path(tempfile.mkdtemp(prefix="vmctl-remote-test-", dir="/var/tmp"))
    root.chmod(0o755)
    (root / "shared").mkdir(mode=0o755)
    (root / "only_here").mkdir(mode=0o755)
    yield root / "shared", root / "only_here"
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, folders) -> RemoteHost:
    """The second host: its libvirtd reached at qemu+ssh://root@127.0.0.1:PORT/system."""
    if os.geteuid() != 0:
        pytest.skip("the remote-host test builds a mount namespace and runs libvirtd: needs root")
    for tool in ("libvirtd", "virtlogd", "ssh", "ssh-keygen", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian: scripts/libvirt-setup installs libvirt-daemon-system "
                        f"qemu-system-x86 openssh-server)")
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("sshd is not installed (Debian: apt-get install openssh-server)")
    folder = tmp_path_factory.mktemp("remote-host")
    for key in ("host_key", "client_key"):  # throwaway keys: this host's and root's are not used
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / key)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())
    port = free_port()
    (folder / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {folder}/host_key\n"
        f"AuthorizedKeysFile {folder}/authorized_keys\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
        f"PidFile {folder}/sshd.pid\n"
    )
    # libvirt runs the `ssh` binary; through `command=` it runs this one, which keeps the host
    # key in the test's folder (no_verify=1 alone would still record it in ~/.ssh/known_hosts).
    wrapper = folder / "ssh"
    wrapper.write_text(f"#!/bin/sh\nexec ssh -o UserKnownHostsFile={folder}/known_hosts "
                       f"-o StrictHostKeyChecking=accept-new -o LogLevel=ERROR \"$@\"\n")
    wrapper.chmod(0o755)
    (folder / "remote-host.sh").write_text(REMOTE_HOST)
    sshd = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", str(folder / "remote-host.sh"), str(folder),
         str(folders[1])],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(folder / "remote-host.log", "wb"),
    )
    uri = f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={folder}/client_key&command={wrapper}"
    try:
        def answers():
            if sshd.poll() is not None:
                pytest.fail(f"the remote host did not come up: {(folder / 'remote-host.log').read_text()[-2000:]}")
            conn = _open(uri)
            if conn is not None:
                conn.close()
            return conn is not None

        wait_for(answers, "the remote libvirtd to answer over ssh", 120)
        yield RemoteHost(uri, folder)
    finally:
        conn = _open(uri)
        if conn is not None:  # leave no QEMU running for a daemon about to stop
            try:
                for domain in conn.listAllDomains(0):
                    if domain.isActive():
                        domain.destroy()
            finally:
                conn.close()
        for name in ("libvirtd", "virtlogd"):
            try:
                _stop(int((folder / f"{name}.pid").read_text()))
            except (OSError, ValueError):
                pass
        sshd.terminate()
        sshd.wait(15)
        # Every process of the namespace is gone, and with them its tmpfs mounts.


@pytest.fixture
def state(tmp_path, monkeypatch, remote):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"
    conn = libvirt.open(remote.uri)
    try:
        leftovers = [d.name() for d in conn.listAllDomains(0)]
        volumes = []
        if "vmctl" in conn.listStoragePools():
            pool = conn.storagePoolLookupByName("vmctl")
            pool.refresh(0)
            volumes = [v for v in pool.listVolumes() if not v.startswith("base-")]  # uploads are shared, kept
    finally:
        conn.close()
    assert leftovers == [] and volumes == []
    assert set(os.listdir(tmp_path / "state" / "machines")) <= {".lock"}


def vmctl_ok(vmctl_cli, *args: str) -> str:
    result = vmctl_cli(*args, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def ticks(vmctl_cli, name: str) -> int:
    vmctl_ok(vmctl_cli, "ps")  # status copies the remote console log into the state folder
    return vmctl_ok(vmctl_cli, "logs", name).encode().count(TICK)


def spec_file(tmp_path: Path, name: str, base: Path, uri: str, upload: bool = False) -> Path:
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  {name}:\n    backend: libvirt\n    memory: 64M\n    disks: [{base}]\n"
                    f"    libvirt: {{uri: '{uri}', upload: {str(upload).lower()}}}\n")
    return spec


def test_the_second_host_is_another_host(folders, remote):
    """What the other tests rely on: its libvirtd is not ours and its files are not ours."""
    from vmctl.backends.libvirt.disks import RemoteDisks

    shared, only_here = folders
    pid = int((remote.folder / "libvirtd.pid").read_text())
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
    (only_here / "probe").write_text("here")
    (shared / "probe").write_text("both")
    conn = libvirt.open(remote.uri)
    try:
        assert conn.getURI().startswith("qemu+ssh://")
        disks = RemoteDisks(conn, "probe", upload=False)
        assert disks.find(str(shared / "probe")) is not None
        assert disks.find(str(only_here / "probe")) is None
    finally:
        conn.close()
        (only_here / "probe").unlink()
        (shared / "probe").unlink()


def test_domain_on_the_remote_host_runs_from_an_overlay_there(folders, tmp_path, state, vmctl_cli, remote):
    base = boot_sector(folders[0] / "boot.raw")
    before = base.read_bytes()
    vmctl_ok(vmctl_cli, "up", str(spec_file(tmp_path, "lvr-run", base, remote.uri)), "--no-wait")
    record = json.loads((state / "machines/lvr-run/machine.json").read_text())
    assert record["plan"]["remote"] and record["plan"]["console"] == f"{POOL}/vmctl-lvr-run.console.log"
    assert json.loads(vmctl_ok(vmctl_cli, "ps", "--json"))[0]["state"] == "running"

    conn = libvirt.open(remote.uri)
    try:
        domain = conn.lookupByName("vmctl-lvr-run")
        assert domain.isActive() and domain.isPersistent()
        disk = ET.fromstring(domain.XMLDesc(0)).find("devices/disk")
        overlay = disk.find("source").get("file")
        # The overlay is a volume of the `vmctl` pool over there, backed by the base there.
        assert overlay == f"{POOL}/vmctl-lvr-run-vda.qcow2"
        assert conn.storageVolLookupByPath(overlay).name() == "vmctl-lvr-run-vda.qcow2"
        assert disk.find("backingStore/source").get("file") == str(base)
    finally:
        conn.close()
    assert not os.path.exists(overlay)  # … which is not a file of this host
    assert not (state / "machines/lvr-run/disks").exists()

    first = wait_for(lambda: ticks(vmctl_cli, "lvr-run"), "the remote console to reach `vmctl logs`")
    wait_for(lambda: ticks(vmctl_cli, "lvr-run") > first, "the remote console log to grow")

    vmctl_ok(vmctl_cli, "down", "lvr-run", "--timeout", "2")
    assert json.loads(vmctl_ok(vmctl_cli, "ps", "--json"))[0]["state"] == "exited"
    vmctl_ok(vmctl_cli, "rm", "lvr-run")
    conn = libvirt.open(remote.uri)
    try:
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByName("vmctl-lvr-run")
        pool = conn.storagePoolLookupByName("vmctl")
        pool.refresh(0)
        assert [v for v in pool.listVolumes() if "lvr-run" in v] == []  # overlay and console log gone
    finally:
        conn.close()
    assert base.read_bytes() == before


def test_base_missing_on_the_remote_host_is_reported(folders, tmp_path, state, vmctl_cli, remote):
    base = boot_sector(folders[1] / "boot.raw")  # exists here, not there
    result = vmctl_cli("up", str(spec_file(tmp_path, "lvr-nobase", base, remote.uri)), "--no-wait", timeout=300)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert f"lvr-nobase: disks[0]: base image {base} does not exist on qemu+ssh://" in line, line
    assert line.endswith("(copy it there, or set libvirt.upload: true)"), line


def test_upload_sends_the_base_to_the_remote_host(folders, tmp_path, state, vmctl_cli, remote):
    base = boot_sector(folders[1] / "upload.raw")  # exists here, not there
    vmctl_ok(vmctl_cli, "up", str(spec_file(tmp_path, "lvr-up", base, remote.uri, upload=True)), "--no-wait")
    conn = libvirt.open(remote.uri)
    try:
        disk = ET.fromstring(conn.lookupByName("vmctl-lvr-up").XMLDesc(0)).find("devices/disk")
        uploaded = disk.find("backingStore/source").get("file")
        assert uploaded.startswith(f"{POOL}/base-") and uploaded.endswith("-upload.raw")
        assert disk.find("backingStore/format").get("type") == "raw"
        volume = conn.storageVolLookupByPath(uploaded)
        chunks: list[bytes] = []
        stream = conn.newStream(0)
        volume.download(stream, 0, 0, 0)
        stream.recvAll(lambda _s, data, _o: chunks.append(data), None)
        stream.finish()
        assert b"".join(chunks) == base.read_bytes()  # the bytes went over the ssh transport
    finally:
        conn.close()
    assert not os.path.exists(uploaded)  # in the other host's pool only
    wait_for(lambda: ticks(vmctl_cli, "lvr-up"), "the guest booted from the uploaded base")
    vmctl_ok(vmctl_cli, "rm", "lvr-up")
