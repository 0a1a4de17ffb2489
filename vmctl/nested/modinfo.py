"""Kernel module dependencies from the modules themselves.

A kernel .deb ships no modules.dep (depmod makes it at install time), so the load order
is read from each module's `.modinfo` ELF section: NUL-separated `key=value` strings,
of which `depends=` names the modules that must be loaded first.
"""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import VmctlError


def module_name(path: Path) -> str:
    """The kernel's name for a module file: kvm-amd.ko -> kvm_amd."""
    return path.name.removesuffix(".ko").replace("-", "_")


def _section(data: bytes, wanted: str) -> bytes:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise VmctlError("not a 64-bit ELF kernel module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, names_at, _ = header(shstrndx)
    for index in range(shnum):
        name, offset, size = header(index)
        end = data.index(b"\0", names_at + name)
        if data[names_at + name : end].decode() == wanted:
            return data[offset : offset + size]
    return b""


def depends(path: Path) -> list[str]:
    """The module names `path` needs loaded first (its modinfo `depends=`)."""
    for entry in _section(path.read_bytes(), ".modinfo").split(b"\0"):
        if entry.startswith(b"depends="):
            value = entry.removeprefix(b"depends=").decode()
            return [name.replace("-", "_") for name in value.split(",") if name]
    return []


def load_order(wanted: list[str], index: dict[str, Path]) -> list[str]:
    """`wanted` plus everything they depend on, dependencies first.

    `index` maps module names to files; a name missing from it is an error (it would make
    insmod fail at boot with a far less clear message).
    """
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise VmctlError(f"kernel module dependency cycle through {name}")
        if name not in index:
            raise VmctlError(f"kernel module {name} is not in the kernel package")
        visiting.add(name)
        for dependency in depends(index[name]):
            visit(dependency)
        visiting.discard(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order
