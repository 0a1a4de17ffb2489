"""Guest physical memory: host mappings, guest-physical → host views, bounds-checked access.

Every access a device or loader makes goes through `GuestMemory`, which refuses any range
that is not wholly inside one RAM region: a bad guest address is a `GuestMemoryError`,
never a read or write of host memory outside the guest.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field

from .errors import GuestMemoryError
from .kvm.ioctl import libc

_MAP_FAILED = ctypes.c_void_p(-1).value
_MADV_MERGEABLE = 12
_MADV_HUGEPAGE = 14
_MADV_NOHUGEPAGE = 15
_MADV_DONTDUMP = 16
_HUGE_PAGE = 2 << 20


@dataclass
class MemoryRegion:
    guest_address: int
    size: int
    host_address: int
    view: memoryview = field(repr=False)

    @property
    def end(self) -> int:
        return self.guest_address + self.size


def _map_host(size: int, memfd: int | None, offset: int = 0, private_file: bool = False) -> int:
    """mmap `size` bytes: anonymous and lazily backed, shared from a memfd at `offset`, or
    (`private_file`) copy-on-write from a snapshot's memory file: pages the guest never writes
    stay the file's page-cache pages, shared by every machine restored from it.

    Anonymous RAM is placed on a 2 MiB boundary and marked MADV_HUGEPAGE, as QEMU does:
    with transparent huge pages each guest fault maps 2 MiB instead of 4 KiB, which matters
    most under nested virtualization where every host fault is expensive.
    """
    mm = libc().mmap
    mm.restype = ctypes.c_void_p
    mm.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if memfd is None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
        address = _aligned(mm(None, size + _HUGE_PAGE, prot, flags, -1, 0), size)
    else:
        address = mm(None, size, prot, mmap.MAP_PRIVATE if private_file else mmap.MAP_SHARED, memfd, offset)
    if address in (None, _MAP_FAILED):
        errno = ctypes.get_errno()
        raise OSError(errno, f"cannot map {size} bytes of guest memory: {os.strerror(errno)}")
    madvise = libc().madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    if memfd is None:
        madvise(address, size, _MADV_HUGEPAGE)  # a hint: fails harmlessly where THP is off
    # Guest RAM in a core dump of the VMM would be large and may hold the guest's secrets.
    madvise(address, size, _MADV_DONTDUMP)
    return address


def _aligned(address: int | None, size: int) -> int | None:
    """Trim a mapping of size + 2 MiB to `size` bytes starting on a 2 MiB boundary."""
    if address in (None, _MAP_FAILED):
        return address
    munmap = libc().munmap
    munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    start = (address + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    if start > address:
        munmap(address, start - address)
    tail = address + size + _HUGE_PAGE - (start + size)
    if tail:
        munmap(start + size, tail)
    return start


class GuestMemory:
    """RAM regions at fixed guest-physical addresses, backed by host mappings."""

    def __init__(self, layout: list[tuple[int, int]], backing: str = "anonymous", file: str | None = None) -> None:
        """`layout` is a list of (guest_address, size); `backing` is "anonymous", "memfd" or
        "file": the regions mapped private (copy-on-write) from `file`, one after the other."""
        if backing not in ("anonymous", "memfd", "file"):
            raise ValueError(f"unknown memory backing {backing!r}")
        self.backing = backing
        self.memfd: int | None = None
        total = sum(size for _, size in layout)
        if backing == "file":
            if file is None:
                raise ValueError("file backing needs a file")
            self.memfd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        elif backing == "memfd":
            # One memfd for all regions, so the whole RAM can be shared with another process.
            self.memfd = os.memfd_create("vmctl-guest-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, total)
        self.regions: list[MemoryRegion] = []
        offset = 0
        for guest_address, size in sorted(layout):
            if self.regions and guest_address < self.regions[-1].end:
                raise ValueError(f"memory regions overlap at 0x{guest_address:x}")
            host = _map_host(size, self.memfd, offset, private_file=backing == "file")
            view = memoryview((ctypes.c_ubyte * size).from_address(host)).cast("B")
            self.regions.append(MemoryRegion(guest_address, size, host, view))
            offset += size

    @property
    def size(self) -> int:
        return sum(region.size for region in self.regions)

    def make_mergeable(self) -> None:
        """Offer the RAM to the host's KSM (`memory_merge: true`): identical pages of guests
        (the same files in their page caches, zeroed pages) are merged copy-on-write.
        Anonymous RAM only; 4 KiB pages, since KSM merges base pages, not huge ones."""
        madvise = libc().madvise
        madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        for region in self.regions:
            madvise(region.host_address, region.size, _MADV_NOHUGEPAGE)
            if madvise(region.host_address, region.size, _MADV_MERGEABLE) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"memory_merge: madvise(MADV_MERGEABLE): {os.strerror(errno)} "
                                     "(a kernel without CONFIG_KSM, or RAM that is not anonymous)")

    def close(self) -> None:
        munmap = libc().munmap
        munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        for region in self.regions:
            region.view.release()
            munmap(region.host_address, region.size)
        self.regions = []
        if self.memfd is not None:
            os.close(self.memfd)
            self.memfd = None

    def region_of(self, address: int, length: int) -> MemoryRegion:
        if length < 0 or address < 0:
            raise GuestMemoryError(f"invalid guest range 0x{address:x}+{length}")
        for region in self.regions:
            if region.guest_address <= address and address + length <= region.end:
                return region
        raise GuestMemoryError(f"guest range 0x{address:x}..0x{address + length:x} is outside guest RAM")

    def contains(self, address: int, length: int = 1) -> bool:
        try:
            self.region_of(address, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, address: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest RAM (for scatter-gather I/O)."""
        region = self.region_of(address, length)
        start = address - region.guest_address
        return region.view[start : start + length]

    def host_address(self, address: int, length: int = 1) -> int:
        region = self.region_of(address, length)
        return region.host_address + (address - region.guest_address)

    def read(self, address: int, length: int) -> bytes:
        return bytes(self.view(address, length))

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        self.view(address, len(data))[:] = data

    def fill(self, address: int, length: int, byte: int = 0) -> None:
        ctypes.memset(self.host_address(address, length), byte, length)

    def read_u8(self, address: int) -> int:
        return self.view(address, 1)[0]

    def read_u16(self, address: int) -> int:
        value: int = struct.unpack("<H", self.view(address, 2))[0]
        return value

    def read_u32(self, address: int) -> int:
        value: int = struct.unpack("<I", self.view(address, 4))[0]
        return value

    def read_u64(self, address: int) -> int:
        value: int = struct.unpack("<Q", self.view(address, 8))[0]
        return value

    def write_u16(self, address: int, value: int) -> None:
        struct.pack_into("<H", self.view(address, 2), 0, value)

    def write_u32(self, address: int, value: int) -> None:
        struct.pack_into("<I", self.view(address, 4), 0, value)

    def write_u64(self, address: int, value: int) -> None:
        struct.pack_into("<Q", self.view(address, 8), 0, value)
