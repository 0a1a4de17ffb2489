"""Identity page tables for the 64-bit entry: PML4 -> PDPT -> page directories of 2 MiB pages."""

from __future__ import annotations

import struct

from ..memory import GuestMemory
from . import memory_map

PRESENT = 1 << 0
WRITABLE = 1 << 1
PAGE_SIZE_2M = 1 << 7


def identity_map_tables(gib: int = memory_map.IDENTITY_MAPPED_GIB) -> dict[int, bytes]:
    """guest address -> table bytes mapping virtual == physical for the first `gib` GiB."""
    pml4 = struct.pack("<Q", memory_map.PDPT_ADDRESS | PRESENT | WRITABLE).ljust(4096, b"\0")
    pdpt = b"".join(
        struct.pack("<Q", (memory_map.PD_ADDRESS + i * 4096) | PRESENT | WRITABLE) for i in range(gib)
    ).ljust(4096, b"\0")
    directories = b"".join(
        struct.pack("<Q", (index << 21) | PRESENT | WRITABLE | PAGE_SIZE_2M) for index in range(gib * 512)
    )
    return {memory_map.PML4_ADDRESS: pml4, memory_map.PDPT_ADDRESS: pdpt, memory_map.PD_ADDRESS: directories}


def write_identity_map(memory: GuestMemory) -> int:
    """Write the tables; returns the value for CR3."""
    for address, table in identity_map_tables().items():
        memory.write(address, table)
    return memory_map.PML4_ADDRESS
