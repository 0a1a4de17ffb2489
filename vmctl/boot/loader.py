"""Put a kernel, its initrd, command line and zero page into guest memory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from io import RawIOBase
from pathlib import Path

from ..arch import memory_map
from ..errors import VmctlError
from ..memory import GuestMemory
from ..units import format_size
from . import params
from .kernel_image import KernelImage, read_kernel

PAGE = 4096


@dataclass(frozen=True)
class BootInfo:
    kernel: KernelImage
    entry: int
    zero_page_address: int
    cmdline: str
    initrd: tuple[int, int] | None
    e820: list[params.E820Entry]


def load_linux(memory: GuestMemory, kernel_path: Path, initrd_path: Path | None, cmdline: str) -> BootInfo:
    kernel = read_kernel(kernel_path)
    _load_segments(memory, kernel)
    cmdline_bytes = cmdline.encode() + b"\0"
    limit = min(kernel.cmdline_size + 1, memory_map.CMDLINE_MAX_SIZE)
    if len(cmdline_bytes) > limit:
        raise VmctlError(
            f"kernel command line is {len(cmdline_bytes) - 1} bytes; {kernel_path} accepts at most {limit - 1}"
        )
    memory.write(memory_map.CMDLINE_ADDRESS, cmdline_bytes)
    initrd = _load_initrd(memory, kernel, initrd_path) if initrd_path else None
    ram = [(region.guest_address, region.size) for region in memory.regions]
    e820 = params.e820_map(ram)
    zero_page = params.build_zero_page(kernel.setup_header, memory_map.CMDLINE_ADDRESS, len(cmdline_bytes) - 1, initrd, e820)
    memory.write(memory_map.ZERO_PAGE_ADDRESS, zero_page)
    # The machine keeps BootInfo for its lifetime; the kernel file's bytes are in guest RAM now.
    return BootInfo(kernel.without_data(), kernel.entry, memory_map.ZERO_PAGE_ADDRESS, cmdline, initrd, e820)


def _load_segments(memory: GuestMemory, kernel: KernelImage) -> None:
    lowest = min(segment.guest_address for segment in kernel.segments)
    if lowest < memory_map.HIGH_MEMORY_START:
        raise VmctlError(f"{kernel.path}: segment at 0x{lowest:x} would overwrite the boot structures below 1 MiB")
    # init_size counts too: a bzImage decompresses in place past its loaded bytes.
    if not memory.contains(lowest, kernel.end - lowest) or not memory.contains(kernel.entry):
        raise VmctlError(
            f"{kernel.path}: needs RAM up to 0x{kernel.end:x} to boot; guest memory of "
            f"{format_size(memory.size)} is too small"
        )
    for segment in kernel.segments:
        memory.write(segment.guest_address, segment.data)
        tail = segment.memory_size - len(segment.data)
        if tail:
            memory.fill(segment.guest_address + len(segment.data), tail)


def _load_initrd(memory: GuestMemory, kernel: KernelImage, path: Path) -> tuple[int, int]:
    """Read the initrd straight into guest RAM: a buffer of its size (MiBs) would stay in
    the VMM's malloc heap after it is freed (glibc keeps a freed top chunk below its trim
    threshold, which rises after the first large free)."""
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            low_ram_end = memory.regions[0].end
            highest = min(kernel.initrd_addr_max + 1, low_ram_end)
            address = (highest - size) & ~(PAGE - 1)
            if address < kernel.end:
                raise VmctlError(
                    f"guest memory of {format_size(memory.size)} is too small for the kernel "
                    f"(up to 0x{kernel.end:x}) and the initrd {path} ({format_size(size)}): give more --memory"
                )
            got = _read_into(handle, memory.view(address, size))
    except OSError as error:
        raise VmctlError(f"{path}: cannot read initrd: {error.strerror}") from None
    if got != size:
        raise VmctlError(f"{path}: initrd changed while it was read ({got} of {size} bytes)")
    return address, size


def _read_into(handle: RawIOBase, view: memoryview) -> int:
    """Fill `view` from `handle` (a short read is not the end of a file); bytes read."""
    done = 0
    while done < len(view):
        count = handle.readinto(view[done:])
        if not count:
            break
        done += count
    return done
