"""Per-vCPU CPUID: KVM's supported leaves, with each vCPU's APIC id and the VM's topology."""

from __future__ import annotations

from ..kvm.abi import KvmCpuidEntry2
from ..kvm.system import copy_entry

LEAF_FEATURES = 0x1
LEAF_CACHE = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_EXT_TOPOLOGY = 0x1F
ECX_HYPERVISOR = 1 << 31
ECX_TSC_DEADLINE = 1 << 24
EDX_HTT = 1 << 28
TOPOLOGY_SMT, TOPOLOGY_CORE = 1, 2


def _bits_for(count: int) -> int:
    return max(0, (count - 1).bit_length())


def cpuid_for_vcpu(supported: list[KvmCpuidEntry2], apic_id: int, cpus: int) -> list[KvmCpuidEntry2]:
    """One socket with `cpus` single-threaded cores; vCPU `apic_id` sees itself as such."""
    result = []
    for original in supported:
        entry = copy_entry(original)
        if entry.function == LEAF_FEATURES:
            # EBX: [31:24] initial APIC id, [23:16] logical processors per package, [15:8] CLFLUSH size
            entry.ebx = (apic_id << 24) | (cpus << 16) | (entry.ebx & 0xFFFF)
            entry.ecx |= ECX_HYPERVISOR
            entry.edx = entry.edx | EDX_HTT if cpus > 1 else entry.edx & ~EDX_HTT
        elif entry.function == LEAF_CACHE:
            # EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1
            entry.eax = (entry.eax & 0x3FFF) | ((cpus - 1) << 26)
        elif entry.function in (LEAF_TOPOLOGY, LEAF_EXT_TOPOLOGY):
            entry.edx = apic_id
            if entry.index == 0:
                entry.eax, entry.ebx, entry.ecx = 0, 1, (TOPOLOGY_SMT << 8) | 0
            elif entry.index == 1:
                entry.eax, entry.ebx, entry.ecx = _bits_for(cpus), cpus, (TOPOLOGY_CORE << 8) | 1
            else:
                entry.eax = entry.ebx = 0
                entry.ecx = entry.index
        result.append(entry)
    return result
