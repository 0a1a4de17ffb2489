"""The QEMU command line of the nested host: TCG with an emulated AMD-V CPU."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import VmctlError
from .initramfs import ROOT_TAG, Share

QEMU = "qemu-system-x86_64"
# mitigations=off: speculative-execution workarounds only cost time under TCG.
# panic=-1 with -no-reboot: a panicking L1 ends QEMU at once instead of hanging.
BASE_CMDLINE = "console=ttyS0 panic=-1 rdinit=/init mitigations=off"


@dataclass(frozen=True)
class L1Machine:
    kernel: Path  # vmlinux (PVH entry) or bzImage
    initramfs: Path
    console_log: Path
    monitor: Path | None = None  # HMP socket: vCPU registers when L1 stops making progress
    memory_mib: int = 4096
    cpus: int = 2
    shares: list[Share] = field(default_factory=list)
    extra_cmdline: str = ""

    def command(self) -> list[str]:
        cmdline = f"{BASE_CMDLINE} {self.extra_cmdline}".strip()
        argv = [
            find_qemu(), "-nodefaults", "-no-user-config", "-no-reboot",
            "-machine", "pc", "-accel", "tcg,thread=multi",
            # EPYC + svm: an AMD CPU model whose virtualization TCG emulates, so kvm_amd loads.
            "-cpu", "EPYC,+svm", "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-display", "none",
            "-chardev", f"file,id=console,path={_option(self.console_log)}", "-serial", "chardev:console",
            "-kernel", str(self.kernel), "-initrd", str(self.initramfs), "-append", cmdline,
        ]
        if self.monitor:
            argv += ["-monitor", f"unix:{_option(self.monitor)},server=on,wait=off"]
        # The host root, read-only; multidevs=remap keeps inode numbers unique across the
        # host's mounts (/proc, /sys, /dev… all appear in the export).
        argv += _nine_p(ROOT_TAG, Path("/"), readonly=True)
        for share in self.shares:
            argv += _nine_p(share.tag, share.path, readonly=False)
        return argv


def _nine_p(tag: str, path: Path, readonly: bool) -> list[str]:
    options = f"local,id={tag},path={_option(path)},security_model=none,multidevs=remap"
    if readonly:
        options += ",readonly=on"
    return ["-fsdev", options, "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]


def _option(path: Path) -> str:
    """A path inside a QEMU -opt list, where a literal comma is written twice."""
    return str(path).replace(",", ",,")


def find_qemu() -> str:
    found = shutil.which(QEMU)
    if not found:
        raise VmctlError(f"{QEMU} not found: install qemu-system-x86")
    return found


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn after which the kernel kills QEMU when the process that started it dies.

    So even a SIGKILLed test run leaves no QEMU behind. PR_SET_PDEATHSIG fires when the
    *thread* that forked exits: start nested hosts from a thread that outlives them.
    libc is looked up here, in the parent: the child of a threaded process must not dlopen.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return in_child


def monitor_command(socket_path: Path, command: str, timeout: float = 10.0) -> str:
    """One HMP command's output over the monitor socket ("" when QEMU does not answer)."""
    prompt = b"(qemu) "
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(socket_path))
            deadline = time.monotonic() + timeout

            def until_prompt() -> bytes:
                received = b""
                while not received.endswith(prompt) and time.monotonic() < deadline:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                return received

            until_prompt()  # the greeting
            sock.sendall(command.encode() + b"\n")
            received = until_prompt()
    except OSError:
        return ""
    text = received.decode(errors="replace").replace("\r", "")
    # The monitor echoes the command line first (with terminal escapes); drop it and the prompt.
    return "\n".join(text.split("\n")[1:]).removesuffix("(qemu) ").strip()
