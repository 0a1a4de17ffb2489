"""The boot GDT and the KVM segment registers that match its descriptors.

Selectors follow Documentation/arch/x86/boot.rst: __BOOT_CS = 0x10, __BOOT_DS = 0x18.
"""

from __future__ import annotations

import struct

from ..kvm.abi import KvmSegment

CODE64 = 0xA09B  # flags nibble G|L, access P|S|code exec/read accessed
DATA = 0xC093  # flags nibble G|D/B, access P|S|data read/write accessed
TSS64 = 0x808B  # flags nibble G, access P|busy 64-bit TSS

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

# index -> (flags, base, limit); index = selector >> 3
BOOT_GDT: list[tuple[int, int, int]] = [
    (0, 0, 0),
    (0, 0, 0),
    (CODE64, 0, 0xFFFFF),
    (DATA, 0, 0xFFFFF),
    (TSS64, 0, 0xFFFFF),
]


def descriptor(flags: int, base: int, limit: int) -> int:
    """Pack one 8-byte segment descriptor (access byte in flags[7:0], G/DB/L/AVL in flags[15:12])."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


def gdt_bytes(table: list[tuple[int, int, int]] = BOOT_GDT) -> bytes:
    return b"".join(struct.pack("<Q", descriptor(*entry)) for entry in table)


def segment(selector: int, table: list[tuple[int, int, int]] = BOOT_GDT) -> KvmSegment:
    """The hidden part of a segment register as the CPU would cache it from the descriptor."""
    flags, base, limit = table[selector >> 3]
    granular = (flags >> 15) & 1
    return KvmSegment(
        base=base,
        limit=(limit << 12) | 0xFFF if granular else limit,
        selector=selector,
        type=flags & 0xF,
        present=(flags >> 7) & 1,
        dpl=(flags >> 5) & 3,
        db=(flags >> 14) & 1,
        s=(flags >> 4) & 1,
        l=(flags >> 13) & 1,
        g=granular,
        avl=(flags >> 12) & 1,
        unusable=0 if (flags >> 7) & 1 else 1,
    )
