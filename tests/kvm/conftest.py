"""The kvm tier: tiny guest programs, assembled at test time, on the host's /dev/kvm."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.host_probe import check_host

GUESTS = Path(__file__).parent / "guests"
LOAD_ADDRESS = 0x100000


def _kvm_skip_reason() -> str | None:
    report = check_host()
    if not report.usable:
        return f"/dev/kvm is not usable here: {report.problem}"
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_kvm() -> None:
    reason = _kvm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def assemble(tmp_path_factory):
    """assemble("hello.S", STATUS=3) -> Path of a static ELF loaded at 1 MiB."""
    if not (shutil.which("gcc") and shutil.which("ld")):
        pytest.skip("gcc and ld (Debian: build-essential) are needed to assemble the test guests")
    out = tmp_path_factory.mktemp("guests")

    def build(source: str, **defines: int) -> Path:
        stem = Path(source).stem + "".join(f"-{k}{v}" for k, v in sorted(defines.items()))
        obj, elf = out / f"{stem}.o", out / f"{stem}.elf"
        flags = [f"-D{key}={value}" for key, value in defines.items()]
        subprocess.run(["gcc", "-c", *flags, str(GUESTS / source), "-o", str(obj)], check=True)
        subprocess.run(
            ["ld", "-static", "-nostdlib", "-N", "--no-warn-rwx-segments", f"-Ttext=0x{LOAD_ADDRESS:x}",
             "-e", "_start", str(obj), "-o", str(elf)],
            check=True,
        )
        return elf

    return build


@pytest.fixture
def vmctl_cli():
    """Run the installed `vmctl` console script (the real CLI, in a subprocess)."""
    exe = shutil.which("vmctl", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    return run
