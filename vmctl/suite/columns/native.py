"""native: the image tree on the host, chrooted, through an overlay of its own (the floor).

An instance is a holder process (`sleep infinity` chrooted into the overlay) in a private
mount namespace that has the host's /dev and a fresh /proc; every command enters that
namespace and root with nsenter. No PID/network namespace, no cgroup, no VM: host network,
so the instance's address is 127.0.0.1. The instance's processes are the ones in the
holder's mount namespace (daemons that detach stay in it), which is how they are found,
counted and killed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ...backends.container.overlay_root import Overlay, base_tree
from ...errors import VmctlError
from ...proc import allocated_bytes
from .base import ColumnUnavailable, InstanceSpec, Output

ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def processes_in_namespace(namespace: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _mnt_ns(int(entry)) == namespace:
            found.append(int(entry))
    return sorted(found)


class NativeInstance:
    def __init__(self, tree: Path, folder: Path, name: str) -> None:
        self.name = name
        self.address: str | None = "127.0.0.1"
        self.folder = folder
        self.overlay = Overlay(tree, folder)
        self.holder: subprocess.Popen | None = None
        self.namespace: str | None = None

    def start(self) -> "NativeInstance":
        self.folder.mkdir(parents=True)
        self.overlay.mount()
        root = shlex.quote(str(self.overlay.merged))
        # "ready" comes from inside the chroot: from then on the holder's root is the overlay
        script = (f"mount --rbind /dev {root}/dev && mount -t proc proc {root}/proc && "
                  f"exec chroot {root} /bin/sh -c 'echo ready; exec /bin/sleep infinity'")
        self.holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True)
        line = self.holder.stdout.readline() if self.holder.stdout else ""
        if line.strip() != "ready":
            self.remove()
            raise VmctlError(f"native: could not enter the image tree: {self.holder.stderr.read().strip()[-200:]}")
        self.namespace = _mnt_ns(self.holder.pid)
        return self

    def run(self, script: str, timeout: float = 600.0) -> Output:
        if self.holder is None or self.holder.poll() is not None:
            raise VmctlError(f"{self.name}: not running")
        # the holder's mount namespace (its /dev and /proc) and its root. -r, not a path: where
        # vmctl itself runs chrooted (inside the nested host) the path means nothing there.
        argv = ["nsenter", "-t", str(self.holder.pid), "-m", "-r", "-w", "/bin/sh", "-c", script]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmctlError(f"{self.name}: command timed out after {timeout:g} s") from None
        return Output(done.returncode, done.stdout, done.stderr)

    def host_pids(self) -> list[int]:
        return processes_in_namespace(self.namespace) if self.namespace else []

    def disk_bytes(self) -> int:
        return allocated_bytes(self.overlay.upper)

    def remove(self) -> None:
        if self.namespace:
            for _ in range(50):  # daemons may fork while being killed: repeat until none is left
                pids = processes_in_namespace(self.namespace)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
        if self.holder is not None:
            self.holder.wait()
            for stream in (self.holder.stdout, self.holder.stderr):
                if stream:
                    stream.close()
            self.holder = None
        self.overlay.unmount()
        shutil.rmtree(self.folder, ignore_errors=True)


class NativeColumn:
    name = "native"

    def __init__(self, image: str, work: Path) -> None:
        for tool in ("unshare", "nsenter", "chroot"):
            if shutil.which(tool) is None:
                raise ColumnUnavailable(f"native: `{tool}` is missing (apt-get install util-linux coreutils)")
        if os.geteuid() != 0:
            raise ColumnUnavailable("native: needs root (overlay mount, chroot)")
        self.tree = base_tree(image)
        self.work = work
        self.label = "native (chroot + overlay of the image tree)"

    def start(self, spec: InstanceSpec, index: int) -> NativeInstance:
        return NativeInstance(self.tree, self.work / f"native-{index}", f"native-{index}").start()

    def backing_files(self, relative: str) -> list[Path]:
        return sorted((self.tree / relative).glob("*"))

    def close(self) -> None:
        pass
