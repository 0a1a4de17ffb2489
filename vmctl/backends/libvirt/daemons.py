"""Starting libvirtd and virtlogd by hand where no service manager does: CI containers and the
nested host (docs/libvirt.md#the-nested-host). The linux-tier tests and benchmarks/libvirt.py
use it, and so does the qemu column of `vmctl compare --suite` inside the nested host only
(vmctl/suite/columns/backend.py); `vmctl` itself never starts daemons.
"""

from __future__ import annotations

import grp
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import VmctlError
from ...proc import pid_alive
from .connection import libvirt_module

# Started in this order (libvirtd hands serial logs to virtlogd), stopped in reverse.
DAEMONS = (("virtlogd", Path("/run/virtlogd.pid")), ("libvirtd", Path("/run/libvirtd.pid")))
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
INSTALL = "apt-get install libvirt-daemon-system qemu-system-x86 dnsmasq-base (or scripts/libvirt-setup)"


@dataclass
class StartedDaemons:
    """The daemons this process started (none when they were already running)."""

    pids: list[int] = field(default_factory=list)

    def stop(self, timeout: float = 30) -> None:
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + timeout
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()




def missing_reason() -> str | None:
    """Why the daemons cannot be started here, or None."""
    for name, _ in DAEMONS:
        if shutil.which(name) is None:
            return f"{name} is not installed (Debian: {INSTALL})"
    if os.geteuid() != 0:
        return "starting libvirtd for qemu:///system needs root"
    return None


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0


def adapt_nested_host() -> None:
    """Two settings libvirt needs inside the nested host (vmctl.nested), whose root is an
    in-RAM overlay: both changes vanish when it powers off. Never call it elsewhere."""
    if os.environ.get("VMCTL_NESTED") != "1":
        raise VmctlError("adapt_nested_host() only runs inside the nested host (VMCTL_NESTED=1)")
    # No udev there: /dev/kvm is root 0600, and libvirt, finding KVM unusable for its QEMU
    # user, re-probes QEMU at every call (tens of seconds each under TCG). udev's usual mode:
    try:
        os.chown("/dev/kvm", 0, grp.getgrnam("kvm").gr_gid)
        os.chmod("/dev/kvm", 0o660)
    except (KeyError, OSError):
        pass  # no kvm group: libvirt then probes more often, which is only slower
    # libvirt gives each QEMU a private /dev (a mount namespace); under the nested host's
    # chroot that /dev comes up without /dev/urandom and QEMU fails to start
    # ("Could not open '/dev/urandom'"). QEMU then uses L1's /dev as is.
    # L1 mounts cgroup v2 (for the container backend); libvirt keeps its QEMUs out of cgroups
    # there, as it did before L1 had any: an empty controller list makes it skip them (ENXIO).
    text = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
    for why, line in (("no private /dev for QEMU", "namespaces = []"), ("no cgroups for QEMU", "cgroup_controllers = []")):
        if f"\n{line}\n" not in text:
            text += f"\n# vmctl nested host: {why}\n{line}\n"
    QEMU_CONF.write_text(text)


def ensure_running(uri: str = "qemu:///system", timeout: float = 120) -> StartedDaemons:
    """Start virtlogd and libvirtd if they are not running; wait until `uri` answers."""
    reason = missing_reason()
    if reason:
        raise VmctlError(reason)
    started = StartedDaemons()
    for name, pid_file in DAEMONS:
        if _running(name):
            continue
        for folder in ("/var/log/libvirt", "/run/libvirt"):
            os.makedirs(folder, exist_ok=True)
        try:
            subprocess.run([name, "-d"], check=True, capture_output=True, timeout=60)
        except subprocess.CalledProcessError as error:
            started.stop()
            raise VmctlError(f"{name} -d failed: {error.stderr.decode(errors='replace').strip()}") from None
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            started.pids.append(int(pid_file.read_text().strip()))
        except (OSError, ValueError):
            started.stop()
            raise VmctlError(f"{name} started but wrote no pid file ({pid_file})") from None
    libvirt = libvirt_module()
    deadline = time.monotonic() + timeout
    while True:
        try:
            libvirt.open(uri).close()
            return started
        except libvirt.libvirtError as error:
            if time.monotonic() > deadline:
                started.stop()
                raise VmctlError(f"libvirtd does not answer at {uri} after {timeout:g} s: {error}") from None
            time.sleep(0.2)


def start_here(uri: str = "qemu:///system") -> StartedDaemons:
    """ensure_running(), after adapt_nested_host() when this is the nested host: what a
    benchmark or test that brings its own libvirtd does first. VmctlError says why not."""
    if os.environ.get("VMCTL_NESTED") == "1":
        reason = missing_reason()
        if reason:
            raise VmctlError(reason)
        adapt_nested_host()
    return ensure_running(uri)
