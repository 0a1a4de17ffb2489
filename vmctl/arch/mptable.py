"""The Intel MultiProcessor table: how a guest without ACPI learns its CPUs and IOAPIC.

Layout per the MP specification 1.4: a 16-byte floating pointer ("_MP_") followed by the
configuration table ("PCMP") with processor, bus, IOAPIC, I/O interrupt and local
interrupt entries. Both structures have byte checksums that make their sums zero.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import memory_map

SPEC_REVISION = 4
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24
CPU_SIGNATURE = 0x600  # family 6
CPU_FEATURES = (1 << 9) | (1 << 0)  # APIC, FPU
OEM_ID = b"VMCTL   "
PRODUCT_ID = b"VMCTL VM    "

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = range(4)
CPU_ENABLED = 1
CPU_BOOTSTRAP = 2


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


@dataclass(frozen=True)
class MpTable:
    address: int
    data: bytes


def build_mptable(cpus: int, address: int = memory_map.MPTABLE_ADDRESS) -> MpTable:
    if not 1 <= cpus <= 254:
        raise ValueError(f"the MP table describes 1..254 CPUs, not {cpus}")
    ioapic_id = cpus  # APIC ids 0..cpus-1 belong to the CPUs
    entries = []
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries.append(
            struct.pack("<BBBBII8x", ENTRY_PROCESSOR, cpu, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES)
        )
    entries.append(struct.pack("<BB6s", ENTRY_BUS, 0, b"ISA   "))
    entries.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, memory_map.IOAPIC_ADDRESS))
    for pin in range(IOAPIC_PINS):
        # KVM's default routing wires GSI n to IOAPIC pin n; describe exactly that.
        entries.append(struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, pin, ioapic_id, pin))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0xFF, 0))
    entries.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0xFF, 1))
    body = b"".join(entries)

    config_address = address + 16
    header_size = 44
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP", header_size + len(body), SPEC_REVISION, 0, OEM_ID, PRODUCT_ID,
            0, 0, len(entries), memory_map.LAPIC_ADDRESS, 0, 0, 0,
        )
    )
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", config_address, 1, SPEC_REVISION, 0, 0))
    floating[10] = _checksum(bytes(floating))
    data = bytes(floating) + bytes(header) + body
    if address + len(data) > memory_map.LOW_RAM_END:
        raise ValueError(f"MP table for {cpus} CPUs ({len(data)} bytes) does not fit below 640 KiB")
    return MpTable(address, data)
