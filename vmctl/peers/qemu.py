"""Run QEMU on the same kernel/initrd/cmdline as a vmctl boot, to compare logs and timings."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmctlError

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class QemuRun:
    console: str
    seconds: float
    exit_code: int | None  # None: killed at the timeout


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if not path:
        raise VmctlError(f"{QEMU} not found: install the Debian package qemu-system-x86")
    return path


def qemu_command(
    kernel: Path, initrd: Path | None, cmdline: str, cpus: int, memory_mib: int, machine: str = "pc",
    console_path: Path | None = None, accel: str = "kvm",
) -> list[str]:
    """Direct kernel boot with the console on COM1, no display, no reboot, no defaults."""
    command = [
        qemu_binary(), "-machine", f"{machine},accel={accel}", "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(cpus), "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config", "-nographic",
        "-no-reboot", "-kernel", str(kernel), "-append", cmdline,
        "-serial", f"file:{console_path}" if console_path else "stdio",
    ]
    if initrd:
        command += ["-initrd", str(initrd)]
    return command


def run_qemu(command: list[str], console_path: Path, timeout: float, until: re.Pattern[str] | None = None) -> QemuRun:
    """Run until QEMU exits, `until` matches the console, or `timeout` passes; then stop it."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and time.monotonic() - start < timeout:
            if until is not None and console_path.exists() and until.search(console_path.read_text(errors="replace")):
                break
            time.sleep(0.25)
    finally:
        code = process.poll()
        if code is None:
            process.kill()
            process.wait()
    seconds = time.monotonic() - start
    console = console_path.read_text(errors="replace") if console_path.exists() else ""
    return QemuRun(console, seconds, code)
