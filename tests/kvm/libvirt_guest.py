"""What the libvirt tests boot: a boot sector that needs no kernel, and a polling helper.

This host's /dev/kvm cannot boot Linux (docs/libvirt.md), but QEMU under libvirt runs a boot
sector, which is enough to show a domain running on our overlay with its console growing.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

TICK = b"vmctl tiny guest tick"


def boot_sector(path: Path) -> Path:
    """A 1 MiB raw disk whose MBR prints TICK to COM1 (0x3f8), waits a little, and repeats."""
    message = TICK + b"\r\n\0"
    code = (bytes.fromhex("31c0 8ed8 baf803 be") + (0x7C00 + 25).to_bytes(2, "little")  # xor ax,ax; mov ds,ax; mov dx,0x3f8; mov si,msg
            + bytes.fromhex("ac 84c0 7403 ee ebf8"  # next: lodsb; test al,al; jz pause; out dx,al; jmp next
                            "b9ffff e2fe ebee"))  # pause: mov cx,0xffff; loop $; jmp back to mov si
    assert len(code) == 25
    path.write_bytes(((code + message).ljust(510, b"\0") + b"\x55\xaa").ljust(1 << 20, b"\0"))
    return path


def wait_for(condition, what: str, timeout: float = 120):
    """Poll `condition` until it returns something true (and return that), or fail the test."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.2)
    return value


BOOTS = b"vmctl boots: "


def boot_counter(path: Path, work: Path) -> Path:
    """A 1 MiB raw disk whose MBR (guests/bootcount.S) counts its boots in sector 2 of the
    same disk through BIOS int 13h, and prints `vmctl boots: NN` on COM1: a guest that writes
    its disk, for stop/start and disk snapshots."""
    import shutil
    import subprocess

    if not (shutil.which("gcc") and shutil.which("ld")):
        pytest.skip("gcc and ld (Debian: build-essential) are needed to assemble the boot sector")
    source = Path(__file__).parent / "guests" / "bootcount.S"
    subprocess.run(["gcc", "-c", str(source), "-o", str(work / "bootcount.o")], check=True)
    subprocess.run(["ld", "-Ttext=0x7c00", "--oformat", "binary", "-e", "_start", str(work / "bootcount.o"),
                    "-o", str(work / "bootcount.bin")], check=True)
    sector = (work / "bootcount.bin").read_bytes()
    assert len(sector) == 512 and sector.endswith(b"\x55\xaa")
    path.write_bytes(sector.ljust(1 << 20, b"\0"))
    return path
