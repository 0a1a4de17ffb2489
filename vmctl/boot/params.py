"""The zero page (struct boot_params) and its e820 memory map.

Built as a 4 KiB byte buffer with fields at the offsets of Documentation/arch/x86/zero-page.rst;
a bzImage's own setup header is copied in first, as the boot protocol asks.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..arch import memory_map
from . import kernel_image

ZERO_PAGE_SIZE = 4096
ACPI_RSDP_ADDR = 0x070
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
SENTINEL = 0x1EF
VID_MODE = 0x1FA
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
HEAP_END_PTR = 0x224
CMD_LINE_PTR = 0x228
E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY_SIZE = 20

E820_RAM = 1
E820_RESERVED = 2

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
LOADER_UNDEFINED = 0xFF  # type_of_loader for boot loaders without an assigned id
VGA_NORMAL = 0xFFFF


@dataclass(frozen=True)
class E820Entry:
    address: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.address + self.size


def e820_map(ram: list[tuple[int, int]]) -> list[E820Entry]:
    """Usable RAM below 640 KiB (minus the EBDA holding the MP table), and above 1 MiB."""
    entries = [
        E820Entry(0, memory_map.EBDA_ADDRESS, E820_RAM),
        E820Entry(memory_map.EBDA_ADDRESS, memory_map.LOW_RAM_END - memory_map.EBDA_ADDRESS, E820_RESERVED),
    ]
    for address, size in ram:
        start = max(address, memory_map.HIGH_MEMORY_START)
        end = address + size
        if end > start:
            entries.append(E820Entry(start, end - start, E820_RAM))
    return entries


def build_zero_page(
    setup_header: bytes | None,
    cmdline_address: int,
    cmdline_length: int,
    initrd: tuple[int, int] | None,
    e820: list[E820Entry],
) -> bytes:
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries, the zero page holds {E820_MAX_ENTRIES}")
    page = bytearray(ZERO_PAGE_SIZE)
    if setup_header is not None:
        page[kernel_image.SETUP_SECTS : kernel_image.SETUP_SECTS + len(setup_header)] = setup_header
    else:
        # An ELF vmlinux brings no header: write the fields the kernel checks.
        struct.pack_into("<H", page, kernel_image.BOOT_FLAG, kernel_image.BOOT_FLAG_VALUE)
        page[kernel_image.HEADER_MAGIC : kernel_image.HEADER_MAGIC + 4] = kernel_image.HDRS
        struct.pack_into("<H", page, kernel_image.VERSION, kernel_image.MIN_64BIT_PROTOCOL)
        struct.pack_into("<I", page, kernel_image.KERNEL_ALIGNMENT, 0x0100_0000)
    page[SENTINEL] = 0  # non-zero makes the kernel discard the fields below as stale
    struct.pack_into("<H", page, VID_MODE, VGA_NORMAL)
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", page, CMD_LINE_PTR, cmdline_address & 0xFFFFFFFF)
    struct.pack_into("<I", page, EXT_CMD_LINE_PTR, cmdline_address >> 32)
    struct.pack_into("<I", page, kernel_image.CMDLINE_SIZE, cmdline_length)
    if initrd is not None:
        address, size = initrd
        struct.pack_into("<I", page, RAMDISK_IMAGE, address & 0xFFFFFFFF)
        struct.pack_into("<I", page, RAMDISK_SIZE, size & 0xFFFFFFFF)
        struct.pack_into("<I", page, EXT_RAMDISK_IMAGE, address >> 32)
        struct.pack_into("<I", page, EXT_RAMDISK_SIZE, size >> 32)
    page[E820_ENTRIES] = len(e820)
    for index, entry in enumerate(e820):
        struct.pack_into("<QQI", page, E820_TABLE + index * E820_ENTRY_SIZE, entry.address, entry.size, entry.type)
    return bytes(page)


def read_e820(page: bytes) -> list[E820Entry]:
    """The e820 map written in a zero page (for tests and debugging)."""
    return [
        E820Entry(*struct.unpack_from("<QQI", page, E820_TABLE + i * E820_ENTRY_SIZE))
        for i in range(page[E820_ENTRIES])
    ]
