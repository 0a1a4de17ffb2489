"""Guest memory bounds and per-vCPU CPUID (needs /dev/kvm only for the supported leaves)."""

from __future__ import annotations

import os

import pytest

from vmctl.arch import memory_map
from vmctl.arch.cpuid import cpuid_for_vcpu
from vmctl.errors import GuestMemoryError, VmctlError
from vmctl.kvm.abi import KvmCpuidEntry2
from vmctl.memory import GuestMemory
from vmctl.units import format_size, parse_size


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_guest_memory_regions_and_bounds(backing):
    memory = GuestMemory(memory_map.ram_layout((3 << 30) + (64 << 20)), backing)
    try:
        assert [(r.guest_address, r.size) for r in memory.regions] == [(0, 3 << 30), (1 << 32, 64 << 20)]
        memory.write((1 << 32) + 10, b"high")
        assert memory.read((1 << 32) + 10, 4) == b"high"
        memory.write_u64(0x1000, 0x1122334455667788)
        assert memory.read_u32(0x1004) == 0x11223344
        for address, length in [((3 << 30) - 2, 4), (0xFEE00000, 4), ((1 << 32) + (64 << 20), 1), (-1, 1)]:
            with pytest.raises(GuestMemoryError):
                memory.read(address, length)
        with pytest.raises(GuestMemoryError):
            memory.write((3 << 30) - 1, b"xx")  # straddles the MMIO gap
        view = memory.view(0x2000, 16)
        view[:] = b"z" * 16
        assert memory.read(0x2000, 16) == b"z" * 16
        if backing == "memfd":
            assert os.pread(memory.memfd, 16, 0x2000) == b"z" * 16  # the memfd is the RAM
    finally:
        memory.close()


def test_cpuid_topology_and_apic_ids():
    leaf1 = KvmCpuidEntry2(function=1, ebx=0x00000800, ecx=0, edx=0)
    leaf_b0 = KvmCpuidEntry2(function=0xB, index=0, flags=1)
    leaf_b1 = KvmCpuidEntry2(function=0xB, index=1, flags=1)
    for apic_id in range(4):
        table = {(e.function, e.index): e for e in cpuid_for_vcpu([leaf1, leaf_b0, leaf_b1], apic_id, 4)}
        assert table[(1, 0)].ebx >> 24 == apic_id
        assert (table[(1, 0)].ebx >> 16) & 0xFF == 4
        assert table[(1, 0)].ebx & 0xFFFF == 0x0800  # CLFLUSH size kept
        assert table[(1, 0)].ecx & (1 << 31)  # hypervisor bit
        assert table[(1, 0)].edx & (1 << 28)
        assert table[(0xB, 0)].edx == apic_id and table[(0xB, 1)].ebx == 4
        assert table[(0xB, 1)].eax == 2  # two bits of APIC id for four cores
    assert leaf1.ebx == 0x800  # the supported table itself is not modified


@pytest.mark.parametrize("text, value", [("512M", 512 << 20), ("2G", 2 << 30), ("1GiB", 1 << 30), ("4096", 4096), ("64k", 64 << 10), (7, 7)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_errors_name_the_field():
    with pytest.raises(VmctlError, match=r"memory: cannot read size '12X'"):
        parse_size("12X", "memory")
    assert format_size(512 << 20) == "512 MiB" and format_size(1000) == "1000 B"
